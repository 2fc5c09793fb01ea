#!/usr/bin/env bash
# The proto contract, checked with the buf CLI (npm: @bufbuild/buf, installed under target/):
#   buf lint      STANDARD rules, with the exceptions buf.yaml names and explains;
#   buf breaking  FILE rules (generated code, wire and JSON stay compatible) against the last
#                 release tag, else the previous commit (a merge's first parent: main before
#                 the merge). BUF_AGAINST=<git ref> picks another. Skipped, with a message, in a
#                 shallow clone without that commit or when that commit has no buf.yaml yet.
# Run from the repository root: bash .ci/buf.sh
# `bash .ci/buf.sh --install-only` installs the CLI and stops (.ci/stubs.sh uses that).
set -euo pipefail
cd "$(dirname "$0")/.."

BUF_VERSION="${BUF_VERSION:-1.75.0}"
prefix="target/buf"
buf="$prefix/node_modules/.bin/buf"
if [ ! -x "$buf" ] || [ "$("$buf" --version)" != "$BUF_VERSION" ]; then
    npm install --prefix "$prefix" --no-save --no-audit --no-fund --loglevel=error "@bufbuild/buf@$BUF_VERSION" >/dev/null
fi
echo "buf $("$buf" --version)"
if [ "${1:-}" = --install-only ]; then
    exit 0
fi

"$buf" lint
echo "buf lint: ok"

against="${BUF_AGAINST:-}"
if [ -z "$against" ]; then
    against="$(git describe --tags --abbrev=0 2>/dev/null || echo HEAD~1)"
fi
if ! git rev-parse --verify --quiet "$against^{commit}" >/dev/null; then
    echo "buf breaking: skipped: $against is not in this clone (shallow?); fetch it or set BUF_AGAINST"
elif ! git cat-file -e "$against:buf.yaml" 2>/dev/null; then
    echo "buf breaking: skipped: $against has no buf.yaml (the contract was not under buf yet)"
else
    "$buf" breaking --against ".git#ref=$(git rev-parse "$against")"
    echo "buf breaking against $against: ok"
fi

#!/usr/bin/env bash
# Validates the Kubernetes manifests in deploy/ (or the YAML files given as arguments):
#  1. each file against the Kubernetes OpenAPI schemas, strictly (unknown fields are errors),
#     with kubernetes-validate from PyPI, which ships the schemas and runs offline: for 1.29,
#     the first release with native sidecars on by default, and for the newest it knows;
#  2. the invariants a schema cannot see (check_manifests.py): native sidecar, gRPC probes,
#     locked-down containers, grace period above the drain, scrape annotations, the config.
# Ends with "N passed, M failed"; exits non-zero when anything failed.
#
# Set CALLOUT_VALIDATE_VENV=DIR to keep the virtualenv between runs (default: a temp dir).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
validator_version="1.37.0"
kube_versions=("1.29.0" "1.37.0")

if [ "$#" -gt 0 ]; then
    files=("$@")
else
    cd "$here"
    files=(*.yaml)
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
venv="${CALLOUT_VALIDATE_VENV:-$tmp/venv}"
if ! "$venv/bin/kubernetes-validate" --version 2>/dev/null | grep -q "$validator_version"; then
    python3 -m venv "$venv"
    timeout 300 "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "kubernetes-validate==$validator_version"
fi

passed=0
failed=0
for version in "${kube_versions[@]}"; do
    for file in "${files[@]}"; do
        if timeout 120 "$venv/bin/kubernetes-validate" --strict --quiet -k "$version" "$file"; then
            echo "ok - $(basename "$file") is valid Kubernetes $version (strict)"
            passed=$((passed + 1))
        else
            echo "FAIL - $(basename "$file") is not valid Kubernetes $version (strict)"
            failed=$((failed + 1))
        fi
    done
done

timeout 120 "$venv/bin/python" "$here/check_manifests.py" "$here/../callout.example.toml" "${files[@]}" \
    >"$tmp/checks" || true
grep -v '^RESULT ' "$tmp/checks" || true
result="$(tail -n 1 "$tmp/checks")"
if [[ "$result" =~ ^RESULT\ ([0-9]+)\ ([0-9]+)$ ]]; then
    passed=$((passed + BASH_REMATCH[1]))
    failed=$((failed + BASH_REMATCH[2]))
else
    echo "FAIL - check_manifests.py did not finish"
    failed=$((failed + 1))
fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]

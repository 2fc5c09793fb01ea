#!/usr/bin/env bash
# Validates the Kubernetes manifests in deploy/ (or the YAML files given as arguments):
#  1. each file against the Kubernetes OpenAPI schemas, strictly (unknown fields are errors),
#     with kubernetes-validate from PyPI, which ships the schemas and runs offline: for 1.29,
#     the first release with native sidecars on by default, and for the newest it knows;
#  2. the invariants a schema cannot see (check_manifests.py): native sidecar, gRPC probes,
#     locked-down containers, grace period above the drain, scrape annotations, the config,
#     the recommended app.kubernetes.io labels;
#  3. with no arguments, also what `kubectl apply -k deploy/` would apply: `kubectl kustomize`
#     renders deploy/ and deploy/monitoring/ (the optional PodMonitor), and the result passes
#     1 (but the PodMonitor, a CRD the schemas lack) and 2. Without kubectl (not packaged in
#     Debian; see kubernetes.io for its install), the kustomizations' resources are only
#     checked to be the files validated above, and the rendering is reported skipped.
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
    files=()
    for f in *.yaml; do
        [ "$f" = kustomization.yaml ] || files+=("$f")
    done
    render=1
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
validated=("${files[@]}")
rendered=()
if [ "${render:-0}" = 1 ]; then
    if command -v kubectl >/dev/null 2>&1; then
        if kubectl kustomize "$here" >"$tmp/kustomized.yaml" \
            && kubectl kustomize "$here/monitoring" >"$tmp/monitoring.yaml"; then
            echo "ok - kubectl kustomize deploy/ and deploy/monitoring/ render"
            passed=$((passed + 1))
            validated+=("$tmp/kustomized.yaml")
            rendered=("$tmp/kustomized.yaml" "$tmp/monitoring.yaml")
        else
            echo "FAIL - kubectl kustomize deploy/ or deploy/monitoring/ does not render"
            failed=$((failed + 1))
        fi
    else
        echo "kubectl not found: kustomize rendering skipped; checking the resource lists only"
        for k in "$here/kustomization.yaml" "$here/monitoring/kustomization.yaml"; do
            dir="$(dirname "$k")"
            missing="$(sed -n 's/^  - \(.*\.yaml\)$/\1/p' "$k" | while read -r r; do [ -f "$dir/$r" ] || echo "$r"; done)"
            if [ -z "$missing" ]; then
                echo "ok - ${k#"$here/"} lists only existing files"
                passed=$((passed + 1))
            else
                echo "FAIL - ${k#"$here/"} lists missing files: $missing"
                failed=$((failed + 1))
            fi
        done
    fi
fi
for version in "${kube_versions[@]}"; do
    for file in "${validated[@]}"; do
        if timeout 120 "$venv/bin/kubernetes-validate" --strict --quiet -k "$version" "$file"; then
            echo "ok - $(basename "$file") is valid Kubernetes $version (strict)"
            passed=$((passed + 1))
        else
            echo "FAIL - $(basename "$file") is not valid Kubernetes $version (strict)"
            failed=$((failed + 1))
        fi
    done
done

# check_manifests.py over a set of files; its counts are added to the totals.
invariants() {
    timeout 120 "$venv/bin/python" "$here/check_manifests.py" "$here/../callout.example.toml" "$@" \
        >"$tmp/checks" || true
    grep -v '^RESULT ' "$tmp/checks" || true
    local result
    result="$(tail -n 1 "$tmp/checks")"
    if [[ "$result" =~ ^RESULT\ ([0-9]+)\ ([0-9]+)$ ]]; then
        passed=$((passed + BASH_REMATCH[1]))
        failed=$((failed + BASH_REMATCH[2]))
    else
        echo "FAIL - check_manifests.py did not finish"
        failed=$((failed + 1))
    fi
}
invariants "${files[@]}"
if [ "${#rendered[@]}" -gt 0 ]; then
    echo "-- the kustomize output (kubectl apply -k deploy/, deploy/monitoring/):"
    invariants "${rendered[@]}"
fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]

#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 30), one at a time, and exits non-zero when
# any target finds a crash (its input is saved under fuzz/artifacts/TARGET/).
#   fuzz/run.sh [SECONDS]
# Installs cargo-fuzz when missing. Works on the stable toolchain: cargo-fuzz's nightly flags
# (-Zsanitizer, sancov passes) are allowed by RUSTC_BOOTSTRAP=1. FUZZ_SANITIZER picks the
# sanitizer (address by default; "none" builds faster). Generated corpora stay under
# fuzz/corpus/ (not committed); the hand-made seeds of fuzz/seeds/TARGET/ are read, never written.
set -euo pipefail

cd "$(dirname "$0")"
seconds="${1:-30}"
sanitizer="${FUZZ_SANITIZER:-address}"
export RUSTC_BOOTSTRAP=1

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

# One build of every target first; 16 codegen units build much faster on few cores than
# cargo-fuzz's default of 1, at little cost to the run.
build=(--sanitizer "$sanitizer" --codegen-units 16)
cargo fuzz build "${build[@]}"

failed=()
for target in $(cargo fuzz list); do
    printf '\n==> fuzz %s for %ss\n' "$target" "$seconds"
    mkdir -p "corpus/$target"
    corpora=("corpus/$target")
    if [ -d "seeds/$target" ]; then
        corpora+=("seeds/$target")
    fi
    # -timeout: one input taking 10 s is a hang worth reporting; -max_len keeps inputs near
    # request size without making every run slow.
    if ! cargo fuzz run "${build[@]}" "$target" "${corpora[@]}" -- \
        -max_total_time="$seconds" -timeout=10 -max_len=8192 -dict=seeds/callout.dict \
        -print_final_stats=1; then
        failed+=("$target")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    printf '\nfuzz: crashes in %s (inputs under fuzz/artifacts/)\n' "${failed[*]}" >&2
    exit 1
fi
printf '\nfuzz: every target ran %ss without a crash\n' "$seconds"

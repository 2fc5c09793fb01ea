#!/usr/bin/env bash
# Stubs for other languages, proven: `buf generate --template buf.gen.local.yaml` (local
# plugins, offline) into a temporary directory, then each language's generated code is compiled
# and used the way a user would, by the programs in examples/stubs/:
#   go      protoc-gen-go + protoc-gen-go-grpc; built (and vetted) with Debian's grpc-go and
#           protobuf-go sources in GOPATH mode (the Go module proxy is not used), importing
#           package calloutv1 by its go_package path; examples/stubs/go runs.
#   java    protoc's java + grpc_java_plugin; javac against Debian's protobuf-java and
#           grpc-java jars; examples/stubs/java/StubsCheck runs.
#   python  protoc's python + pyi + grpc_python_plugin; examples/stubs/python/stubs_check.py
#           imports them under grpcio 1.85 (the polyglot test's venv).
#   ts      protoc-gen-es (npm, examples/stubs/ts); tsc --strict, then node runs check.ts.
#   csharp  protoc's csharp: generated and its namespace checked only (Debian has no .NET SDK).
# Installs what is missing (Debian packages with apt-get, the buf CLI through .ci/buf.sh, npm
# and PyPI packages); a warm run takes about half a minute. Ends with `N passed, M failed`;
# the exit status is non-zero on any failure, and the generated code is then kept.
# Run from anywhere: bash .ci/stubs.sh. Environment: CARGO_TARGET_DIR, POLYGLOT_VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
VENV="${POLYGLOT_VENV:-$TARGET_DIR/polyglot-venv}"
# The polyglot test's packages (examples/polyglot_test.sh), so one venv serves both.
PY_PACKAGES=('grpcio==1.85.*' 'grpcio-tools==1.85.*' 'grpcio-status==1.85.*' 'grpcio-reflection==1.85.*')
JAVA_LIB=/usr/share/java
GOCODE=/usr/share/gocode
START=$SECONDS

OUT="$(mktemp -d "${TMPDIR:-/tmp}/callout-stubs.XXXXXX")"
PASSED=0
FAILED=0
finish() {
    local rc=$?
    if [ "$FAILED" = 0 ] && [ "$rc" = 0 ]; then
        rm -rf "$OUT"
    else
        echo "generated code and logs kept in $OUT" >&2
    fi
    exit "$rc"
}
trap finish EXIT

step() {
    printf '\n==> %s\n' "$*"
}

# check NAME CMD...: runs CMD in a subshell with -e (its output in $OUT/NAME.log; the log's
# "LANG: " lines are shown), reports NAME as ok or FAIL.
check() {
    local name="$1" log rc
    log="$OUT/${name%%:*}.log"
    shift
    # Not in an `if` or `||`: there bash would ignore the subshell's set -e.
    set +e
    (
        set -e
        "$@"
    ) >"$log" 2>&1
    rc=$?
    set -e
    if [ "$rc" = 0 ]; then
        PASSED=$((PASSED + 1))
        echo "ok   - $name"
        grep -E '^(go|java|python|ts): ' "$log" | sed 's/^/       /' || true
    else
        FAILED=$((FAILED + 1))
        echo "FAIL - $name"
        sed 's/^/    | /' "$log" | tail -n 40 | cut -c1-300
    fi
}

# ------------------------------------------------------------------------------- tools

step "tools (Debian packages, only those missing)"
# need PACKAGE PATH_OR_COMMAND: PACKAGE is installed when its command or file is missing.
missing=()
need() {
    if [[ "$2" == /* ]]; then
        [ -e "$2" ] || missing+=("$1")
    else
        command -v "$2" >/dev/null 2>&1 || missing+=("$1")
    fi
}
need protobuf-compiler protoc
need golang-go go
need protoc-gen-go protoc-gen-go
need protoc-gen-go-grpc protoc-gen-go-grpc
need golang-google-grpc-dev "$GOCODE/src/google.golang.org/grpc/server.go"
need golang-google-protobuf-dev "$GOCODE/src/google.golang.org/protobuf/proto/encode.go"
need protobuf-compiler-grpc grpc_python_plugin
need protobuf-compiler-grpc-java-plugin grpc_java_plugin
need default-jdk-headless javac
need libprotobuf-java "$JAVA_LIB/protobuf.jar"
need libgrpc-java "$JAVA_LIB/grpc-stub.jar"
# Debian's grpc-java does not depend on these two, though its jars and stubs need them:
# guava (grpc-api) and javax.annotation.Generated (on every generated *Grpc class).
need libguava-java "$JAVA_LIB/guava.jar"
need libgeronimo-annotation-1.3-spec-java "$JAVA_LIB/geronimo-annotation-1.3-spec.jar"
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "missing Debian packages (install them, as root): ${missing[*]}" >&2
        exit 1
    fi
    echo "installing: ${missing[*]}"
    timeout 300 apt-get update -qq
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >"$OUT/apt.log" 2>&1 || {
        tail -n 20 "$OUT/apt.log" >&2
        exit 1
    }
fi
echo "protoc: $(protoc --version); $(go version); protoc-gen-go $(protoc-gen-go --version | sed 's/.* //')"
echo "protoc-gen-go-grpc $(protoc-gen-go-grpc --version | sed 's/.* //'); $(javac -version 2>&1)"
echo "grpc-java $(basename "$(readlink -f "$JAVA_LIB/grpc-stub.jar")" .jar | sed 's/grpc-stub-//')," \
    "protobuf-java $(basename "$(readlink -f "$JAVA_LIB/protobuf.jar")" .jar | sed 's/protobuf-//')"

bash .ci/buf.sh --install-only
BUF="$ROOT/target/buf/node_modules/.bin/buf"

# The protobuf-es plugin, runtime and tsc (examples/stubs/ts, package-lock.json), once per lock.
TS="$ROOT/examples/stubs/ts"
if ! cmp -s "$TS/package-lock.json" "$TS/node_modules/.stubs-lock"; then
    (cd "$TS" && timeout 600 npm ci --no-audit --no-fund --loglevel=error)
    cp "$TS/package-lock.json" "$TS/node_modules/.stubs-lock"
fi
echo "protoc-gen-es $("$TS/node_modules/.bin/protoc-gen-es" --version | sed 's/.* //'), tsc $("$TS/node_modules/.bin/tsc" --version | sed 's/.* //')"

if [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"; then
    PY="$VENV/bin/python"
    if ! "$PY" -c 'import sys, grpc, grpc_tools; sys.exit(not grpc.__version__.startswith("1.85."))' 2>/dev/null; then
        timeout 600 "$PY" -m pip install --quiet --disable-pip-version-check "${PY_PACKAGES[@]}"
    fi
else
    # No venv module (Debian without python3-venv): a directory of our own, as the polyglot test.
    PY=python3
    timeout 600 python3 -m pip install --quiet --disable-pip-version-check \
        --target "$VENV-packages" "${PY_PACKAGES[@]}"
    export PYTHONPATH="$VENV-packages${PYTHONPATH:+:$PYTHONPATH}"
fi
echo "python: $("$PY" -c 'import grpc, google.protobuf as p; print("grpcio", grpc.__version__, "protobuf", p.__version__)')"

# ------------------------------------------------------------------------------- generate

step "buf generate --template buf.gen.local.yaml (into $OUT)"
PATH="$TS/node_modules/.bin:$PATH" "$BUF" generate --template buf.gen.local.yaml -o "$OUT"
find "$OUT/gen" -type f | sed "s|^$OUT/||" | sort | awk -F/ '
    { n[$2]++; if (!($2 in first)) first[$2] = $0 }
    END { for (l in n) printf "  %-7s %3d file%s (%s ...)\n", l, n[l], (n[l] == 1 ? "" : "s"), first[l] }' | sort

# ------------------------------------------------------------------------------- compile

step "compile and use the generated code"

# Go, as a user's package: GOPATH mode (offline, no module proxy) with Debian's sources after
# our own tree, where gen/ sits under the go_package path's root "callout" (a module named
# callout with gen/ at its root is the same). The package found there must have go_package's
# import path and name.
go_check() {
    local want got
    local gopath="$OUT/gopath"
    mkdir -p "$gopath/src/callout"
    ln -sfn "$OUT/gen" "$gopath/src/callout/gen"
    ln -sfn "$ROOT/examples/stubs/go" "$gopath/src/callout/stubscheck"
    cd "$gopath/src/callout"
    export GO111MODULE=off GOPROXY=off GOFLAGS= GOPATH="$gopath:$GOCODE" GOCACHE="$TARGET_DIR/stubs-gocache"
    want="$(sed -n 's/^option go_package = "\(.*\)";$/\1/p' "$ROOT/proto/callout/v1/callout.proto")"
    got="$(go list -f '{{.ImportPath}};{{.Name}}' callout/gen/go/callout/v1)"
    if [ "$got" != "$want" ]; then
        echo "go_package is \"$want\" but the generated package is $got" >&2
        return 1
    fi
    go build callout/gen/go/callout/v1
    go build -o "$OUT/stubscheck" callout/stubscheck
    go vet callout/gen/go/callout/v1 callout/stubscheck
    "$OUT/stubscheck"
}
check "go: package calloutv1 (callout/gen/go/callout/v1) builds and vets; examples/stubs/go runs" go_check

java_check() {
    local cp jar classes="$OUT/java-classes"
    cp="$OUT/java-classes"
    for jar in protobuf grpc-api grpc-stub grpc-protobuf grpc-protobuf-lite guava geronimo-annotation-1.3-spec; do
        cp="$cp:$JAVA_LIB/$jar.jar"
    done
    mkdir -p "$classes"
    find "$OUT/gen/java" -name '*.java' >"$OUT/java-sources"
    echo "$ROOT/examples/stubs/java/StubsCheck.java" >>"$OUT/java-sources"
    javac -Xlint:none -d "$classes" -cp "$cp" "@$OUT/java-sources"
    java -cp "$cp" StubsCheck
}
check "java: package com.callout.v1 (one class per message) compiles; StubsCheck runs" java_check

python_check() {
    "$PY" -c 'import sys; sys.path.insert(0, sys.argv[1]); import callout.v1.callout_pb2_grpc' "$OUT/gen/python"
    test -s "$OUT/gen/python/callout/v1/callout_pb2.pyi"
    "$PY" -W error "$ROOT/examples/stubs/python/stubs_check.py" "$OUT/gen/python"
}
check "python: callout.v1.callout_pb2(_grpc) import; stubs_check.py runs" python_check

ts_check() {
    local dir="$OUT/ts"
    mkdir -p "$dir"
    ln -sfn "$OUT/gen" "$dir/gen"
    ln -sfn "$TS/node_modules" "$dir/node_modules"
    cp "$TS/check.ts" "$dir/"
    echo '{"type": "module"}' >"$dir/package.json"
    cat >"$dir/tsconfig.json" <<'EOF'
{
  "compilerOptions": {
    "target": "es2022",
    "module": "nodenext",
    "moduleResolution": "nodenext",
    "strict": true,
    "types": ["node"],
    "outDir": "dist"
  },
  "files": ["check.ts"]
}
EOF
    cd "$dir"
    node_modules/.bin/tsc -p .
    node dist/check.js
}
check "ts: gen/ts/callout/v1/callout_pb.ts type-checks (tsc --strict); check.ts runs" ts_check

csharp_check() {
    grep -q '^namespace Callout\.V1 {' "$OUT/gen/csharp/Callout.cs"
    grep -q 'public sealed partial class ExecuteHttpActionRequest ' "$OUT/gen/csharp/Callout.cs"
}
check "csharp: Callout.cs in namespace Callout.V1 (generated only: no .NET SDK here)" csharp_check

step "summary ($((SECONDS - START)) s)"
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]

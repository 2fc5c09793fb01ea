#!/usr/bin/env bash
# Cross-language test: the Python and Node example clients against the real callout binary and
# the real echo upstream, over loopback. Run from anywhere as `bash examples/polyglot_test.sh`.
#
# It installs the clients' packages (a Python venv under target/, `npm ci` in examples/node),
# builds `callout` and `echo_upstream` (debug), starts both on 127.0.0.1 with port 0 (each logs
# the address it bound, so no port can be taken in between), runs every client command and
# checks its output (examples/python/edge_check.py adds the edge cases: violation lists, deep
# JSON, undecodable and oversized requests). Everything it starts is stopped on exit; the whole
# run is bounded by POLYGLOT_TIMEOUT seconds (default 900) and each client call by 60 s. The
# last line is `N passed, M failed`; the exit status is non-zero on any failure.
#
# Needs: cargo, python3 (with venv or pip), node and npm, and PyPI and npm registries (or
# their mirrors) reachable. Environment: POLYGLOT_VENV (default target/polyglot-venv),
# POLYGLOT_TIMEOUT, CARGO_TARGET_DIR.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$PWD"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
VENV="${POLYGLOT_VENV:-$TARGET_DIR/polyglot-venv}"
LIMIT="${POLYGLOT_TIMEOUT:-900}"
CALL_TIMEOUT=60
# standardwebhooks: the reference verifier of the Standard Webhooks spec (webhook_check.py).
PY_PACKAGES=('grpcio==1.85.*' 'grpcio-tools==1.85.*' 'grpcio-status==1.85.*' 'grpcio-reflection==1.85.*'
    'standardwebhooks==1.1.*')

WORK="$(mktemp -d "${TMPDIR:-/tmp}/callout-polyglot.XXXXXX")"
PASSED=0
FAILED=0
SUMMARY_DONE=0
PIDS=()
WATCHDOG=""

cleanup() {
    local rc=$?
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [ -n "$WATCHDOG" ]; then
        kill "$WATCHDOG" 2>/dev/null || true
    fi
    if [ "$SUMMARY_DONE" = 0 ]; then
        # Stopped before the end (a setup step failed, or the time limit): that is a failure.
        echo "polyglot test stopped early (exit status $rc); logs in $WORK" >&2
        [ "$rc" = 0 ] && rc=1
        echo "$PASSED passed, $((FAILED + 1)) failed"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT
trap 'echo "time limit or TERM: stopping" >&2; exit 124' TERM

# Bound the whole run: after LIMIT seconds the script gets TERM and cleans up.
# The watchdog keeps no pipe open, and takes its sleep with it when it is stopped.
(
    exec >/dev/null 2>&1
    trap 'kill "$nap" 2>/dev/null; exit 0' TERM
    sleep "$LIMIT" &
    nap=$!
    wait "$nap"
    # bash runs the TERM trap only once its foreground command ends: stop that command too
    # (the script's own children, by parent pid).
    kill -TERM $$
    pkill -TERM -P $$ 2>/dev/null
) &
WATCHDOG=$!

step() {
    printf '\n==> %s\n' "$*"
}

pass() {
    PASSED=$((PASSED + 1))
    echo "ok   - $*"
}

fail() {
    FAILED=$((FAILED + 1))
    echo "FAIL - $*"
}

# ------------------------------------------------------------------------------- setup

step "python packages (venv $VENV)"
if [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"; then
    PY="$VENV/bin/python"
    timeout 600 "$PY" -m pip install --quiet --disable-pip-version-check "${PY_PACKAGES[@]}"
else
    # No venv module (Debian without python3-venv): install into a directory of our own,
    # never into the system site-packages.
    echo "python3 -m venv is not available; installing into $VENV-packages instead"
    PY="python3"
    timeout 600 python3 -m pip install --quiet --disable-pip-version-check \
        --target "$VENV-packages" "${PY_PACKAGES[@]}"
    export PYTHONPATH="$VENV-packages${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c 'import grpc, grpc_tools, grpc_status, grpc_reflection, standardwebhooks; print("grpcio", grpc.__version__)'

step "node packages (examples/node)"
node --version
if [ -f examples/node/package-lock.json ]; then
    (cd examples/node && timeout 600 npm ci --no-audit --no-fund --loglevel=error)
else
    (cd examples/node && timeout 600 npm install --no-audit --no-fund --loglevel=error)
fi

step "cargo build --bin callout --example echo_upstream"
cargo build --locked --bin callout --example echo_upstream

# Starts a process in the background, logging to $WORK/NAME.log, and waits for the address it
# prints after binding (sed expression EXPR extracts it). Sets ADDR.
start() {
    local name="$1" expr="$2"
    shift 2
    "$@" >"$WORK/$name.log" 2>&1 &
    PIDS+=("$!")
    local pid=$! i
    for i in $(seq 1 100); do
        ADDR="$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/$name.log" | sed -n "$expr" | head -n 1)"
        if [ -n "$ADDR" ]; then
            echo "$name listening on $ADDR (pid $pid)"
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            break
        fi
        sleep 0.1
    done
    echo "$name did not start; its log:" >&2
    cat "$WORK/$name.log" >&2
    return 1
}

step "start echo_upstream and callout on loopback"
start echo_upstream 's/^echo upstream listening on http:\/\/\(127\.0\.0\.1:[0-9]*\).*/\1/p' \
    "$TARGET_DIR/debug/examples/echo_upstream" --listen 127.0.0.1:0
UPSTREAM="http://$ADDR"
RUST_LOG=info start callout 's/.*callout serving listen=\(127\.0\.0\.1:[0-9]*\).*/\1/p' \
    "$TARGET_DIR/debug/callout" serve --allow-private-networks --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
    --store "sqlite:$WORK/store/actions.db"
GRPC="$ADDR"

PYC=("$PY" examples/python/callout_client.py --target "$GRPC" --deadline 30)
NODEC=(node examples/node/callout_client.js --target "$GRPC" --deadline 30)

# ------------------------------------------------------------------------------- checks

# run NAME WANT_RC CMD...: runs a client command (bounded), keeps its output in $WORK/NAME.out
# and checks its exit status.
run() {
    local name="$1" want="$2"
    shift 2
    local rc=0
    timeout "$CALL_TIMEOUT" "$@" >"$WORK/$name.out" 2>&1 || rc=$?
    OUT="$WORK/$name.out"
    CURRENT="$name"
    if [ "$rc" = "$want" ]; then
        pass "$name: exit status $rc"
    else
        fail "$name: exit status $rc, want $want"
        show_output
    fi
}

# show_output: the last run's output, indented, for a failure.
show_output() {
    sed 's/^/    | /' "$OUT" | cut -c1-300
}

# grep_check FLAG NEEDLE WHAT: the last run's output has NEEDLE (grep -FLAG), reported as WHAT.
grep_check() {
    if grep -"$1"q -- "$2" "$OUT"; then
        pass "$CURRENT: $3"
    else
        fail "$CURRENT: missing $3"
        show_output
    fi
}

# expect REGEX: the last run's output has a line matching REGEX (grep -E).
expect() { grep_check E "$1" "/$1/"; }

# expect_no PATTERN: no line of the last run's output matches PATTERN (grep -E).
expect_no() {
    if grep -Eq -- "$1" "$OUT"; then
        fail "$CURRENT: has a line matching /$1/"
        show_output
    else
        pass "$CURRENT: no /$1/"
    fi
}

# expect_text TEXT: the last run's output contains TEXT (grep -F).
expect_text() { grep_check F "$1" "contains $1"; }

# expect_events PATTERN: the event names, runs of bodyChunk folded, match PATTERN (grep -E).
expect_events() {
    local order
    order="$(sed -n 's/^event: \([A-Za-z]*\).*/\1/p' "$OUT" | uniq | paste -sd ' ' -)"
    if grep -Eq -- "$1" <<<"$order"; then
        pass "$CURRENT: event order $order"
    else
        fail "$CURRENT: event order \"$order\" does not match /$1/"
    fi
}

step "python: server reflection (what grpcurl list / describe / -d do)"
for i in $(seq 1 50); do
    if timeout 10 "${PYC[@]}" reflect call grpc.health.v1.Health/Check '{}' >"$WORK/health.out" 2>&1 &&
        grep -q '"SERVING"' "$WORK/health.out"; then
        break
    fi
    sleep 0.2
done
run py-health 0 "${PYC[@]}" reflect call grpc.health.v1.Health/Check '{}'
expect '"status": "SERVING"'

run py-reflect-list 0 "${PYC[@]}" reflect list
# --target after the command works too (here it wins over the one before).
run py-target-after 0 "$PY" examples/python/callout_client.py --target 127.0.0.1:1 reflect list --target "$GRPC"
expect '^callout\.v1\.HttpActionService$'
expect '^callout\.v1\.DurableActionService$'
expect '^grpc\.health\.v1\.Health$'

run py-reflect-describe-request 0 "${PYC[@]}" reflect describe callout.v1.ExecuteHttpActionRequest
expect '^callout\.v1\.ExecuteHttpActionRequest is a message:$'
expect '^  string url = 3;$'
expect '^  oneof body \{$'
expect '^  map<string, string> error_messages = 14;$'

run py-reflect-describe-service 0 "${PYC[@]}" reflect describe callout.v1.HttpActionService
expect_text 'rpc ExecuteStream ( .callout.v1.ExecuteHttpActionRequest ) returns ( stream .callout.v1.ActionEvent );'
expect_text 'rpc ExecuteBatch ( stream .callout.v1.ExecuteHttpActionRequest ) returns ( stream .callout.v1.ExecuteHttpActionResponse );'

run py-reflect-call-execute 0 "${PYC[@]}" reflect call callout.v1.HttpActionService/Execute \
    "{\"method\":\"POST\",\"url\":\"$UPSTREAM/orders\",\"headers\":[{\"name\":\"X-Token\",\"value\":\"t\"}],\"json\":\"{\\\"id\\\":1}\",\"successCodes\":\"200\",\"onFailure\":\"ON_FAILURE_CONTINUE\"}"
expect '"outcome": "OUTCOME_SUCCEEDED"'
expect '"status": 200'
expect '"path": "/orders"'

run py-reflect-call-stream 0 "${PYC[@]}" reflect call callout.v1.HttpActionService/ExecuteStream \
    "{\"method\":\"GET\",\"url\":\"$UPSTREAM/delay/50\",\"timeouts\":{\"attempt\":\"5s\"},\"retry\":{\"maxAttempts\":1}}"
expect '"accepted": \{'
expect '"bodyChunk": \{'
expect '"completed": \{'

head -c 300000 /dev/zero | tr '\0' 'a' >"$WORK/big.txt"

# The same workflow steps from each language.
for lang in python node; do
    if [ "$lang" = python ]; then
        CLIENT=("${PYC[@]}")
        p=py
    else
        CLIENT=("${NODEC[@]}")
        p=node
    fi
    step "$lang: Execute and ExecuteStream"

    run "$p-execute" 0 "${CLIENT[@]}" execute POST "$UPSTREAM/orders" -q step=42 \
        -H "X-Client: callout-$lang" --json "{\"id\":1,\"lang\":\"$lang\"}" --success-codes 200,201
    expect '^status: 200 OK \(HTTP/1\.1\)$'
    expect '^outcome: OUTCOME_SUCCEEDED$'
    expect '^proceed: true$'
    expect_text '"method":"POST"'
    expect_text '"path":"/orders"'
    expect_text '"query":"step=42"'
    expect_text "[\"x-client\",\"callout-$lang\"]"
    expect_text "\"body\":\"{\\\"id\\\":1,\\\"lang\\\":\\\"$lang\\\"}\""
    expect "^attempt 1: status=200 remote=127\\.0\\.0\\.1:[0-9]+ dns=[0-9.]+ms connect=[0-9.]+ms tls=[0-9.]+ms first_byte=[0-9.]+ms total=[0-9.]+ms"
    expect '^timing: started_at=[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+Z total=[0-9.]+ms$'

    run "$p-execute-201" 0 "${CLIENT[@]}" execute POST "$UPSTREAM/status/201" --text hello --success-codes 201
    expect '^status: 201 Created'
    expect '^outcome: OUTCOME_SUCCEEDED$'
    expect_text '"path":"/status/201"'
    expect_text '"body":"hello"'

    step "$lang: Render (what Execute would send; nothing sent)"
    run "$p-render" 0 "${CLIENT[@]}" render POST "$UPSTREAM/orders" -q step=42 \
        -H "Authorization: Bearer s3cret-$lang" --json '{"id":1}'
    expect "^request: POST $UPSTREAM/orders\\?step=42$"
    expect '^header: authorization: Bearer \[REDACTED\]$'
    expect '^header: content-type: application/json$'
    expect '^body_bytes: 8$'
    expect '^egress: allowed=true target=127\.0\.0\.1:[0-9]+ '
    expect '^address: 127\.0\.0\.1:[0-9]+ allowed=true$'
    expect '^proxy: used=false$'
    expect_no 's3cret'
    run "$p-render-invalid" 2 "${CLIENT[@]}" render GET "ftp://x"
    expect '^violation: url: '

    step "$lang: reply_body, extract and conditions"

    # AUTO (the default): one field, the parsed JSON of the echo.
    run "$p-reply-auto" 0 "${CLIENT[@]}" execute POST "$UPSTREAM/orders" --json '{"id":1}'
    expect '^body_json: '
    expect_no '^body_text: '
    expect_no '^body: '
    run "$p-reply-all" 0 "${CLIENT[@]}" execute POST "$UPSTREAM/orders" --json '{"id":1}' --reply-body all
    expect '^body_json: '
    expect '^body_text: '
    expect '^body: [0-9]+ bytes$'
    run "$p-reply-raw" 0 "${CLIENT[@]}" execute POST "$UPSTREAM/orders" --json '{"id":1}' --reply-body raw
    expect '^body: [0-9]+ bytes$'
    expect_no '^body_(json|text): '
    run "$p-reply-none" 0 "${CLIENT[@]}" execute POST "$UPSTREAM/orders" --json '{"id":1}' --reply-body none \
        --extract 'path=$.path' --extract 'nothing=$.nope'
    expect '^status: 200 OK'
    expect_no '^body'
    expect_text 'extracted.path: "/orders"'
    expect_text 'extracted.nothing: null'
    run "$p-condition-false" 1 "${CLIENT[@]}" execute GET "$UPSTREAM/job" --success-condition 'body.path == "/other"'
    expect '^outcome: OUTCOME_FAILED$'
    expect_text 'error: ERROR_KIND_CONDITION_FAILED: success_condition "body.path == "/other"" was false'

    step "$lang: vars"
    # A string variable percent-encoded as one path segment, a typed one as a JSON number.
    run "$p-vars" 0 "${CLIENT[@]}" execute POST "$UPSTREAM/orders/{{vars.ref}}" \
        --json '{"n":"{{vars.n}}","who":"{{vars.ref}}"}' --var 'ref=a/b c' --var-json 'n=7'
    expect_text '"path":"/orders/a%2Fb%20c"'
    expect_text '\"n\":7'
    expect_text '\"who\":\"a/b c\"'
    run "$p-vars-unknown" 2 "${CLIENT[@]}" execute GET "$UPSTREAM/orders/{{vars.nope}}"
    expect_text 'url'
    expect_text 'nope'

    run "$p-failed-continue" 0 "${CLIENT[@]}" execute GET "$UPSTREAM/status/503" --on-failure continue --max-attempts 1
    expect '^status: 503 Service Unavailable'
    expect '^outcome: OUTCOME_FAILED$'
    expect '^proceed: true$'
    expect '^error: ERROR_KIND_UNEXPECTED_STATUS: '

    run "$p-stream" 0 "${CLIENT[@]}" stream GET "$UPSTREAM/delay/50" --max-attempts 1 --attempt-timeout 5
    expect_events '^accepted attemptStarted responseHead bodyChunk completed$'
    expect '^event: responseHead attempt=1 status=200 reason=OK$'
    expect '^outcome: OUTCOME_SUCCEEDED$'
    expect_text '"path":"/delay/50"'

    run "$p-stream-large" 0 "${CLIENT[@]}" stream POST "$UPSTREAM/large" --body-file "$WORK/big.txt" --max-attempts 1
    expect_events '^accepted attemptStarted responseHead bodyChunk completed$'
    chunks="$(grep -c '^event: bodyChunk' "$OUT" || true)"
    bytes="$(sed -n 's/^body_bytes: //p' "$OUT")"
    if [ "${chunks:-0}" -ge 5 ] && [ "${bytes:-0}" -gt 300000 ]; then
        pass "$CURRENT: $chunks body chunks, $bytes bytes (64 KiB at most each)"
    else
        fail "$CURRENT: $chunks body chunks, ${bytes:-no} bytes; want >= 5 chunks and > 300000 bytes"
    fi
    if sed -n 's/^event: bodyChunk .* bytes=\([0-9]*\)$/\1/p' "$OUT" | awk '$1 > 65536 { bad = 1 } END { exit bad }'; then
        pass "$CURRENT: no chunk over 64 KiB"
    else
        fail "$CURRENT: a chunk is over 64 KiB"
    fi

    step "$lang: INVALID_ARGUMENT with google.rpc.BadRequest"
    run "$p-invalid" 2 "${CLIENT[@]}" execute FETCH "ftp://x"
    expect '^grpc error: INVALID_ARGUMENT: '
    expect '^violation: url: '
    expect '^violation: method: '

    run "$p-invalid-stream" 2 "${CLIENT[@]}" stream GET "not a url"
    expect '^grpc error: INVALID_ARGUMENT: '
    expect '^violation: url: '
    if grep -q '^event: ' "$OUT"; then
        fail "$CURRENT: events were sent for an invalid action"
    else
        pass "$CURRENT: no events for an invalid action"
    fi

    step "$lang: ExecuteBatch (JSON lines in, a JSON line per reply as each finishes)"
    {
        echo "{\"actionId\":\"slow\",\"method\":\"GET\",\"url\":\"$UPSTREAM/delay/400\",\"retry\":{\"maxAttempts\":1}}"
        echo "{\"actionId\":\"fast\",\"method\":\"POST\",\"url\":\"$UPSTREAM/orders\",\"json\":\"{\\\"lang\\\":\\\"$lang\\\"}\"}"
        echo
        echo "{\"actionId\":\"gone\",\"method\":\"GET\",\"url\":\"$UPSTREAM/status/503\",\"retry\":{\"maxAttempts\":1},\"onFailure\":\"ON_FAILURE_CONTINUE\"}"
    } >"$WORK/$p-batch.jsonl"
    run "$p-batch" 0 "${CLIENT[@]}" batch "$WORK/$p-batch.jsonl"
    expect '^\{"action_id":"fast","body_json":\{.*"path":"/orders".*\},"outcome":"OUTCOME_SUCCEEDED","proceed":true,"status":200\}$'
    expect_text "\"body\":\"{\\\"lang\\\":\\\"$lang\\\"}\""
    expect '^\{"action_id":"gone",.*"error":"ERROR_KIND_UNEXPECTED_STATUS: .*"proceed":true,"status":503\}$'
    expect '^\{"action_id":"slow",.*"outcome":"OUTCOME_SUCCEEDED".*\}$'
    order="$(sed -n 's/^{"action_id":"\([a-z]*\)".*/\1/p' "$OUT" | paste -sd ' ' -)"
    if [ "${order##* }" = slow ]; then
        pass "$CURRENT: replies as actions finish ($order)"
    else
        fail "$CURRENT: reply order \"$order\", want the slow one last"
    fi

    # A malformed action is answered on its own and the stream goes on: exit status 2.
    {
        echo '{"actionId":"bad","method":"FETCH","url":"ftp://x"}'
        echo "{\"actionId\":\"ok\",\"method\":\"GET\",\"url\":\"$UPSTREAM/status/200\"}"
    } >"$WORK/$p-batch-invalid.jsonl"
    run "$p-batch-invalid" 2 "${CLIENT[@]}" batch "$WORK/$p-batch-invalid.jsonl"
    expect '^\{"action_id":"bad","error":"ERROR_KIND_INVALID_REQUEST: invalid action: .*url: .*","outcome":"OUTCOME_FAILED","proceed":false\}$'
    expect '^\{"action_id":"ok",.*"outcome":"OUTCOME_SUCCEEDED"'

    # From stdin (-): an action that fails stops the step, exit status 1.
    echo "{\"actionId\":\"stop\",\"method\":\"GET\",\"url\":\"$UPSTREAM/status/500\",\"retry\":{\"maxAttempts\":1}}" \
        >"$WORK/$p-batch-failed.jsonl"
    run "$p-batch-failed" 1 "${CLIENT[@]}" batch - <"$WORK/$p-batch-failed.jsonl"
    expect '^\{"action_id":"stop",.*"proceed":false,"status":500\}$'

    echo 'not json' >"$WORK/$p-batch-unparsable.jsonl"
    run "$p-batch-unparsable" 2 "${CLIENT[@]}" batch "$WORK/$p-batch-unparsable.jsonl"
    expect '^line 1: not an action: '
done

step "python: the gRPC edge under a stock grpcio client (metadata and recursion limits)"
run py-edge 0 "$PY" examples/python/edge_check.py --target "$GRPC" --upstream "$UPSTREAM"
expect '^all [0-9]+ checks passed$'
if grep -q '^FAIL' "$OUT"; then
    fail "$CURRENT: a check failed"
    show_output
fi

step "python: Standard Webhooks signatures verified by the reference library"
run py-webhooks 0 "$PY" examples/python/webhook_check.py --target "$GRPC" --upstream "$UPSTREAM"
expect '^all [0-9]+ checks passed$'
if grep -q '^FAIL' "$OUT"; then
    fail "$CURRENT: a check failed"
    show_output
fi

step "summary"
SUMMARY_DONE=1
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]

#!/usr/bin/env python3
"""Checks callout's gRPC edge from a stock grpcio client (gRPC core's limits, protobuf's decoder).

  edge_check.py --target HOST:PORT --upstream http://HOST:PORT

The upstream is examples/echo_upstream.rs (its /raw path answers with the request body).
Checks: a big violation list arrives as INVALID_ARGUMENT, not RESOURCE_EXHAUSTED (gRPC core
refuses response metadata past 8 KiB); replies with deeply nested JSON bodies decode
(protobuf's recursion limit is 100), with body_json only up to 32 levels; undecodable and
oversized requests and a URL with no written host are INVALID_ARGUMENT. Prints one line per
check and exits 0 when all pass, 1 otherwise. Used by examples/polyglot_test.sh.
"""

import argparse
import os
import shutil
import sys
import tempfile

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from callout_client import DEFAULT_PROTO_DIR, load_stubs  # noqa: E402

RESULTS = []


def check(name, ok, detail=""):
    RESULTS.append(ok)
    print(f"{'ok  ' if ok else 'FAIL'} - {name}{': ' + detail if detail and not ok else ''}")


def call(fn, request, timeout):
    """(reply, None) or (None, grpc.RpcError)."""
    try:
        return fn(request, timeout=timeout), None
    except grpc.RpcError as err:
        return None, err


def code_of(err):
    return err.code().name if err is not None else "OK"


def violations(err):
    """The BadRequest field violations of an INVALID_ARGUMENT, parsed as a client would."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(err)
    found = []
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.extend(v.field for v in bad.field_violations)
    return found


def nested(depth, objects):
    if objects:
        return '{"k":' * depth + "1" + "}" * depth
    return "[" * depth + "1" + "]" * depth


def run(pb, stub, channel, args):
    one_try = pb.RetryPolicy(max_attempts=1)
    t = args.deadline

    def request(**fields):
        fields.setdefault("method", "GET")
        fields.setdefault("url", args.upstream + "/")
        return pb.ExecuteHttpActionRequest(retry=one_try, **fields)

    # Violation lists: every violation and value used to go into the trailers.
    headers = [pb.KeyValue(name=f"bad name {i} " + "é" * 50, value="v") for i in range(300)]
    _, err = call(stub.Execute, request(headers=headers), t)
    check("300 bad header names: INVALID_ARGUMENT", code_of(err) == "INVALID_ARGUMENT", code_of(err))
    if err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT:
        fields = violations(err)
        check("300 bad header names: BadRequest parses", fields[:1] == ["headers[0].name"], repr(fields[:3]))
    _, err = call(stub.Execute, request(success_codes="9" * 20000), t)
    check("20,000-character success_codes: INVALID_ARGUMENT", code_of(err) == "INVALID_ARGUMENT", code_of(err))
    if err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT:
        check("20,000-character success_codes: names the field", violations(err) == ["success_codes"])
    many = [pb.KeyValue(name=f"x-h-{i}", value="v") for i in range(24576)]
    _, err = call(stub.Execute, request(headers=many), t)
    check("24,576 headers: INVALID_ARGUMENT naming headers", code_of(err) == "INVALID_ARGUMENT"
          and violations(err) == ["headers"], code_of(err))

    # Deep JSON bodies, echoed by /raw as application/json.
    for depth, objects in [(32, True), (32, False), (40, False), (50, True), (50, False),
                           (127, False), (128, False), (10000, False)]:
        body = nested(depth, objects)
        # REPLY_BODY_ALL: both views, to see which one a deep document keeps.
        req = request(method="POST", url=args.upstream + "/raw", text=body, content_type="application/json",
                      reply_body=pb.REPLY_BODY_ALL)
        what = f"JSON {'objects' if objects else 'arrays'} {depth} deep"
        reply, err = call(stub.Execute, req, t)
        check(f"{what}: Execute reply decodes", err is None, code_of(err) + " " + (err.details() if err else ""))
        if reply is not None:
            r = reply.response
            check(f"{what}: body_text carries it", r.body_text == body)
            check(f"{what}: body_json {'set' if depth <= 32 else 'left out'}",
                  r.HasField("body_json") == (depth <= 32))
        try:
            events = list(stub.ExecuteStream(req, timeout=t))
            done = events[-1].HasField("completed") if events else False
            check(f"{what}: ExecuteStream decodes", done, f"{len(events)} events")
        except grpc.RpcError as e:
            check(f"{what}: ExecuteStream decodes", False, code_of(e) + " " + e.details())

    # Bytes no stock serializer writes: a url that is not UTF-8.
    raw = channel.unary_unary("/callout.v1.HttpActionService/Execute")
    _, err = call(raw, bytes([0x12, 3]) + b"GET" + bytes([0x1a, 2, ord("h"), 0xFF]), t)
    check("url not UTF-8: INVALID_ARGUMENT naming url", code_of(err) == "INVALID_ARGUMENT"
          and violations(err) == ["url"], code_of(err))

    _, err = call(stub.Execute, request(method="POST", text="a" * (5 << 20)), t)
    check("5 MiB request: INVALID_ARGUMENT", code_of(err) == "INVALID_ARGUMENT", code_of(err))

    host = args.upstream.split("//", 1)[1]
    for url in [f"http:///{host}/x", f"http:/{host}/x", f"http:{host}/x"]:
        _, err = call(stub.Execute, request(url=url), t)
        check(f"{url}: INVALID_ARGUMENT naming url", code_of(err) == "INVALID_ARGUMENT"
              and violations(err) == ["url"], code_of(err))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--upstream", required=True, help="the echo upstream, http://HOST:PORT")
    parser.add_argument("--deadline", type=float, default=30.0)
    args = parser.parse_args()
    stubs_dir = tempfile.mkdtemp(prefix="callout-stubs-")
    try:
        pb, pb_grpc = load_stubs(DEFAULT_PROTO_DIR, stubs_dir)
        with grpc.insecure_channel(args.target) as channel:
            run(pb, pb_grpc.HttpActionServiceStub(channel), channel, args)
    finally:
        shutil.rmtree(stubs_dir, ignore_errors=True)
    failed = RESULTS.count(False)
    print(f"all {len(RESULTS)} checks passed" if not failed else f"{failed} of {len(RESULTS)} checks failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""A workflow step that calls the callout sidecar from Python.

The gRPC stubs are generated from proto/ with grpcio-tools when the script runs (into a
temporary directory, or --stubs-dir), so nothing generated is committed.

  callout_client.py [--target HOST:PORT] execute METHOD URL [options]   unary Execute
  callout_client.py [--target HOST:PORT] stream METHOD URL [options]    ExecuteStream, event by event
  callout_client.py [--target HOST:PORT] render METHOD URL [options]    Render: what would be sent
  callout_client.py [--target HOST:PORT] batch [FILE]                   ExecuteBatch, JSON lines in and out
  callout_client.py [--target HOST:PORT] reflect list                   like `grpcurl list`
  callout_client.py [--target HOST:PORT] reflect describe SYMBOL        like `grpcurl describe`
  callout_client.py [--target HOST:PORT] reflect call SVC/METHOD JSON   like `grpcurl -d JSON`

batch reads one action a line (proto3 JSON, as `reflect call` takes; blank lines skipped) from
FILE or stdin, checks every line parses before sending any, streams them all on one ExecuteBatch
and prints each reply as it comes as one JSON line of sorted keys: action_id, outcome, proceed,
and when set error ("KIND: message"), status, body_json or body_text (the Node client prints
the same text).

The reflect commands need no proto file and no stubs: they read the schema from the server's
reflection service, as grpcurl does.

Exit status, the same as `callout exec` and the Node client (README: "Exit status"): 0 proceed
(the action succeeded, or failed under --on-failure continue), 1 stop (it failed), 2 invalid
(bad usage, or INVALID_ARGUMENT: each field violation is printed), 3 the action did not run for
another reason (any other gRPC error: unreachable, RESOURCE_EXHAUSTED, UNAVAILABLE …). batch
exits with the worst of its actions': 2 when a line does not parse (nothing sent) or an action
was answered ERROR_KIND_INVALID_REQUEST, 1 when one did not proceed, 3 (2 for INVALID_ARGUMENT)
when the stream ended with a gRPC error, else 0.
--target and --deadline may come before or after the command.
Requires grpcio, grpcio-tools, grpcio-status and grpcio-reflection.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

import grpc
from google.protobuf import json_format

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PROTO_DIR = os.path.normpath(os.path.join(HERE, "..", "..", "proto"))
PROTO_FILE = "callout/v1/callout.proto"

EXIT_PROCEED, EXIT_STOP, EXIT_USAGE, EXIT_INVALID, EXIT_GRPC = 0, 1, 2, 2, 3


# ------------------------------------------------------------------------------ stubs


def load_stubs(proto_dir, stubs_dir):
    """Generates callout_pb2 / callout_pb2_grpc from the proto and imports them."""
    from grpc_tools import protoc
    import importlib.resources

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={stubs_dir}",
        f"--grpc_python_out={stubs_dir}",
        os.path.join(proto_dir, PROTO_FILE),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"grpc_tools.protoc failed on {os.path.join(proto_dir, PROTO_FILE)}")
    sys.path.insert(0, stubs_dir)
    from callout.v1 import callout_pb2, callout_pb2_grpc  # noqa: E402 (generated just now)

    return callout_pb2, callout_pb2_grpc


# ------------------------------------------------------------------------------ output


def secs(duration):
    """A google.protobuf.Duration as milliseconds text, the same in every client."""
    return f"{duration.seconds * 1000 + duration.nanos / 1e6:.3f}ms"


def compact(value):
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def print_timing(prefix, timing):
    print(
        f"{prefix} dns={secs(timing.dns)} connect={secs(timing.connect)} tls={secs(timing.tls)} "
        f"first_byte={secs(timing.first_byte)} total={secs(timing.total)} "
        f"reused={str(timing.reused_connection).lower()}"
    )


def print_outcome(pb, reply):
    print(f"action_id: {reply.action_id}")
    print(f"outcome: {pb.Outcome.Name(reply.outcome)}")
    print(f"proceed: {str(reply.proceed).lower()}")
    if reply.HasField("error"):
        print(f"error: {pb.ErrorKind.Name(reply.error.kind)}: {reply.error.message}")
    if reply.HasField("response"):
        r = reply.response
        print(f"status: {r.status} {r.reason} ({r.http_version})")
        # reply_body AUTO (the default) sets one of these; ALL every one that applies.
        if r.HasField("body_json"):
            print(f"body_json: {compact(json_format.MessageToDict(r.body_json))}")
        if r.HasField("body_text"):
            print(f"body_text: {r.body_text}")
        if r.body:
            print(f"body: {len(r.body)} bytes")
    for name in sorted(reply.extracted):
        print(f"extracted.{name}: {compact(json_format.MessageToDict(reply.extracted[name]))}")
    for a in reply.attempts:
        err = f" error={pb.ErrorKind.Name(a.error.kind)}" if a.HasField("error") else ""
        backoff = f" backoff={secs(a.backoff)}" if a.HasField("backoff") else ""
        print_timing(f"attempt {a.number}: status={a.status}{err} remote={a.remote_address}{backoff}", a.timing)
    t = reply.timing
    print(f"timing: started_at={t.started_at.ToJsonString()} total={secs(t.total)}")


# ------------------------------------------------------------------------------ actions


def build_request(pb, args):
    req = pb.ExecuteHttpActionRequest(method=args.method, url=args.url, action_id=args.action_id or "")
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep:
            raise SystemExit(f"-H {h!r}: expected 'Name: value'")
        req.headers.add(name=name.strip(), value=value.strip())
    for q in args.query:
        name, _, value = q.partition("=")
        req.query.add(name=name, value=value)
    if args.json is not None:
        req.json = args.json
    elif args.text is not None:
        req.text = args.text
    elif args.body_file is not None:
        with open(args.body_file, "rb") as f:
            req.raw = f.read()
    if args.success_codes:
        req.success_codes = args.success_codes
    req.on_failure = pb.ON_FAILURE_CONTINUE if args.on_failure == "continue" else pb.ON_FAILURE_ABORT
    if args.max_attempts:
        req.retry.max_attempts = args.max_attempts
    if args.attempt_timeout:
        req.timeouts.attempt.FromMilliseconds(int(args.attempt_timeout * 1000))
    req.reply_body = pb.ReplyBody.Value(f"REPLY_BODY_{args.reply_body.upper()}")
    for e in args.extract:
        name, sep, path = e.partition("=")
        if not sep:
            raise SystemExit(f"--extract {e!r}: expected NAME=JSONPATH")
        req.extract[name] = path
    req.success_condition = args.success_condition
    req.retry_condition = args.retry_condition
    for v in args.var:
        name, sep, value = v.partition("=")
        if not sep:
            raise SystemExit(f"--var {v!r}: expected NAME=VALUE")
        req.vars[name].string_value = value
    for v in args.var_json:
        name, sep, value = v.partition("=")
        if not sep:
            raise SystemExit(f"--var-json {v!r}: expected NAME=JSON")
        try:
            json_format.Parse(value, req.vars[name])
        except json_format.ParseError as e:
            raise SystemExit(f"--var-json {name}: not JSON: {e}")
    if args.async_poll:
        req.async_poll.enabled = True
        if args.poll_interval:
            req.async_poll.interval.FromMilliseconds(int(args.poll_interval * 1000))
    return req


def print_invalid_argument(err):
    """INVALID_ARGUMENT carries a google.rpc.Status with a google.rpc.BadRequest detail."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(err)
    if status is None:
        print("no google.rpc.Status in the trailers")
        return
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            for v in bad.field_violations:
                print(f"violation: {v.field}: {v.description}")


def grpc_error(err):
    print(f"grpc error: {err.code().name}: {err.details()}")
    if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
        print_invalid_argument(err)
        return EXIT_INVALID
    return EXIT_GRPC


def execute(pb, pb_grpc, channel, args):
    stub = pb_grpc.HttpActionServiceStub(channel)
    try:
        reply = stub.Execute(build_request(pb, args), timeout=args.deadline)
    except grpc.RpcError as err:
        return grpc_error(err)
    print_outcome(pb, reply)
    return EXIT_PROCEED if reply.proceed else EXIT_STOP


def stream(pb, pb_grpc, channel, args):
    stub = pb_grpc.HttpActionServiceStub(channel)
    body, content_type, completed = bytearray(), "", None
    try:
        for event in stub.ExecuteStream(build_request(pb, args), timeout=args.deadline):
            kind = event.WhichOneof("event")
            name = pb.ActionEvent.DESCRIPTOR.fields_by_name[kind].json_name
            e = getattr(event, kind)
            if kind == "accepted":
                print(f"event: {name} action_id={e.action_id}")
            elif kind == "attempt_started":
                print(f"event: {name} attempt={e.attempt}")
                body, content_type = bytearray(), ""
            elif kind == "response_head":
                print(f"event: {name} attempt={e.attempt} status={e.status} reason={e.reason}")
                print_timing("  head timing:", e.timing)
                content_type = next((h.value for h in e.headers if h.name.lower() == "content-type"), "")
            elif kind == "body_chunk":
                print(f"event: {name} attempt={e.attempt} offset={e.offset} bytes={len(e.data)}")
                if e.offset != len(body):
                    print(f"error: chunk offset {e.offset} but {len(body)} bytes received so far")
                    return EXIT_GRPC
                body.extend(e.data)
            elif kind == "attempt_failed":
                print(
                    f"event: {name} attempt={e.attempt} error={pb.ErrorKind.Name(e.error.kind)} "
                    f"will_retry={str(e.will_retry).lower()} backoff={secs(e.backoff)}"
                )
            elif kind == "completed":
                print(f"event: {name} outcome={pb.Outcome.Name(e.result.outcome)}")
                completed = e.result
    except grpc.RpcError as err:
        return grpc_error(err)
    if completed is None:
        print("error: the stream ended without a completed event")
        return EXIT_GRPC
    print_outcome(pb, completed)
    print(f"body_bytes: {len(body)}")
    if "json" in content_type.lower():
        print(f"body_json: {compact(json.loads(body))}")
    return EXIT_PROCEED if completed.proceed else EXIT_STOP


def batch_line(pb, reply):
    """One reply as the JSON line both clients print."""
    line = {
        "action_id": reply.action_id,
        "outcome": pb.Outcome.Name(reply.outcome),
        "proceed": reply.proceed,
    }
    if reply.HasField("error"):
        line["error"] = f"{pb.ErrorKind.Name(reply.error.kind)}: {reply.error.message}"
    if reply.HasField("response"):
        line["status"] = reply.response.status
        if reply.response.HasField("body_json"):
            line["body_json"] = json_format.MessageToDict(reply.response.body_json)
        elif reply.response.HasField("body_text"):
            line["body_text"] = reply.response.body_text
    return compact(line)


def batch(pb, pb_grpc, channel, args):
    source = sys.stdin if args.file in (None, "-") else open(args.file, encoding="utf-8")
    requests = []
    with source:
        for number, text in enumerate(source, start=1):
            if not text.strip():
                continue
            try:
                requests.append(json_format.Parse(text, pb.ExecuteHttpActionRequest()))
            except json_format.ParseError as err:
                print(f"line {number}: not an action: {err}")
                return EXIT_USAGE
    stub = pb_grpc.HttpActionServiceStub(channel)
    worst = EXIT_PROCEED
    try:
        for reply in stub.ExecuteBatch(iter(requests), timeout=args.deadline):
            print(batch_line(pb, reply), flush=True)
            if reply.HasField("error") and reply.error.kind == pb.ERROR_KIND_INVALID_REQUEST:
                worst = max(worst, EXIT_INVALID)
            elif not reply.proceed:
                worst = max(worst, EXIT_STOP)
    except grpc.RpcError as err:
        return max(worst, grpc_error(err))
    return worst


def render(pb, pb_grpc, channel, args):
    """Render: the request Execute would send (redacted) and the egress verdict; nothing sent.
    Exits 0 when the egress policy would let it out, 1 when not."""
    stub = pb_grpc.HttpActionServiceStub(channel)
    try:
        r = stub.Render(build_request(pb, args), timeout=args.deadline)
    except grpc.RpcError as err:
        return grpc_error(err)
    print(f"request: {r.method} {r.url}")
    for h in r.headers:
        print(f"header: {h.name}: {h.value}")
    print(f"body_bytes: {r.body_size}")
    e = r.egress
    print(f"egress: allowed={str(e.allowed).lower()} target={e.target} dialled={e.dialled}")
    for a in e.addresses:
        print(f"address: {a.address} allowed={str(a.allowed).lower()} {a.reason}".rstrip())
    print(f"proxy: used={str(r.proxy.used).lower()} {r.proxy.url}".rstrip())
    print(f"policy: max_attempts={r.policy.max_attempts} success_codes={r.policy.success_codes}")
    return EXIT_PROCEED if e.allowed else EXIT_STOP


# ------------------------------------------------------------------------------ reflection

SCALARS = {
    1: "double", 2: "float", 3: "int64", 4: "uint64", 5: "int32", 6: "fixed64", 7: "fixed32",
    8: "bool", 9: "string", 12: "bytes", 13: "uint32", 15: "sfixed32", 16: "sfixed64",
    17: "sint32", 18: "sint64",
}


def type_name(field):
    if field.message_type is not None:
        return "." + field.message_type.full_name
    if field.enum_type is not None:
        return "." + field.enum_type.full_name
    return SCALARS[field.type]


def field_line(field):
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        k, v = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        return f"map<{type_name(k)}, {type_name(v)}> {field.name} = {field.number};"
    oneof = field.containing_oneof
    if field.is_repeated:
        label = "repeated "
    elif oneof is not None and oneof.name == "_" + field.name and len(oneof.fields) == 1:
        label = "optional "  # proto3 optional: a synthetic oneof of one field
    else:
        label = ""
    return f"{label}{type_name(field)} {field.name} = {field.number};"


def describe_message(desc, indent=""):
    lines = [f"{indent}message {desc.name} {{"]
    done = set()
    for field in desc.fields:
        oneof = field.containing_oneof
        if oneof is not None and not (oneof.name == "_" + field.name and len(oneof.fields) == 1):
            if oneof.name in done:
                continue
            done.add(oneof.name)
            lines.append(f"{indent}  oneof {oneof.name} {{")
            lines += [f"{indent}    {field_line(f)}" for f in oneof.fields]
            lines.append(f"{indent}  }}")
        else:
            lines.append(f"{indent}  {field_line(field)}")
    for nested in desc.nested_types:
        if not nested.GetOptions().map_entry:
            lines += describe_message(nested, indent + "  ")
    for enum in desc.enum_types:
        lines += describe_enum(enum, indent + "  ")
    lines.append(f"{indent}}}")
    return lines


def describe_enum(desc, indent=""):
    lines = [f"{indent}enum {desc.name} {{"]
    lines += [f"{indent}  {v.name} = {v.number};" for v in desc.values]
    return lines + [f"{indent}}}"]


def describe_method(m):
    stream_in = "stream " if m.client_streaming else ""
    stream_out = "stream " if m.server_streaming else ""
    return (
        f"rpc {m.name} ( {stream_in}.{m.input_type.full_name} ) "
        f"returns ( {stream_out}.{m.output_type.full_name} );"
    )


def reflect(channel, args):
    from google.protobuf import descriptor_pool, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    db = ProtoReflectionDescriptorDatabase(channel)
    pool = descriptor_pool.DescriptorPool(db)
    if args.reflect_command == "list":
        for service in sorted(db.get_services()):
            print(service)
        return EXIT_PROCEED
    if args.reflect_command == "describe":
        symbol = args.symbol.lstrip(".")
        finders = [
            ("message", pool.FindMessageTypeByName, describe_message),
            ("service", pool.FindServiceByName,
             lambda d: [f"service {d.name} {{"] + [f"  {describe_method(m)}" for m in d.methods] + ["}"]),
            ("enum", pool.FindEnumTypeByName, describe_enum),
            ("method", pool.FindMethodByName, lambda d: [describe_method(d)]),
        ]
        for kind, find, show in finders:
            try:
                desc = find(symbol)
            except KeyError:
                continue
            print(f"{symbol} is a {kind}:")
            print("\n".join(show(desc)))
            return EXIT_PROCEED
        print(f"symbol not found: {symbol}")
        return EXIT_USAGE
    # call SERVICE/METHOD JSON: the request in proto3 JSON, every reply printed as JSON.
    service_name, _, method_name = args.method.lstrip("/").rpartition("/")
    method = pool.FindServiceByName(service_name).methods_by_name[method_name]
    request_cls = message_factory.GetMessageClass(method.input_type)
    reply_cls = message_factory.GetMessageClass(method.output_type)
    request = json_format.Parse(args.data, request_cls())
    path = f"/{service_name}/{method_name}"
    kwargs = dict(request_serializer=request_cls.SerializeToString, response_deserializer=reply_cls.FromString)
    try:
        if method.server_streaming:
            replies = channel.unary_stream(path, **kwargs)(request, timeout=args.deadline)
        else:
            replies = [channel.unary_unary(path, **kwargs)(request, timeout=args.deadline)]
        for reply in replies:
            print(json_format.MessageToJson(reply, indent=2))
    except grpc.RpcError as err:
        return grpc_error(err)
    return EXIT_PROCEED


# ------------------------------------------------------------------------------ main


def action_arguments(p):
    p.add_argument("method", help="GET, POST, PUT, PATCH, DELETE, HEAD or OPTIONS")
    p.add_argument("url", help="absolute http:// or https:// URL")
    p.add_argument("-H", "--header", action="append", default=[], help="'Name: value', repeatable")
    p.add_argument("-q", "--query", action="append", default=[], help="name=value, repeatable")
    body = p.add_mutually_exclusive_group()
    body.add_argument("--json", help="JSON body text")
    body.add_argument("--text", help="text body")
    body.add_argument("--body-file", help="raw body read from a file")
    p.add_argument("--success-codes", default="", help='e.g. "200,201" or "2xx" (default 2xx)')
    p.add_argument("--on-failure", choices=["abort", "continue"], default="abort")
    p.add_argument("--max-attempts", type=int, default=0, help="attempts in all; 1 turns retries off")
    p.add_argument("--attempt-timeout", type=float, default=0, help="seconds per attempt")
    p.add_argument("--action-id", default="")
    p.add_argument("--reply-body", choices=["auto", "all", "raw", "none"], default="auto",
                   help="which body fields the reply carries (default auto: one)")
    p.add_argument("--extract", action="append", default=[], help="NAME=JSONPATH (RFC 9535), repeatable")
    p.add_argument("--success-condition", default="", help='CEL that must hold too, e.g. body.ok == true')
    p.add_argument("--retry-condition", default="", help='CEL; true retries, e.g. body.state != "done"')
    p.add_argument("--var", action="append", default=[], help="NAME=VALUE, a string for {{vars.NAME}}; repeatable")
    p.add_argument("--var-json", action="append", default=[], help="NAME=JSON, a typed value for {{vars.NAME}}; repeatable")
    p.add_argument("--async-poll", action="store_true", help="on 202 + Location, poll it until done")
    p.add_argument("--poll-interval", type=float, default=0, help="seconds between polls (default 1)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=os.environ.get("CALLOUT_TARGET", "127.0.0.1:50051"))
    parser.add_argument("--deadline", type=float, default=60.0, help="gRPC deadline in seconds")
    parser.add_argument("--proto-dir", default=DEFAULT_PROTO_DIR)
    parser.add_argument("--stubs-dir", help="where to generate the stubs (default: a temporary directory)")
    # The same connection options after the command too (`execute --target H:P ...`); given
    # there, they win. SUPPRESS: not given, they leave the value from before the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default=argparse.SUPPRESS, help="HOST:PORT (default 127.0.0.1:50051)")
    common.add_argument("--deadline", type=float, default=argparse.SUPPRESS, help="gRPC deadline in seconds")
    sub = parser.add_subparsers(dest="command", required=True)
    action_arguments(sub.add_parser("execute", parents=[common], help="run one action with the unary Execute"))
    action_arguments(sub.add_parser("stream", parents=[common], help="run one action with ExecuteStream"))
    action_arguments(sub.add_parser("render", parents=[common], help="show what Execute would send, sending nothing"))
    b = sub.add_parser("batch", parents=[common], help="run many actions on one ExecuteBatch stream")
    b.add_argument("file", nargs="?", help="JSON lines of actions (default, or -: stdin)")
    r = sub.add_parser("reflect", help="server reflection: what grpcurl does, no proto file needed")
    rsub = r.add_subparsers(dest="reflect_command", required=True)
    rsub.add_parser("list", parents=[common], help="list the services")
    rsub.add_parser("describe", parents=[common], help="describe a message, service, enum or method").add_argument(
        "symbol"
    )
    call = rsub.add_parser(
        "call", parents=[common], help="call a unary or server-streaming method with a JSON request"
    )
    call.add_argument("method", help="e.g. callout.v1.HttpActionService/Execute")
    call.add_argument("data", nargs="?", default="{}", help="the request in proto3 JSON")
    args = parser.parse_args(argv)

    with grpc.insecure_channel(args.target) as channel:
        if args.command == "reflect":
            return reflect(channel, args)
        stubs_dir = args.stubs_dir or tempfile.mkdtemp(prefix="callout-stubs-")
        try:
            pb, pb_grpc = load_stubs(args.proto_dir, stubs_dir)
            run = {"execute": execute, "stream": stream, "batch": batch, "render": render}[args.command]
            return run(pb, pb_grpc, channel, args)
        finally:
            if not args.stubs_dir:
                shutil.rmtree(stubs_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

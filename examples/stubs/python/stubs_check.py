"""What a Python user writes against the generated stubs (buf generate): it imports the
callout.v1 modules (callout_pb2, callout_pb2_grpc) from the generated directory, builds an
ExecuteHttpActionRequest, round-trips it through the wire format and makes both service stubs
on a channel that never connects (nothing is called). .ci/stubs.sh runs it with the generated
directory first on sys.path: python stubs_check.py GEN_DIR."""

import sys

sys.path.insert(0, sys.argv[1])

import grpc  # noqa: E402
from google.protobuf import duration_pb2  # noqa: E402

from callout.v1 import callout_pb2, callout_pb2_grpc  # noqa: E402

req = callout_pb2.ExecuteHttpActionRequest(
    method="POST",
    url="http://127.0.0.1:8080/orders",
    headers=[callout_pb2.KeyValue(name="X-Token", value="t")],
    json='{"id":1}',
    timeouts=callout_pb2.Timeouts(attempt=duration_pb2.Duration(seconds=5)),
)
wire = req.SerializeToString()
back = callout_pb2.ExecuteHttpActionRequest.FromString(wire)
if back != req:
    sys.exit("round trip changed the request")
# A channel connects only when a call is made; none is.
with grpc.insecure_channel("127.0.0.1:1") as channel:
    callout_pb2_grpc.HttpActionServiceStub(channel)
    callout_pb2_grpc.DurableActionServiceStub(channel)
services = callout_pb2.DESCRIPTOR.services_by_name
print(
    f"python: {back.DESCRIPTOR.full_name} round-trips in {len(wire)} bytes; "
    f"stubs made for {', '.join(sorted(services))} (grpcio {grpc.__version__})"
)

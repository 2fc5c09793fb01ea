// What a TypeScript user writes against the generated protobuf-es stubs (buf generate): it
// builds an ExecuteHttpActionRequest, round-trips it through the wire format and reads the
// service descriptors that @connectrpc/connect makes clients from. .ci/stubs.sh copies it
// beside the generated gen/ directory, type-checks it with tsc (strict) and runs it with node.
import { create, fromBinary, equals, toBinary } from "@bufbuild/protobuf";
import { DurationSchema } from "@bufbuild/protobuf/wkt";
import {
  DurableActionService,
  ExecuteHttpActionRequestSchema,
  HttpActionService,
  KeyValueSchema,
  TimeoutsSchema,
} from "./gen/ts/callout/v1/callout_pb.js";

const req = create(ExecuteHttpActionRequestSchema, {
  method: "POST",
  url: "http://127.0.0.1:8080/orders",
  headers: [create(KeyValueSchema, { name: "X-Token", value: "t" })],
  body: { case: "json", value: '{"id":1}' },
  timeouts: create(TimeoutsSchema, { attempt: create(DurationSchema, { seconds: 5n }) }),
});
const wire = toBinary(ExecuteHttpActionRequestSchema, req);
const back = fromBinary(ExecuteHttpActionRequestSchema, wire);
if (!equals(ExecuteHttpActionRequestSchema, req, back)) {
  console.error("round trip changed the request");
  process.exit(1);
}
const execute = HttpActionService.method.execute;
console.log(
  `ts: ${ExecuteHttpActionRequestSchema.typeName} round-trips in ${wire.length} bytes; ` +
    `${HttpActionService.typeName}/${execute.name} is ${execute.methodKind}; ${DurableActionService.typeName}`,
);

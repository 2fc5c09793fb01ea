#!/usr/bin/env node
// A workflow step that calls the callout sidecar from Node.
//
// proto/ is loaded at run time with @grpc/proto-loader (the google/protobuf well-known types
// come with protobufjs), so nothing is generated or committed.
//
//   node callout_client.js [--target HOST:PORT] execute METHOD URL [options]   unary Execute
//   node callout_client.js [--target HOST:PORT] stream METHOD URL [options]    ExecuteStream
//   node callout_client.js [--target HOST:PORT] render METHOD URL [options]    Render: what would be sent
//   node callout_client.js [--target HOST:PORT] batch [FILE]                   ExecuteBatch
//
// batch reads one action a line (JSON with proto3 JSON's lowerCamelCase names and enum names, as
// protobufjs reads it: a Duration is {"seconds": S, "nanos": N}; blank lines skipped) from FILE
// or stdin, checks every line parses before sending any, streams them all on one ExecuteBatch
// and prints each reply as it comes as one JSON line of sorted keys: action_id, outcome,
// proceed, and when set error ("KIND: message"), status, body_json or body_text (the same text
// the Python client prints).
//
// options: -H 'Name: value' (repeatable), -q name=value (repeatable), --json TEXT, --text TEXT,
// --body-file PATH, --success-codes "200,201", --on-failure abort|continue, --max-attempts N,
// --attempt-timeout SECONDS, --action-id ID, --deadline SECONDS (gRPC deadline, default 60),
// --reply-body auto|all|raw|none, --extract NAME=JSONPATH (repeatable), --success-condition CEL,
// --retry-condition CEL, --var NAME=VALUE (a string, repeatable), --var-json NAME=JSON (a typed
// value, repeatable).
// --retry-condition CEL, --async-poll (on 202 + Location, poll it until done), --poll-interval SECONDS.
//
// Exit status, the same as `callout exec` and the Python client (README: "Exit status"):
// 0 proceed (the action succeeded, or failed under --on-failure continue), 1 stop (it failed),
// 2 invalid (bad usage, or INVALID_ARGUMENT: each field violation is printed), 3 the action did
// not run for another reason (any other gRPC error: unreachable, RESOURCE_EXHAUSTED, UNAVAILABLE …).
// batch exits with the worst of its actions': 2 when a line does not parse (nothing sent) or an
// action was answered ERROR_KIND_INVALID_REQUEST, 1 when one did not proceed, 3 (2 for
// INVALID_ARGUMENT) when the stream ended with a gRPC error, else 0.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTO_DIR = process.env.CALLOUT_PROTO_DIR || path.join(__dirname, '..', '..', 'proto');
const EXIT = { proceed: 0, stop: 1, usage: 2, invalid: 2, grpc: 3 };

// google.rpc.Status and google.rpc.BadRequest, the two messages needed to read the
// grpc-status-details-bin trailer. Field numbers are those of googleapis'
// google/rpc/status.proto and google/rpc/error_details.proto (Any as in google/protobuf/any.proto).
const RPC_PROTO = `
syntax = "proto3";
package google.rpc;
message Any { string type_url = 1; bytes value = 2; }
message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
message BadRequest {
  message FieldViolation { string field = 1; string description = 2; string reason = 3; }
  repeated FieldViolation field_violations = 1;
}
`;
const rpcRoot = protobuf.parse(RPC_PROTO, { keepCase: true }).root;
const RpcStatus = rpcRoot.lookupType('google.rpc.Status');
const BadRequest = rpcRoot.lookupType('google.rpc.BadRequest');

function loadService() {
  const definition = protoLoader.loadSync('callout/v1/callout.proto', {
    includeDirs: [PROTO_DIR],
    keepCase: false, // lowerCamelCase names, as in proto3 JSON
    longs: String,
    enums: String,
    bytes: Buffer,
    defaults: false,
    oneofs: true, // event.event names the set member of a oneof
  });
  return grpc.loadPackageDefinition(definition).callout.v1.HttpActionService;
}

// ------------------------------------------------------------------------------ output

// A google.protobuf.Duration ({seconds, nanos}) as milliseconds text, the same in every client.
function ms(d) {
  if (!d) return '0.000ms';
  return `${(Number(d.seconds || 0) * 1000 + (d.nanos || 0) / 1e6).toFixed(3)}ms`;
}

function timestamp(t) {
  if (!t) return '';
  const nanos = String(t.nanos || 0).padStart(9, '0');
  return new Date(Number(t.seconds) * 1000).toISOString().replace(/\.\d{3}Z$/, `.${nanos}Z`);
}

// google.protobuf.Value as proto-loader hands it over ({kind: 'structValue', structValue: …})
// to a plain JavaScript value.
function valueToJs(v) {
  switch (v.kind) {
    case 'nullValue':
      return null;
    case 'numberValue':
      return v.numberValue;
    case 'stringValue':
      return v.stringValue;
    case 'boolValue':
      return v.boolValue;
    case 'structValue':
      return structToJs(v.structValue);
    case 'listValue':
      return (v.listValue.values || []).map(valueToJs);
    default:
      return null;
  }
}

// A JavaScript value as a google.protobuf.Value (the request's vars).
function jsToValue(v) {
  if (v === null) return { nullValue: 'NULL_VALUE' };
  if (Array.isArray(v)) return { listValue: { values: v.map(jsToValue) } };
  switch (typeof v) {
    case 'number':
      return { numberValue: v };
    case 'string':
      return { stringValue: v };
    case 'boolean':
      return { boolValue: v };
    default: {
      const fields = {};
      for (const [k, x] of Object.entries(v)) fields[k] = jsToValue(x);
      return { structValue: { fields } };
    }
  }
}

function structToJs(s) {
  const out = {};
  for (const [k, v] of Object.entries((s && s.fields) || {})) out[k] = valueToJs(v);
  return out;
}

// Compact JSON with sorted keys, the same text the Python client prints.
function compact(value) {
  const sort = (v) => {
    if (Array.isArray(v)) return v.map(sort);
    if (v && typeof v === 'object') {
      return Object.fromEntries(Object.keys(v).sort().map((k) => [k, sort(v[k])]));
    }
    return v;
  };
  return JSON.stringify(sort(value));
}

function timingLine(prefix, t) {
  t = t || {};
  return (
    `${prefix} dns=${ms(t.dns)} connect=${ms(t.connect)} tls=${ms(t.tls)} ` +
    `first_byte=${ms(t.firstByte)} total=${ms(t.total)} reused=${Boolean(t.reusedConnection)}`
  );
}

function printOutcome(reply) {
  console.log(`action_id: ${reply.actionId}`);
  console.log(`outcome: ${reply.outcome}`);
  console.log(`proceed: ${Boolean(reply.proceed)}`);
  if (reply.error) console.log(`error: ${reply.error.kind}: ${reply.error.message}`);
  const r = reply.response;
  if (r) {
    console.log(`status: ${r.status} ${r.reason} (${r.httpVersion})`);
    // reply_body AUTO (the default) sets one of these; ALL every one that applies.
    if (r.bodyJson) console.log(`body_json: ${compact(valueToJs(r.bodyJson))}`);
    if (r.bodyText !== undefined && r.bodyText !== null) console.log(`body_text: ${r.bodyText}`);
    if (r.body && r.body.length) console.log(`body: ${r.body.length} bytes`);
  }
  for (const name of Object.keys(reply.extracted || {}).sort()) {
    console.log(`extracted.${name}: ${compact(valueToJs(reply.extracted[name]))}`);
  }
  for (const a of reply.attempts || []) {
    const err = a.error ? ` error=${a.error.kind}` : '';
    const backoff = a.backoff ? ` backoff=${ms(a.backoff)}` : '';
    const remote = a.remoteAddress || '';
    console.log(timingLine(`attempt ${a.number}: status=${a.status || 0}${err} remote=${remote}${backoff}`, a.timing));
  }
  const t = reply.timing || {};
  console.log(`timing: started_at=${timestamp(t.startedAt)} total=${ms(t.total)}`);
}

// INVALID_ARGUMENT carries a google.rpc.Status (with a google.rpc.BadRequest detail) in the
// grpc-status-details-bin trailer.
function grpcError(err) {
  const code = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code) || err.code;
  console.log(`grpc error: ${code}: ${err.details}`);
  if (err.code !== grpc.status.INVALID_ARGUMENT) return EXIT.grpc;
  const raw = err.metadata && err.metadata.get('grpc-status-details-bin')[0];
  if (!raw) {
    console.log('no google.rpc.Status in the trailers');
    return EXIT.invalid;
  }
  const status = RpcStatus.decode(raw);
  for (const detail of status.details) {
    if (detail.type_url.endsWith('/google.rpc.BadRequest')) {
      for (const v of BadRequest.decode(detail.value).field_violations) {
        console.log(`violation: ${v.field}: ${v.description}`);
      }
    }
  }
  return EXIT.invalid;
}

// ------------------------------------------------------------------------------ arguments

function usage(message) {
  if (message) console.error(message);
  console.error('usage: node callout_client.js [--target HOST:PORT] [--deadline S] execute|stream|render METHOD URL [options]');
  console.error('       node callout_client.js [--target HOST:PORT] [--deadline S] batch [FILE]');
  process.exit(EXIT.usage);
}

function parseArgs(argv) {
  const opts = {
    target: process.env.CALLOUT_TARGET || '127.0.0.1:50051',
    deadline: 60,
    headers: [],
    query: [],
    extract: [],
    vars: [],
    varsJson: [],
    positional: [],
  };
  const valued = {
    '--target': 'target', '--deadline': 'deadline', '--json': 'json', '--text': 'text',
    '--body-file': 'bodyFile', '--success-codes': 'successCodes', '--on-failure': 'onFailure',
    '--max-attempts': 'maxAttempts', '--attempt-timeout': 'attemptTimeout', '--action-id': 'actionId',
    '--reply-body': 'replyBody', '--success-condition': 'successCondition',
    '--retry-condition': 'retryCondition', '--poll-interval': 'pollInterval',
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const next = () => (i + 1 < argv.length ? argv[++i] : usage(`${arg} needs a value`));
    if (arg === '-H' || arg === '--header') opts.headers.push(next());
    else if (arg === '-q' || arg === '--query') opts.query.push(next());
    else if (arg === '--extract') opts.extract.push(next());
    else if (arg === '--var') opts.vars.push(next());
    else if (arg === '--var-json') opts.varsJson.push(next());
    else if (arg === '--async-poll') opts.asyncPoll = true;
    else if (valued[arg]) opts[valued[arg]] = next();
    else if (arg === '-h' || arg === '--help') usage();
    else if (arg.startsWith('-') && arg.length > 1) usage(`unknown option ${arg}`);
    else opts.positional.push(arg);
  }
  if (opts.positional[0] === 'batch') {
    if (opts.positional.length > 2) usage();
    [opts.command, opts.file] = opts.positional;
    return opts;
  }
  if (opts.positional.length !== 3) usage();
  [opts.command, opts.method, opts.url] = opts.positional;
  if (!['execute', 'stream', 'render'].includes(opts.command)) usage(`unknown command ${opts.command}`);
  return opts;
}

function buildRequest(opts) {
  const req = { actionId: opts.actionId || '', method: opts.method, url: opts.url };
  req.headers = opts.headers.map((h) => {
    const i = h.indexOf(':');
    if (i < 0) usage(`-H ${h}: expected 'Name: value'`);
    return { name: h.slice(0, i).trim(), value: h.slice(i + 1).trim() };
  });
  req.query = opts.query.map((q) => {
    const i = q.indexOf('=');
    return i < 0 ? { name: q, value: '' } : { name: q.slice(0, i), value: q.slice(i + 1) };
  });
  if (opts.json !== undefined) req.json = opts.json;
  else if (opts.text !== undefined) req.text = opts.text;
  else if (opts.bodyFile !== undefined) req.raw = fs.readFileSync(opts.bodyFile);
  if (opts.successCodes) req.successCodes = opts.successCodes;
  req.onFailure = opts.onFailure === 'continue' ? 'ON_FAILURE_CONTINUE' : 'ON_FAILURE_ABORT';
  if (opts.maxAttempts) req.retry = { maxAttempts: Number(opts.maxAttempts) };
  if (opts.attemptTimeout) {
    const millis = Math.round(Number(opts.attemptTimeout) * 1000);
    req.timeouts = { attempt: { seconds: String(Math.floor(millis / 1000)), nanos: (millis % 1000) * 1e6 } };
  }
  const mode = (opts.replyBody || 'auto').toLowerCase();
  if (!['auto', 'all', 'raw', 'none'].includes(mode)) usage(`--reply-body ${opts.replyBody}: auto, all, raw or none`);
  req.replyBody = `REPLY_BODY_${mode.toUpperCase()}`;
  req.extract = {};
  for (const e of opts.extract) {
    const i = e.indexOf('=');
    if (i < 0) usage(`--extract ${e}: expected NAME=JSONPATH`);
    req.extract[e.slice(0, i)] = e.slice(i + 1);
  }
  if (opts.successCondition) req.successCondition = opts.successCondition;
  if (opts.retryCondition) req.retryCondition = opts.retryCondition;
  req.vars = {};
  for (const v of opts.vars) {
    const i = v.indexOf('=');
    if (i < 0) usage(`--var ${v}: expected NAME=VALUE`);
    req.vars[v.slice(0, i)] = { stringValue: v.slice(i + 1) };
  }
  for (const v of opts.varsJson) {
    const i = v.indexOf('=');
    if (i < 0) usage(`--var-json ${v}: expected NAME=JSON`);
    let value;
    try {
      value = JSON.parse(v.slice(i + 1));
    } catch (e) {
      usage(`--var-json ${v.slice(0, i)}: not JSON: ${e.message}`);
    }
    req.vars[v.slice(0, i)] = jsToValue(value);
  }
  if (opts.asyncPoll) {
    req.asyncPoll = { enabled: true };
    if (opts.pollInterval) {
      const millis = Math.round(Number(opts.pollInterval) * 1000);
      req.asyncPoll.interval = { seconds: String(Math.floor(millis / 1000)), nanos: (millis % 1000) * 1e6 };
    }
  }
  return req;
}

// ------------------------------------------------------------------------------ calls

function deadline(opts) {
  return new Date(Date.now() + Number(opts.deadline) * 1000);
}

function execute(client, opts) {
  return new Promise((resolve) => {
    client.Execute(buildRequest(opts), { deadline: deadline(opts) }, (err, reply) => {
      if (err) return resolve(grpcError(err));
      printOutcome(reply);
      resolve(reply.proceed ? EXIT.proceed : EXIT.stop);
    });
  });
}

// Render: the request Execute would send (redacted) and the egress verdict; nothing sent. Exits
// 0 when the egress policy would let it out, 1 when not.
function render(client, opts) {
  return new Promise((resolve) => {
    client.Render(buildRequest(opts), { deadline: deadline(opts) }, (err, r) => {
      if (err) return resolve(grpcError(err));
      console.log(`request: ${r.method} ${r.url}`);
      for (const h of r.headers || []) console.log(`header: ${h.name}: ${h.value}`);
      console.log(`body_bytes: ${r.bodySize || 0}`);
      const e = r.egress || {};
      console.log(`egress: allowed=${!!e.allowed} target=${e.target || ''} dialled=${e.dialled || ''}`);
      for (const a of e.addresses || []) {
        console.log(`address: ${a.address} allowed=${!!a.allowed} ${a.reason || ''}`.trimEnd());
      }
      const proxy = r.proxy || {};
      console.log(`proxy: used=${!!proxy.used} ${proxy.url || ''}`.trimEnd());
      const policy = r.policy || {};
      console.log(`policy: max_attempts=${policy.maxAttempts || 0} success_codes=${policy.successCodes || ''}`);
      resolve(e.allowed ? EXIT.proceed : EXIT.stop);
    });
  });
}

function stream(client, opts) {
  return new Promise((resolve) => {
    let chunks = [];
    let received = 0;
    let contentType = '';
    let completed = null;
    let failed = null;
    const call = client.ExecuteStream(buildRequest(opts), { deadline: deadline(opts) });
    call.on('data', (event) => {
      const e = event[event.event];
      switch (event.event) {
        case 'accepted':
          console.log(`event: accepted action_id=${e.actionId}`);
          break;
        case 'attemptStarted':
          console.log(`event: attemptStarted attempt=${e.attempt}`);
          chunks = [];
          received = 0;
          contentType = '';
          break;
        case 'responseHead': {
          console.log(`event: responseHead attempt=${e.attempt} status=${e.status} reason=${e.reason}`);
          console.log(timingLine('  head timing:', e.timing));
          const ct = (e.headers || []).find((h) => h.name.toLowerCase() === 'content-type');
          contentType = ct ? ct.value : '';
          break;
        }
        case 'bodyChunk': {
          const data = e.data || Buffer.alloc(0);
          console.log(`event: bodyChunk attempt=${e.attempt} offset=${e.offset || 0} bytes=${data.length}`);
          if (Number(e.offset || 0) !== received) {
            failed = `chunk offset ${e.offset} but ${received} bytes received so far`;
          }
          chunks.push(data);
          received += data.length;
          break;
        }
        case 'attemptFailed':
          console.log(
            `event: attemptFailed attempt=${e.attempt} error=${e.error && e.error.kind} ` +
              `will_retry=${Boolean(e.willRetry)} backoff=${ms(e.backoff)}`,
          );
          break;
        case 'completed':
          console.log(`event: completed outcome=${e.result.outcome}`);
          completed = e.result;
          break;
        default:
          console.log(`event: unknown ${event.event}`);
      }
    });
    call.on('error', (err) => resolve(grpcError(err)));
    call.on('end', () => {
      if (failed) {
        console.log(`error: ${failed}`);
        return resolve(EXIT.grpc);
      }
      if (!completed) {
        console.log('error: the stream ended without a completed event');
        return resolve(EXIT.grpc);
      }
      printOutcome(completed);
      const body = Buffer.concat(chunks);
      console.log(`body_bytes: ${body.length}`);
      if (contentType.toLowerCase().includes('json')) console.log(`body_json: ${compact(JSON.parse(body))}`);
      resolve(completed.proceed ? EXIT.proceed : EXIT.stop);
    });
  });
}

// One reply as the JSON line both clients print.
function batchLine(reply) {
  const line = { action_id: reply.actionId, outcome: reply.outcome, proceed: Boolean(reply.proceed) };
  if (reply.error) line.error = `${reply.error.kind}: ${reply.error.message}`;
  const r = reply.response;
  if (r) {
    line.status = r.status || 0;
    if (r.bodyJson) line.body_json = valueToJs(r.bodyJson);
    else if (r.bodyText !== undefined && r.bodyText !== null) line.body_text = r.bodyText;
  }
  return compact(line);
}

function batch(client, opts) {
  const source = opts.file && opts.file !== '-' ? opts.file : 0; // 0: stdin
  const requests = [];
  const lines = fs.readFileSync(source, 'utf8').split('\n');
  for (let i = 0; i < lines.length; i++) {
    if (!lines[i].trim()) continue;
    try {
      const action = JSON.parse(lines[i]);
      if (!action || typeof action !== 'object' || Array.isArray(action)) throw new Error('not a JSON object');
      requests.push(action);
    } catch (err) {
      console.log(`line ${i + 1}: not an action: ${err.message}`);
      return Promise.resolve(EXIT.usage);
    }
  }
  return new Promise((resolve) => {
    let worst = EXIT.proceed;
    const call = client.ExecuteBatch({ deadline: deadline(opts) });
    call.on('data', (reply) => {
      console.log(batchLine(reply));
      if (reply.error && reply.error.kind === 'ERROR_KIND_INVALID_REQUEST') worst = Math.max(worst, EXIT.invalid);
      else if (!reply.proceed) worst = Math.max(worst, EXIT.stop);
    });
    // Every call ends with a status, after its messages; 'error' repeats a non-OK one.
    call.on('error', () => {});
    call.on('status', (status) => {
      resolve(status.code === grpc.status.OK ? worst : Math.max(worst, grpcError(status)));
    });
    for (const request of requests) call.write(request);
    call.end();
  });
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const HttpActionService = loadService();
  const client = new HttpActionService(opts.target, grpc.credentials.createInsecure());
  const commands = { execute, stream, batch, render };
  try {
    return await commands[opts.command](client, opts);
  } finally {
    client.close();
  }
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    console.error(err);
    process.exitCode = EXIT.grpc;
  },
);

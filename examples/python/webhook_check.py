#!/usr/bin/env python3
"""Checks callout's Standard Webhooks signatures with the spec's reference library.

  webhook_check.py --target HOST:PORT --upstream http://HOST:PORT

The upstream is examples/echo_upstream.rs, which echoes each request's headers and body as
JSON. callout signs each attempt (signing.standard_webhooks); the `standardwebhooks` package
(PyPI, the reference implementation of standardwebhooks.com) verifies what arrived, and refuses
it once the body is altered. Prints one line per check and exits 0 when all pass, 1 otherwise.
Used by examples/polyglot_test.sh.
"""

import argparse
import base64
import json
import os
import shutil
import sys
import tempfile

import grpc
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from callout_client import DEFAULT_PROTO_DIR, load_stubs  # noqa: E402

RESULTS = []
SECRET = "whsec_" + base64.b64encode(b"polyglot-webhook-signing-key-32b").decode()


def check(name, ok, detail=""):
    RESULTS.append(ok)
    print(f"{'ok  ' if ok else 'FAIL'} - {name}{': ' + detail if detail and not ok else ''}")


def echoed(reply):
    """The echo upstream's view of the last attempt: its headers (a dict) and body (bytes)."""
    echo = json.loads(reply.response.body)
    return {name: value for name, value in echo["headers"]}, echo["body"].encode()


def run(pb, stub, args):
    signing = pb.Signing(standard_webhooks=pb.StandardWebhooks(secret=SECRET))
    body = json.dumps({"type": "invoice.paid", "id": "in_1"})
    # The second path answers 503 and is retried: the reply echoes the last attempt, signed anew.
    for path, attempts in (("/hooks/orders", 1), ("/status/503", 2)):
        req = pb.ExecuteHttpActionRequest(
            action_id="evt_polyglot_1",
            method="POST",
            url=args.upstream + path,
            json=body,
            signing=signing,
            retry=pb.RetryPolicy(max_attempts=attempts),
            # The echo's raw bytes: the check parses them itself.
            reply_body=pb.REPLY_BODY_RAW,
        )
        reply = stub.Execute(req, timeout=args.deadline)
        headers, sent = echoed(reply)
        check(f"{path}: webhook-id is the action_id", headers.get("webhook-id") == "evt_polyglot_1")
        try:
            Webhook(SECRET).verify(sent, headers)
            check(f"{path}: the reference library verifies the signature", True)
        except WebhookVerificationError as err:
            check(f"{path}: the reference library verifies the signature", False, str(err))
        try:
            Webhook(SECRET).verify(sent + b" ", headers)
            check(f"{path}: an altered body is refused", False, "verified")
        except WebhookVerificationError:
            check(f"{path}: an altered body is refused", True)


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
            run(pb, pb_grpc.HttpActionServiceStub(channel), args)
    finally:
        shutil.rmtree(stubs_dir, ignore_errors=True)
    failed = RESULTS.count(False)
    print(f"all {len(RESULTS)} checks passed" if not failed else f"{failed} of {len(RESULTS)} checks failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

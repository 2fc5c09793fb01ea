#!/usr/bin/env python3
"""Runs every grpcurl command of README.md, verbatim, against a fresh sidecar and echo upstream.

The README's commands are the first thing a new user runs, so a README edit is tested here:
examples/readme_test.sh installs grpcurl and builds the binaries, then runs this script.

What is run: every command in a ```sh (or bash, shell) block of README.md whose first word is
`grpcurl`, lines joined at a trailing backslash, in README order, against one sidecar (so a
command may use state an earlier one made, e.g. an action it submitted).

The one rewrite: the README's addresses are the quick start's fixed ports, and a test must not
take fixed ports. `127.0.0.1:50051` (the sidecar) and `127.0.0.1:8080` (the echo upstream) are
replaced with the addresses the two processes actually bound (port 0, read from their logs).
Nothing else in a command is changed.

What is checked, from the comment lines right above a command (its description in the README):
- each `backticked` fragment of the description is in the command's output (whitespace is
  ignored on both sides, since grpcurl prints JSON reformatted);
- a description naming a gRPC status code (INVALID_ARGUMENT, NOT_FOUND, …) expects grpcurl to
  fail with that code; any other command must exit 0;
- no output says a type "is not recognized" (a status detail reflection could not resolve);
- a command without fragments gets a default check for its method (an Execute reply has an
  `outcome`, a stream has `accepted` and `completed`, `list` names the action service …).

A description line `# readme-test: skip` skips the command after it (for one that needs state
the README cannot make, e.g. a real token): use sparingly, and say why on the same line.

Also checked: no shell command of the README starts with a bare `callout` unless the README
says how to install it (`cargo install --path .`).

Ends with `N passed, M failed`; exits non-zero on any failure.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

GRPC_ADDR = "127.0.0.1:50051"
UPSTREAM_ADDR = "127.0.0.1:8080"
SKIP = "readme-test: skip"
CALL_TIMEOUT = 60
CODES = {
    "CANCELLED": "Canceled",
    "UNKNOWN": "Unknown",
    "INVALID_ARGUMENT": "InvalidArgument",
    "DEADLINE_EXCEEDED": "DeadlineExceeded",
    "NOT_FOUND": "NotFound",
    "ALREADY_EXISTS": "AlreadyExists",
    "PERMISSION_DENIED": "PermissionDenied",
    "RESOURCE_EXHAUSTED": "ResourceExhausted",
    "FAILED_PRECONDITION": "FailedPrecondition",
    "ABORTED": "Aborted",
    "OUT_OF_RANGE": "OutOfRange",
    "UNIMPLEMENTED": "Unimplemented",
    "INTERNAL": "Internal",
    "UNAVAILABLE": "Unavailable",
    "DATA_LOSS": "DataLoss",
    "UNAUTHENTICATED": "Unauthenticated",
}


class Command:
    def __init__(self, line, text, description):
        self.line = line
        self.text = text
        self.description = description

    def skipped(self):
        return any(SKIP in d for d in self.description)


def shell_commands(readme):
    """Every command of the README's shell blocks, with its line and description."""
    commands = []
    in_block = False
    description = []
    pending, start = None, 0
    for number, raw in enumerate(readme.splitlines(), 1):
        line = raw.rstrip()
        if not in_block:
            if re.match(r"^```(sh|bash|shell)\s*$", line):
                in_block, description = True, []
            continue
        if pending is not None:
            pending += "\n" + line
            if not line.endswith("\\"):
                commands.append(Command(start, pending, description))
                pending, description = None, []
            continue
        stripped = line.strip()
        if stripped.startswith("```"):
            in_block = False
        elif not stripped:
            description = []
        elif stripped.startswith("#"):
            description.append(stripped)
        elif line.endswith("\\"):
            pending, start = line, number
        else:
            commands.append(Command(number, line, description))
            description = []
    return commands


def squash(text):
    return re.sub(r"\s+", "", text)


def expectations(command):
    """(gRPC code name or None, fragments that must be in the output)."""
    described = " ".join(command.description)
    fragments = re.findall(r"`([^`]+)`", described)
    codes = [c for c in CODES if re.search(rf"\b{c}\b", described)]
    code = codes[0] if codes else None
    if not fragments and code is None:
        text = command.text
        if re.search(r"HttpActionService/ExecuteStream\b", text):
            fragments = ['"accepted"', '"completed"']
        elif re.search(r"HttpActionService/Execute\b", text):
            fragments = ['"outcome"']
        elif "Health/Check" in text:
            fragments = ['"SERVING"']
        elif re.search(r"\blist\s*$", text):
            fragments = ["callout.v1.HttpActionService"]
        elif m := re.search(r"\bdescribe\s+(\S+)", text):
            fragments = [m.group(1).rsplit(".", 1)[-1]]
    return code, fragments


def wait_for_address(log_path, pattern, proc, what):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            text = re.sub(r"\x1b\[[0-9;]*m", "", f.read())
        if m := re.search(pattern, text):
            return m.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    with open(log_path, encoding="utf-8", errors="replace") as f:
        sys.stderr.write(f"{what} did not start; its log:\n{f.read()}\n")
    raise SystemExit(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", default="README.md")
    parser.add_argument("--callout", default="target/debug/callout", help="the callout binary")
    parser.add_argument("--echo", default="target/debug/examples/echo_upstream", help="the echo upstream")
    parser.add_argument("--grpcurl-dir", default="", help="a directory holding grpcurl, put first on PATH")
    args = parser.parse_args()

    with open(args.readme, encoding="utf-8") as f:
        readme = f.read()
    commands = shell_commands(readme)
    passed = failed = 0

    def ok(what):
        nonlocal passed
        passed += 1
        print(f"ok   - {what}")

    def fail(what, output=""):
        nonlocal failed
        failed += 1
        print(f"FAIL - {what}")
        for line in output.splitlines()[:40]:
            print(f"    | {line[:300]}")

    installs = "cargo install --path ." in readme
    for c in commands:
        if re.match(r"^(\S+=\S+\s+)*callout\s", c.text.strip()) and not installs:
            fail(f"{os.path.basename(args.readme)}:{c.line}: a bare `callout` command, but the README installs none: {c.text.strip()[:80]}")

    grpcurls = [c for c in commands if c.text.strip().startswith("grpcurl ")]
    if not grpcurls:
        fail(f"no grpcurl command found in {args.readme} (did the extraction break?)")

    env = dict(os.environ)
    if args.grpcurl_dir:
        env["PATH"] = args.grpcurl_dir + os.pathsep + env.get("PATH", "")
    work = tempfile.mkdtemp(prefix="callout-readme.")
    procs = []
    try:
        echo_log = os.path.join(work, "echo.log")
        with open(echo_log, "w") as log:
            echo = subprocess.Popen([args.echo, "--listen", "127.0.0.1:0"], stdout=log, stderr=log)
        procs.append(echo)
        upstream = wait_for_address(echo_log, r"listening on http://(127\.0\.0\.1:\d+)", echo, "echo_upstream")
        callout_log = os.path.join(work, "callout.log")
        with open(callout_log, "w") as log:
            sidecar = subprocess.Popen(
                # The durable store goes in the scratch dir, not the checkout (the README's own
                # default is callout-data/ under the working directory).
                [args.callout, "serve", "--allow-private-networks", "--listen", "127.0.0.1:0",
                 "--metrics-listen", "127.0.0.1:0", "--store", f"sqlite:{work}/actions.db"],
                stdout=log, stderr=log, env={**env, "RUST_LOG": "info"},
            )
        procs.append(sidecar)
        grpc = wait_for_address(callout_log, r"callout serving listen=(127\.0\.0\.1:\d+)", sidecar, "callout")
        print(f"sidecar on {grpc} (for {GRPC_ADDR}), echo upstream on {upstream} (for {UPSTREAM_ADDR})")

        for c in grpcurls:
            where = f"{os.path.basename(args.readme)}:{c.line}"
            if c.skipped():
                print(f"skip - {where}: {' '.join(c.description)}")
                continue
            text = c.text.replace(GRPC_ADDR, grpc).replace(UPSTREAM_ADDR, upstream)
            code, fragments = expectations(c)
            try:
                run = subprocess.run(["bash", "-c", text], capture_output=True, text=True,
                                     timeout=CALL_TIMEOUT, env=env)
                output, rc = run.stdout + run.stderr, run.returncode
            except subprocess.TimeoutExpired:
                fail(f"{where}: no answer in {CALL_TIMEOUT} s")
                continue
            summary = " ".join(c.text.split())[:90]
            problems = []
            if code is None and rc != 0:
                problems.append(f"exit status {rc}, want 0")
            if code is not None and (rc == 0 or f"Code: {CODES[code]}" not in output):
                problems.append(f"want status {code} (Code: {CODES[code]}), got exit status {rc}")
            if "is not recognized" in output:
                problems.append("a type is not recognized (reflection lacks its descriptor)")
            for fragment in fragments:
                if squash(fragment) not in squash(output):
                    problems.append(f"output lacks {fragment}")
            if problems:
                fail(f"{where}: {summary}: " + "; ".join(problems), output)
            else:
                ok(f"{where}: {summary}")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

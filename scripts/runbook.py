#!/usr/bin/env python3
"""Runs the operator runbook in docs/RUNBOOK.md verbatim against the demo and checks every answer.

Use `scripts/runbook.sh` (it installs grpcurl 1.8.6 and builds the binaries first). Python 3.11,
standard library only.

Conventions in docs/RUNBOOK.md (kept unobtrusive so the file reads as a normal walk-through):

* The runbook is every part of docs/RUNBOOK.md between `<!-- runbook -->` and `<!-- /runbook -->`.
* `<!-- runbook: demo ARGS -->` (re)starts the demo there: `target/debug/yidi-demo run ARGS` with a
  fresh temporary `--dir` (the runbook's `scripts/demo.sh ARGS`) on the default ports (it fails
  if one is taken), and waits until it is ready and every port answers SERVING to the gRPC health
  check. A running
  demo is stopped first (SIGTERM) and must exit with 0; so must the last one at the end.
* Inside the runbook, every fenced ```sh block is run, in order, in ONE bash session (variables and
  functions carry over), in a scratch folder where `var/demo` is the demo's folder, as the runbook's
  `var/demo` is for `scripts/demo.sh` run at the repository root (paths in the blocks are relative
  to the repository root, never to docs/; `target/debug` there is the binaries' folder). stdout
  and stderr are merged.
* A fenced block that follows a ```sh block with nothing but blank lines between is its answer
  (any info string: json, text or none). A ```sh block without an answer must print nothing.
* Comparison: the leading JSON values of both texts (grpcurl's pretty output or compact JSON) are
  compared as JSON (object key order and layout do not matter); whatever text follows (an error, a
  `list`) is compared line by line with runs of whitespace collapsed.
* Placeholders in an answer stand for what differs per run: `<uuid>`, `<time>` (RFC 3339, UTC),
  `<serial>` (a producer's card serial, drawn at random so serials cannot be enumerated, C2/C4) and
  `<sequence>` (a position in the registry's ordered log, which registrations and imports share).
  A named one, `<serial:NAME>`, `<uuid:NAME>`, matches any value the first time and the same value
  every later time. Nothing else is normalised.

Exits 0 when every answer matches; otherwise prints a diff of the first mismatch and exits 1.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNBOOK = ROOT / "docs" / "RUNBOOK.md"
DEMO_PORTS = (50051, 50052, 50053, 50054, 50056)
COMMAND_TIMEOUT_S = 180  # the dead-letter block waits out a retry budget (~1-1.5 min)
DEMO_START_TIMEOUT_S = 120
PORT_WAIT_S = 90

PLACEHOLDER_PATTERNS = {
    "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    "time": r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z",
    "serial": r"[A-Z]{2}\d{10}",
    "sequence": r"\d+",
}
PLACEHOLDER = re.compile(r"<(" + "|".join(PLACEHOLDER_PATTERNS) + r")(?::([A-Za-z0-9_-]+))?>")


@dataclass
class Step:
    line: int
    command: str | None = None  # a ```sh block
    answer: str | None = None  # its answer block, if any
    demo_args: list[str] | None = None  # a `<!-- runbook: demo ... -->` directive


def parse_runbook(text: str, name: str = "docs/RUNBOOK.md") -> list[Step]:
    """The steps of every runbook section of `text` (the file `name`, for messages), in order."""
    steps: list[Step] = []
    lines = text.splitlines()
    inside = False
    # Whether the last non-blank thing was a ```sh block, so that a fence now opens its answer.
    after_command = False
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped.startswith("```"):
            info = stripped[3:].strip()
            opening = i
            body, i = read_fence(lines, i, name)
            if inside and info == "sh":
                steps.append(Step(line=opening + 1, command=body))
            elif inside and after_command:
                steps[-1].answer = body
            after_command = inside and info == "sh"
        elif stripped == "<!-- runbook -->":
            inside = True
        elif stripped == "<!-- /runbook -->":
            inside = after_command = False
        elif inside and (m := re.fullmatch(r"<!-- runbook: demo(.*?)-->", stripped)):
            steps.append(Step(line=i + 1, demo_args=m.group(1).split()))
            after_command = False
        elif stripped:
            after_command = False
        i += 1
    if inside:
        raise SystemExit(f"{name}: a <!-- runbook --> section is not closed")
    return steps


def read_fence(lines: list[str], start: int, name: str) -> tuple[str, int]:
    """The body of the fenced block opening at `start`, and the index of its closing fence."""
    body = []
    for j in range(start + 1, len(lines)):
        if lines[j].strip() == "```":
            return "\n".join(body), j
        body.append(lines[j])
    raise SystemExit(f"{name}:{start + 1}: a fenced block is not closed")


# ---------------------------------------------------------------------------------------------
# Comparison


def split_json(text: str) -> tuple[list, str]:
    """The JSON values at the start of `text` and the text after them."""
    decoder = json.JSONDecoder()
    values = []
    rest = text.lstrip()
    while rest[:1] in ("{", "["):
        try:
            value, end = decoder.raw_decode(rest)
        except json.JSONDecodeError:
            break
        values.append(value)
        rest = rest[end:].lstrip()
    return values, rest


class Matcher:
    """Matches expected strings (with placeholders) against actual ones; remembers named values."""

    def __init__(self) -> None:
        self.bound: dict[str, str] = {}

    def match(self, expected: str, actual: str) -> bool:
        parts = []
        names = []
        pos = 0
        for m in PLACEHOLDER.finditer(expected):
            parts.append(re.escape(expected[pos : m.start()]))
            kind, name = m.group(1), m.group(2)
            key = f"{kind}:{name}" if name else None
            if key and key in self.bound:
                parts.append(re.escape(self.bound[key]))
            else:
                parts.append(f"({PLACEHOLDER_PATTERNS[kind]})")
                names.append(key)
            pos = m.end()
        parts.append(re.escape(expected[pos:]))
        found = re.fullmatch("".join(parts), actual)
        if not found:
            return False
        for key, value in zip(names, found.groups()):
            if key:
                self.bound.setdefault(key, value)
        return True

    def json(self, expected, actual):
        """Whether the values match, and `actual` with every matched placeholder put back (for diffs)."""
        if isinstance(expected, str) and isinstance(actual, str):
            ok = self.match(expected, actual)
            return ok, expected if ok else actual
        if isinstance(expected, dict) and isinstance(actual, dict):
            ok = expected.keys() == actual.keys()
            shown = {}
            for key, value in actual.items():
                if key in expected:
                    same, shown[key] = self.json(expected[key], value)
                    ok = ok and same
                else:
                    shown[key] = value
            return ok, shown
        if isinstance(expected, list) and isinstance(actual, list):
            ok = len(expected) == len(actual)
            shown = []
            for index, value in enumerate(actual):
                if index < len(expected):
                    same, value = self.json(expected[index], value)
                    ok = ok and same
                shown.append(value)
            return ok, shown
        return expected == actual and type(expected) is type(actual), actual


def text_lines(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.strip().splitlines() if line.strip()]


def compare(matcher: Matcher, expected: str, actual: str) -> tuple[bool, str, str]:
    """Whether `actual` answers as `expected` says; both rendered alike for a diff."""
    expected_values, expected_rest = split_json(expected)
    actual_values, actual_rest = split_json(actual)
    ok, shown = matcher.json(expected_values, actual_values)
    expected_lines = text_lines(expected_rest)
    actual_lines = text_lines(actual_rest)
    ok = ok and len(expected_lines) == len(actual_lines)
    shown_lines = []
    for index, line in enumerate(actual_lines):
        if index < len(expected_lines) and matcher.match(expected_lines[index], line):
            shown_lines.append(expected_lines[index])
        else:
            ok = False
            shown_lines.append(line)

    def render(values, lines):
        return [json.dumps(v, indent=2, ensure_ascii=False) for v in values] + lines

    return ok, "\n".join(render(expected_values, expected_lines)), "\n".join(render(shown, shown_lines))


# ---------------------------------------------------------------------------------------------
# The demo and the shell


def bindable(port: int) -> bool:
    """Whether a server could bind `port` now (with SO_REUSEADDR, as the services do)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for_free_ports() -> None:
    """Fails at once if a demo port has a listener; waits while one is held only for a while.

    The demo's ports lie in Linux's ephemeral range: a connection another program made from one
    of them (the test suite makes thousands) blocks binding it for up to 60 s in TIME_WAIT."""
    for port in DEMO_PORTS:
        with socket.socket() as probe:
            probe.settimeout(0.5)
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                raise SystemExit(
                    f"port {port} is taken: the runbook needs the demo's ports 50051-50054 and 50056 free "
                    "(is scripts/demo.sh running?)"
                )
    deadline = time.monotonic() + PORT_WAIT_S
    while busy := [port for port in DEMO_PORTS if not bindable(port)]:
        if time.monotonic() > deadline:
            raise SystemExit(f"ports {busy} stayed in use for {PORT_WAIT_S} s (ss -tan shows by whom)")
        print(f"runbook: waiting for ports {busy} (in use by a closed connection: TIME_WAIT)")
        time.sleep(5)


# The bureau on each demo port: its id is the TLS name its certificate carries.
PORT_BUREAUS = {
    50051: "station-hangzhou",
    50052: "home-jiangxi",
    50053: "producer-zhejiang",
    50054: "registry-national",
    50056: "home-sichuan",
}


def serving(port: int, certs: Path | None = None) -> bool:
    """Whether the service on `port` answers SERVING to the standard health check; over mutual TLS
    (as the bureau's read-only operator) when the demo's `certs` folder is given."""
    if certs is None:
        transport = ["-plaintext"]
    else:
        operator = certs / f"op-{PORT_BUREAUS[port]}-read"
        transport = ["-cacert", str(certs / "ca.pem"), "-cert", f"{operator}.pem", "-key", f"{operator}.key",
                     "-authority", PORT_BUREAUS[port]]
    check = subprocess.run(
        ["grpcurl", *transport, "-max-time", "2", f"127.0.0.1:{port}", "grpc.health.v1.Health/Check"],
        capture_output=True,
        text=True,
    )
    return check.returncode == 0 and '"SERVING"' in check.stdout


class Demo:
    def __init__(self, binary: Path, dir: Path, args: list[str], log: Path) -> None:
        self.dir = dir
        self.log = log
        wait_for_free_ports()
        self.process = subprocess.Popen(
            [str(binary), "run", "--dir", str(dir), *args],
            stdin=subprocess.DEVNULL,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        # The demo says it is ready once every bureau answers SERVING; no port is probed before,
        # because a probe's own ephemeral port could be a demo port not bound yet.
        deadline = time.monotonic() + DEMO_START_TIMEOUT_S
        while "Ctrl-C stops every service." not in log.read_text(errors="replace"):
            if self.process.poll() is not None:
                raise SystemExit(f"the demo exited at start ({self.process.returncode}):\n{self.tail()}")
            if time.monotonic() > deadline:
                os.killpg(self.process.pid, signal.SIGKILL)  # the bureaus too, not only the demo
                raise SystemExit(f"the demo did not start in {DEMO_START_TIMEOUT_S} s:\n{self.tail()}")
            time.sleep(0.2)
        certs = dir / "certs" if "--tls" in args else None
        not_serving = [port for port in DEMO_PORTS if not serving(port, certs)]
        if not_serving:
            self.stop()
            raise SystemExit(f"the demo started, but ports {not_serving} do not answer SERVING:\n{self.tail()}")

    def tail(self) -> str:
        """The end of the demo's output, without backtrace frames (RUST_BACKTRACE=1 buries the error)."""
        frame = re.compile(r"^\s+(\d+: |at )")
        lines = [line for line in self.log.read_text(errors="replace").splitlines() if not frame.match(line)]
        return "\n".join(lines[-30:])

    def stop(self) -> int:
        """SIGTERM, then the exit code. A bureau the runbook paused (kill -STOP) is resumed first."""
        for pid_file in self.dir.glob("*.pid"):
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGCONT)
            except (ValueError, ProcessLookupError, PermissionError):
                pass
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return -1


def start_demo(binary: Path, dir: Path, args: list[str], log: Path) -> Demo:
    """Starts the demo; once more if a bureau still found its port in use (see wait_for_free_ports)."""
    try:
        return Demo(binary, dir, args, log)
    except SystemExit as error:
        logs = " ".join(path.read_text(errors="replace") for path in dir.glob("*.log"))
        if "Address already in use" not in logs:
            raise
        print(f"runbook: a demo port was in use at start; starting again in 3 s:\n{error}")
        time.sleep(3)
        shutil.rmtree(dir)
        dir.mkdir(parents=True)
        return Demo(binary, dir, args, log)


class Shell:
    """One bash session; each command's merged output is read up to a random end marker."""

    def __init__(self, cwd: Path) -> None:
        self.marker = f"__runbook_end_{secrets.token_hex(8)}__"
        self.process = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def run(self, command: str) -> str:
        # Braces keep assignments in this shell; commands read no input (stdin is the script).
        script = f"{{\n{command}\n}} < /dev/null 2>&1\nprintf '%s\\n' '{self.marker}'\n"
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(script.encode())
        self.process.stdin.flush()
        output = b""
        end = self.marker.encode() + b"\n"
        deadline = time.monotonic() + COMMAND_TIMEOUT_S
        fd = self.process.stdout.fileno()
        while not output.endswith(end):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(output.decode(errors="replace"))
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise EOFError(output.decode(errors="replace"))
                output += chunk
        return output[: -len(end)].decode(errors="replace")

    def close(self) -> None:
        # Ends the session and anything it left running (its own process group only).
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)


# ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runbook", type=Path, default=RUNBOOK, help="the Markdown file holding the runbook")
    parser.add_argument("--bin-dir", type=Path, default=Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (demo logs, databases)")
    args = parser.parse_args()

    for tool in ("grpcurl", "jq", "bash"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not on PATH (scripts/runbook.sh installs grpcurl)")
    version = subprocess.run(["grpcurl", "-version"], capture_output=True, text=True)
    print(f"runbook: {(version.stdout + version.stderr).strip()}; {args.runbook}")
    binary = args.bin_dir / "yidi-demo"
    if not binary.exists():
        raise SystemExit(f"{binary} not found: cargo build --workspace --bins")

    path = args.runbook.resolve()
    name = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    steps = parse_runbook(path.read_text(), name)
    if not any(s.command for s in steps) or steps[0].demo_args is None:
        raise SystemExit(f"{name}: the runbook must start with <!-- runbook: demo ... --> and hold ```sh blocks")

    scratch = Path(tempfile.mkdtemp(prefix="yidi-runbook-"))
    demo_dir = scratch / "var" / "demo"
    # Blocks name the suite's other binaries as from the repository root (`target/debug/yidi-check`).
    (scratch / "target").mkdir()
    (scratch / "target" / "debug").symlink_to(args.bin_dir.resolve(), target_is_directory=True)
    matcher = Matcher()
    demo: Demo | None = None
    shell = Shell(scratch)
    passed = 0
    failure: str | None = None
    started = time.monotonic()
    try:
        for step in steps:
            if step.demo_args is not None:
                if demo is not None:
                    code = demo.stop()
                    if code != 0:
                        failure = f"{name}:{step.line}: the demo exited with {code} on SIGTERM:\n{demo.tail()}"
                        break
                if demo_dir.exists():
                    shutil.rmtree(demo_dir)
                demo_dir.mkdir(parents=True)
                t = time.monotonic()
                demo = start_demo(binary, demo_dir, step.demo_args, scratch / f"demo-{step.line}.out")
                print(f"  demo    yidi-demo run {' '.join(step.demo_args)}  ({time.monotonic() - t:.1f} s)")
                continue
            assert step.command is not None
            t = time.monotonic()
            try:
                actual = shell.run(step.command)
            except (TimeoutError, EOFError) as error:
                failure = (
                    f"{name}:{step.line}: the command did not finish "
                    f"({'timed out' if isinstance(error, TimeoutError) else 'the shell ended'}):\n"
                    f"{step.command}\n--- output so far ---\n{error}"
                )
                break
            expected = step.answer if step.answer is not None else ""
            ok, want, got = compare(matcher, expected, actual)
            first_line = step.command.strip().splitlines()[0][:90]
            if not ok:
                diff = "\n".join(
                    difflib.unified_diff(
                        want.splitlines(), got.splitlines(), "runbook (expected)", "actual", lineterm=""
                    )
                )
                failure = (
                    f"{name}:{step.line}: the answer differs.\n--- command ---\n{step.command}\n"
                    f"--- diff (placeholders that matched are shown as in the runbook) ---\n{diff}\n"
                    f"--- actual output ---\n{actual}"
                )
                break
            passed += 1
            print(f"  ok      {first_line}  ({time.monotonic() - t:.1f} s)")
        if failure is None and demo is not None:
            code = demo.stop()
            demo = None
            if code != 0:
                failure = f"the last demo exited with {code} on SIGTERM"
    finally:
        shell.close()
        if demo is not None:
            demo.stop()
        if args.keep or failure:
            print(f"runbook: scratch folder kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    total = sum(1 for s in steps if s.command)
    if failure:
        print(f"\nFAILED {failure}", file=sys.stderr)
        print(f"runbook: {passed} passed, 1 failed ({total} blocks, {time.monotonic() - started:.0f} s)")
        return 1
    print(f"runbook: {passed} passed, 0 failed ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

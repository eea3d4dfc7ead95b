"""Helpers of the `elision serve` tests: the CLI as a subprocess, Ray processes by ancestry, streamed events, and
the reference outputs of `elision run`. Every wait is bounded; every address is loopback."""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HOST = "127.0.0.1"
START_TIMEOUT_S = 240   # a Ray start on a loaded 2-core machine can take a minute; a hang must still fail
REQUEST_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def children_table() -> dict[int, list[int]]:
    table: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # the process ended while we looked
            table.setdefault(ppid, []).append(int(entry.name))
    return table


def descendants(pid: int) -> dict[int, str]:
    """{pid: command line} of every live process below `pid` (Linux /proc)."""
    table, found, todo = children_table(), {}, [pid]
    while todo:
        for child in table.get(todo.pop(), []):
            found[child] = _cmdline(child)
            todo.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def alive(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":  # a zombie has exited; only its parent's bookkeeping is left
            out.append(pid)
    return out


class ServeProcess:
    """`elision serve ARGS` in a subprocess; `start` returns once it prints its "serving ..." line."""

    def __init__(self, args: list[str], env: dict | None = None):
        self.args = args
        self.proc = subprocess.Popen([sys.executable, "-m", "elision.cli.main", "serve", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.banner = ""

    def start(self) -> "ServeProcess":
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            if ready:
                line = self.proc.stdout.readline()
                if line.startswith("serving "):
                    self.banner = line
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"elision serve exited with {self.proc.returncode}: {self.proc.stderr.read()[-3000:]}")
        self.kill()
        raise TimeoutError(f"elision serve did not start within {START_TIMEOUT_S} s")

    def stop(self, timeout_s: float = 120) -> tuple[int, str, str]:
        """SIGINT (Ctrl-C), then (exit code, stdout, stderr); killed if it does not exit in time."""
        self.proc.send_signal(signal.SIGINT)
        try:
            out, err = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        return self.proc.returncode, out, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=30)


def sse_events(response) -> list:
    """The `data:` payloads of a server-sent-event response, JSON-decoded ("[DONE]" kept as the string)."""
    events = []
    for line in response.iter_lines(decode_unicode=True):
        if line and line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def elision_run(artifact: Path, prompt: str, max_new_tokens: int, stop: list[str] | None = None) -> dict:
    """What `elision run DIR --prompt P -n N --json` prints (the reference every served greedy answer must equal)."""
    from typer.testing import CliRunner

    from elision.cli.main import app

    args = ["run", str(artifact), "--prompt", prompt, "-n", str(max_new_tokens), "--json"]
    for s in stop or []:
        args += ["--stop", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])

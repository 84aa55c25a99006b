"""Calls to the control API of the tun2socks running in the bed's client namespace (with curl,
inside that namespace: the API listens on its loopback)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.integration import bed as bedlib

API = "http://127.0.0.1:9090"
MIB = 1024 * 1024
URL = f"http://{bedlib.TARGET_IP}:{bedlib.HTTP_PORT}"
TARGET = f"{bedlib.TARGET_IP}:{bedlib.HTTP_PORT}"


@dataclass
class Reply:
    status: int
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    bed: bedlib.Bed,
    path: str,
    *,
    method: str = "GET",
    token: str | None = None,
    data: str | None = None,
    output: str | None = None,
    headers: tuple[str, ...] = (),
) -> Reply:
    args = ["curl", "-sS", "--max-time", "10", "-X", method, "-w", "\n%{http_code}"]
    for header in headers:
        args += ["-H", header]
    if token is not None:
        args += ["-H", f"Authorization: Bearer {token}"]
    if data is not None:
        args += ["-H", "Content-Type: application/json", "--data", data]
    if output is not None:
        args += ["-o", output]
    proc = bed.run_cli([*args, f"{API}{path}"], timeout=20)
    assert proc.returncode == 0, f"curl {method} {path}: exit {proc.returncode}: {proc.stderr}"
    body, _, status = proc.stdout.rpartition("\n")
    return Reply(int(status), body)


def get_json(bed: bedlib.Bed, path: str, token: str | None = None) -> Any:
    reply = call(bed, path, token=token)
    assert reply.status == 200, f"GET {path}: {reply.status} {reply.body[:300]}"
    return reply.json()


def wait_for(
    what: str, probe: Callable[[], Any], *, timeout: float = 15.0, interval: float = 0.2
) -> Any:
    """Poll until `probe()` returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def find_connection(bed: bedlib.Bed, token: str | None = None) -> dict[str, Any] | None:
    """The open flow to the bed's HTTP server, if any."""
    found = get_json(bed, "/connections", token)["connections"]
    return next((c for c in found if c["destination"] == TARGET), None)


def slow_download(bed: bedlib.Bed, size: int, rate: str) -> subprocess.Popen[str]:
    """A curl download at a limited rate (so it stays open), in the background: stop() it."""
    cmd = ["curl", "-sS", "--max-time", "60", "--limit-rate", rate, "-o", "/dev/null"]
    return subprocess.Popen(
        [*bed.cli_prefix(), *cmd, f"{URL}/bytes/{size}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def tun2socks_status(bed: bedlib.Bed, *args: str) -> subprocess.CompletedProcess[str]:
    return bed.run_cli([*bedlib.tun2socks_command(), "status", *args], timeout=30)


def python_in_client_ns(bed: bedlib.Bed, script: str, *args: str, timeout: float) -> Any:
    proc = bed.run_cli([sys.executable, script, *args], timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"{script}: rc {proc.returncode}, no output: {proc.stderr[-2000:]}"
    return json.loads(lines[-1])

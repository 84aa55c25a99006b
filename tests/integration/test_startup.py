"""The first start as a new user meets it (issue 13 item 3): tun2socks started with no proxy
listening says so at once, at the default log level, and says when the proxy comes.

The proxy is a real danted started late in the server namespace, on a port of its own.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration import apiclient, helpers_danted
from tests.integration import bed as bedlib
from tests.integration.httpserver import SMALL_BODY

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        bool(bedlib.missing_requirements()),
        reason="needs " + ", ".join(bedlib.missing_requirements()),
    ),
]

LATE_PORT = 1090  # nothing of the bed listens there
SUMMARY_WAIT_S = 2.0  # the bound: summary and warning this soon after the TUN is up
RECOVERY_WAIT_S = 45.0  # probes back off 1 s doubling to 30 s
URL = f"http://{bedlib.TARGET_IP}:{bedlib.HTTP_PORT}"


def curl(bed: bedlib.Bed, url: str, max_time: float = 10.0) -> subprocess.CompletedProcess[str]:
    """curl in the client namespace; its traffic follows the default route into the TUN."""
    return bed.run_cli(["curl", "-sS", "--max-time", str(max_time), url], timeout=max_time + 10)


@contextlib.contextmanager
def late_danted(bed: bedlib.Bed, workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """danted (no auth) on SRV_VETH_IP:LATE_PORT in the server namespace; stopped on exit."""
    conf = workdir / "danted-late.conf"
    log_path = workdir / "danted-late.log"
    conf.write_text(
        helpers_danted.bed_config(log_path, bedlib.SRV_VETH_IP, LATE_PORT, "none", by_name=False)
    )
    danted = bedlib.which("danted") or "danted"
    args = [danted, "-f", str(conf), "-p", str(workdir / "danted-late.pid"), "-N", "1"]
    with open(workdir / "danted-late.out", "wb") as out:
        process = subprocess.Popen(
            ["ip", "netns", "exec", bed.srv_ns, *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: the workers are stopped with it
        )
    try:
        deadline = time.monotonic() + bedlib.READY_TIMEOUT_S
        listening = f"{bedlib.SRV_VETH_IP}:{LATE_PORT} "
        while listening not in bed.run_srv(["ss", "-Hltn"], timeout=10).stdout:
            assert process.poll() is None, (workdir / "danted-late.out").read_text()
            assert time.monotonic() < deadline, "the late danted does not listen"
            time.sleep(0.1)
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def wait_for_line(t2s: bedlib.Tun2socks, pattern: str, deadline: float) -> str:
    while True:
        for line in t2s.log_text().splitlines():
            if re.search(pattern, line):
                return line
        assert t2s.process.poll() is None, t2s.log_tail()
        assert time.monotonic() < deadline, f"no line like {pattern!r}:\n{t2s.log_tail()}"
        time.sleep(0.05)


def test_missing_proxy_is_said_at_once_and_its_arrival_later(
    bed: bedlib.Bed, start_tun2socks: bedlib.StartTun2socks, artifact_dir: Path
) -> None:
    url = f"socks5://{bedlib.SRV_VETH_IP}:{LATE_PORT}"
    # log.level warning: the default, which must show the summary too
    t2s = start_tun2socks(extra={"proxy": {"url": url}, "log": {"level": "warning"}})
    deadline = time.monotonic() + SUMMARY_WAIT_S
    warning = wait_for_line(t2s, r" warning tun2socks\.summary: proxy .* is unreachable", deadline)
    assert f"proxy {url} is unreachable: connection refused" in warning
    summary = wait_for_line(t2s, r"tun2socks running: ", deadline)
    assert " info tun2socks.summary: " in summary
    for part in (
        f"device {bedlib.TUN_NAME} ({bedlib.TUN_IP}/24, {bedlib.TUN_IP6}/64), mtu {bed.mtu} ",
        f"proxy {url} did not answer a probe (connection refused)",
        "UDP through the proxy: unknown (the proxy is unreachable)",
        "DNS forwarder: forward mode",
        "API: http://127.0.0.1:9090/",
        "routes: not changed (route.auto: false)",
    ):
        assert part in summary, summary
    assert curl(bed, f"{URL}/small", max_time=5).returncode != 0  # no proxy: refused

    with late_danted(bed, artifact_dir):
        back = wait_for_line(
            t2s, r"proxy .* is reachable again", time.monotonic() + RECOVERY_WAIT_S
        )
        expected = f"info tun2socks.summary: proxy {url} is reachable again: answered a probe in"
        assert expected in back, back
        proc = curl(bed, f"{URL}/small")
        assert proc.returncode == 0 and proc.stdout == SMALL_BODY.decode(), proc.stderr
    # the proxy went away again: one line says so, once
    gone = wait_for_line(t2s, r"stopped answering", time.monotonic() + RECOVERY_WAIT_S)
    assert f"proxy {url} stopped answering: connection refused" in gone
    log = t2s.log_text()
    assert len(re.findall(r"proxy \S+ is unreachable:", log)) == 1, log
    assert len(re.findall(r"proxy \S+ is reachable again:", log)) == 1, log


def test_summary_says_udp_yes_with_a_working_proxy(
    bed: bedlib.Bed, start_tun2socks: bedlib.StartTun2socks
) -> None:
    t2s = start_tun2socks(extra={"log": {"level": "warning"}})
    summary = wait_for_line(t2s, r"tun2socks running: ", time.monotonic() + SUMMARY_WAIT_S)
    assert f"proxy {bed.proxy_url()} answered a probe in " in summary, summary
    assert "UDP through the proxy: yes (UDP ASSOCIATE accepted, relay " in summary, summary
    assert " warning " not in t2s.log_text(), t2s.log_text()
    # /stats (and /metrics, `tun2socks status`) show the probe's view
    probes = apiclient.get_json(bed, "/stats")["components"]["proxy_reachability"]
    assert probes == {"reachable": 1, "probes": 1, "changes": 0}, probes

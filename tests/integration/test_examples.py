"""The runnable examples run: examples/netns-demo.sh end to end, leaving nothing behind."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration import bed as bedlib

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "examples" / "netns-demo.sh"
DEMO_TIMEOUT_S = 180

missing = bedlib.missing_requirements()  # root, ip, danted, curl: what the demo needs too
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(bool(missing), reason="needs " + ", ".join(missing)),
]


def _host_state() -> str:
    """The host namespace's rules and routes, which the demo must never touch."""
    parts = [
        bedlib.run(["ip", *family, *what], timeout=10).stdout
        for family in (["-4"], ["-6"])
        for what in (["rule"], ["route", "show", "table", "all"])
    ]
    return "\n".join(parts)


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_netns_demo_runs_to_completion_and_leaves_nothing_behind(tmp_path: Path) -> None:
    demo_id = f"pytest{os.getpid()}"
    host_before = _host_state()
    env = dict(os.environ, DEMO_ID=demo_id, TMPDIR=str(tmp_path))
    proc = subprocess.run(
        ["bash", str(DEMO)],
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-2000:]
    assert "Hello through tun2socks!" in out  # the page, fetched through the TUN
    assert "-> 10.201.0.80:8000: connected through 10.200.0.2:1080" in out  # tun2socks' log
    assert "10.200.0.2 - - [" in out  # the web server saw the proxy, not the client
    assert "tun2socks exited with status 0" in out
    assert "-- table 7280: 0 routes" in out
    namespaces = bedlib.run(["ip", "netns", "list"], timeout=10).stdout
    assert demo_id not in namespaces
    assert not any(demo_id in p.name for p in Path("/etc/netns").glob("*"))
    # Its servers and tun2socks all had the work directory on their command lines.
    assert _processes_mentioning(demo_id) == _processes_mentioning(str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []  # its work directory is gone
    assert _host_state() == host_before


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_example_scripts_are_valid_shell() -> None:
    for script in (REPO / "examples").glob("*.sh"):
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, timeout=10)
        assert result.returncode == 0, (script, result.stderr)

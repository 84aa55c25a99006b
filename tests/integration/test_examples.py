"""The runnable examples run: examples/netns-demo.sh end to end (through a SOCKS5 server, then in
the bypass mode, direct://), leaving nothing behind, with the program that the README's set-up
command installed (a venv of the distribution's python3, which itself has none of the
dependencies); and it refuses at once, creating nothing, when something it needs is missing."""

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
SUDO_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

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


def _installed_tun2socks() -> str:
    """The program the README's set-up command installed, as sudo finds it."""
    found = shutil.which("tun2socks", path=SUDO_PATH)
    if found is None:
        message = "tun2socks is not installed: run the README's set-up command (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def _run_demo(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _demo_env(demo_id: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    """What sudo passes on: no PYTHONPATH, no pyenv, the system's `python3` first on PATH."""
    return {"PATH": SUDO_PATH, "DEMO_ID": demo_id, "TMPDIR": str(tmp_path), **extra}


def _demo_namespaces(demo_id: str) -> list[str]:
    listed = bedlib.run(["ip", "netns", "list"], timeout=10).stdout
    return [line for line in listed.splitlines() if demo_id in line]


def test_netns_demo_runs_the_installed_program_and_leaves_nothing_behind(tmp_path: Path) -> None:
    program = _installed_tun2socks()
    demo_id = f"pytest{os.getpid()}"
    host_before = _host_state()
    proc = _run_demo(["bash", str(DEMO)], _demo_env(demo_id, tmp_path))
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-2000:]
    assert f"== tun2socks: {program} (tun2socks " in out  # the installed one, not the checkout
    assert "Hello through tun2socks!" in out  # the page, fetched through the TUN
    assert "-> 10.201.0.80:8000: connected through 10.200.0.2:1080" in out  # tun2socks' log
    assert "10.200.0.2 - - [" in out  # the web server saw the proxy, not the client
    # Round 2, the bypass mode (direct://) with the SOCKS5 server stopped: the web server sees
    # the client itself, and a block rule resets at once (curl exit 7).
    assert "nothing listens on 10.200.0.2:1080 any more" in out
    assert "-> 10.201.0.80:8000: connected through direct" in out
    assert "10.200.0.1 - - [" in out
    assert "curl exit status 7" in out and "-> 10.201.0.80:22: blocked by rule 0" in out
    assert out.count("tun2socks exited with status 0") == 2
    assert out.count("-- table 7280: 0 routes") == 2
    assert _demo_namespaces(demo_id) == []
    assert not any(demo_id in p.name for p in Path("/etc/netns").glob("*"))
    # Its servers and tun2socks all had the work directory on their command lines.
    assert _processes_mentioning(demo_id) == _processes_mentioning(str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []  # its work directory is gone
    assert _host_state() == host_before


def test_netns_demo_without_danted_names_dante_server_and_creates_nothing(tmp_path: Path) -> None:
    program = _installed_tun2socks()
    danted = bedlib.which("danted")
    assert danted is not None
    not_a_program = tmp_path / "not-danted"  # not executable: as if danted were not installed
    not_a_program.write_bytes(b"")
    demo_id = f"pytest{os.getpid()}nodanted"
    work = tmp_path / "work"
    work.mkdir()
    # A mount namespace of its own hides danted from the demo and from nothing else.
    hide_danted = f"mount --bind {not_a_program} {danted} && exec bash {DEMO}"
    proc = _run_demo(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", hide_danted],
        _demo_env(demo_id, work, TUN2SOCKS=program),
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "danted (Debian package dante-server)" in proc.stderr
    assert _demo_namespaces(demo_id) == []
    assert list(work.iterdir()) == []  # not even its work directory


def test_netns_demo_without_a_working_program_says_how_to_install_it(tmp_path: Path) -> None:
    demo_id = f"pytest{os.getpid()}noprogram"
    proc = _run_demo(
        ["bash", str(DEMO)],
        _demo_env(demo_id, tmp_path, TUN2SOCKS=str(tmp_path / "no-such-tun2socks")),
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "run the README's set-up command, or set TUN2SOCKS" in proc.stderr
    assert _demo_namespaces(demo_id) == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_example_scripts_are_valid_shell() -> None:
    for script in (REPO / "examples").glob("*.sh"):
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, timeout=10)
        assert result.returncode == 0, (script, result.stderr)

"""A short run of each atheris harness in tests/fuzz/ (the long runs: tests/fuzz/README.md).

Each harness runs in its own process for a bounded number of inputs; a crash (an exception or
a failed check) makes libFuzzer exit non-zero and leaves the input in the test's directory.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FUZZ_DIR = REPO / "tests" / "fuzz"
# harness -> (inputs, extra libFuzzer flags); about 2-5 s each on a loaded 2-core machine.
RUNS = {
    "fuzz_packets.py": (6000, []),
    "fuzz_tcp_stack.py": (600, ["-max_len=1500", "-len_control=0"]),
    "fuzz_socks5_reply.py": (30000, []),
    "fuzz_config.py": (1200, []),
    "fuzz_dns.py": (2500, []),
}

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason="atheris not installed (pip install -e '.[fuzz]')",
)


def test_every_harness_is_run_here() -> None:
    assert sorted(p.name for p in FUZZ_DIR.glob("fuzz_*.py")) == sorted(RUNS)


@pytest.mark.parametrize("harness", sorted(RUNS))
def test_harness_short_run(harness: str, tmp_path: Path) -> None:
    runs, flags = RUNS[harness]
    command = [
        sys.executable,
        "-m",
        f"tests.fuzz.{harness.removesuffix('.py')}",
        f"-atheris_runs={runs}",
        f"-artifact_prefix={tmp_path}/",
        "-seed=1",  # reproducible in CI; the long runs use random seeds
        *flags,
    ]
    # the working tree's packages, whatever is installed (and whatever the current directory)
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'dns'}"}
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=180, cwd=tmp_path, env=env, check=False
    )
    tail = "\n".join(proc.stderr.splitlines()[-25:])
    assert proc.returncode == 0, f"{harness} crashed:\n{tail}"
    assert f"Done {runs} in" in proc.stderr, tail

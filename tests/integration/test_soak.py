"""Soak: a minute of bounded mixed traffic (TCP, UDP, DNS) with RSS and open fds flat
(soakrun.py).

60 s rather than the 2 minutes of the issue: the CI run's pytest step has a hard 13-minute
budget shared by every test. `python -m bench.soak` runs the same for 20 minutes. The bed has
dnsmasq (`Bed(dns=True)`), so this module has its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bed as bedlib
import conftest
import pytest
import soakrun

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        bool(bedlib.missing_requirements(dns=True)),
        reason="needs " + ", ".join(bedlib.missing_requirements(dns=True)),
    ),
]

DURATION_S = 60.0


@pytest.fixture(scope="module")
def dns_bed() -> Iterator[bedlib.Bed]:
    with bedlib.Bed(conftest.RUN_DIR / "bed-soak", dns=True) as the_bed:
        yield the_bed


def test_soak_keeps_rss_and_open_fds_flat(
    dns_bed: bedlib.Bed, artifact_dir: Path, request: pytest.FixtureRequest
) -> None:
    started: list[bedlib.Tun2socks] = []
    request.node.stash[conftest.STARTED_KEY] = started  # log tails in failure reports

    def start(**kwargs: Any) -> bedlib.Tun2socks:
        t2s = dns_bed.start_tun2socks(artifact_dir / "tun2socks.log", **kwargs)
        started.append(t2s)
        return t2s

    try:
        result = soakrun.run(dns_bed, start, DURATION_S)
    finally:
        dns_bed.stop_tun2socks()
    (artifact_dir / "soak.json").write_text(json.dumps(result, indent=1))
    brief = {k: v for k, v in result.items() if k != "samples"}
    assert result["tun2socks_alive"], brief
    traffic = result["traffic"]
    assert traffic.get("rounds", 0) >= 10 and traffic["failed"] == 0, brief
    assert result["rss"]["ok"], brief
    assert result["fds"]["ok"], brief
    assert result["bounded"]["ok"], brief

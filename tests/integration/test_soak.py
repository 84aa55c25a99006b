"""Soak: a minute of bounded mixed traffic (TCP, UDP, DNS) with RSS and open fds flat
(soakrun.py).

60 s rather than the 2 minutes of the issue: the CI run's pytest step has a hard 13-minute
budget shared by every test. `python -m bench.soak` runs the same for 20 minutes. The bed has
dnsmasq (the `dns_bed` fixture).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration import bed as bedlib
from tests.integration import soakrun

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        bool(bedlib.missing_requirements(dns=True)),
        reason="needs " + ", ".join(bedlib.missing_requirements(dns=True)),
    ),
]

DURATION_S = 60.0


def test_soak_keeps_rss_and_open_fds_flat(
    dns_bed: bedlib.Bed, start_dns_tun2socks: bedlib.StartTun2socks, artifact_dir: Path
) -> None:
    try:
        result = soakrun.run(dns_bed, start_dns_tun2socks, DURATION_S)
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

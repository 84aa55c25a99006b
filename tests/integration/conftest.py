"""Fixtures for the namespace tests: one bed per session (its servers are slow to start), one
tun2socks process per test (each test gets its own log under test-artifacts/, whose tail is
attached to the report of a failed test)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration import bed as bedlib

REPO = Path(__file__).resolve().parents[2]
RUN_DIR = REPO / "test-artifacts" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
STARTED_KEY = pytest.StashKey[list[bedlib.Tun2socks]]()


@pytest.fixture(scope="session")
def bed() -> Iterator[bedlib.Bed]:
    missing = bedlib.missing_requirements()
    if missing:
        pytest.skip("the namespace bed needs: " + ", ".join(missing))
    with bedlib.Bed(RUN_DIR / "bed") as the_bed:
        yield the_bed


@pytest.fixture
def artifact_dir(request: pytest.FixtureRequest) -> Path:
    path = RUN_DIR / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def dns_bed(request: pytest.FixtureRequest) -> Iterator[bedlib.Bed]:
    """A bed with dnsmasq (``Bed(dns=True)``, see dnsbed.py), one per test module: the client's
    resolv.conf names an address that exists nowhere, so names resolve only through
    tun2socks's DNS forwarder."""
    missing = bedlib.missing_requirements(dns=True)
    if missing:
        pytest.skip("the DNS bed needs: " + ", ".join(missing))
    module = request.module.__name__.rpartition(".")[2]
    with bedlib.Bed(RUN_DIR / f"bed-dns-{module}", dns=True) as the_bed:
        yield the_bed


def _starter(
    the_bed: bedlib.Bed, artifact_dir: Path, request: pytest.FixtureRequest
) -> Iterator[bedlib.StartTun2socks]:
    """Start (or restart with another config) the test's tun2socks on `the_bed`, each with its
    own log in the test's artifact directory; see Bed.start_tun2socks."""
    started = request.node.stash.setdefault(STARTED_KEY, [])  # log tails in failure reports

    def start(**kwargs: Any) -> bedlib.Tun2socks:
        log_path = artifact_dir / f"tun2socks-{len(started)}.log"
        t2s = the_bed.start_tun2socks(log_path, **kwargs)
        started.append(t2s)
        return t2s

    yield start
    the_bed.stop_tun2socks()


@pytest.fixture
def start_tun2socks(
    bed: bedlib.Bed, artifact_dir: Path, request: pytest.FixtureRequest
) -> Iterator[bedlib.StartTun2socks]:
    """Start tun2socks on the session's bed (stopped after the test)."""
    yield from _starter(bed, artifact_dir, request)


@pytest.fixture
def start_dns_tun2socks(
    dns_bed: bedlib.Bed, artifact_dir: Path, request: pytest.FixtureRequest
) -> Iterator[bedlib.StartTun2socks]:
    """Start tun2socks on the module's DNS bed (stopped after the test)."""
    yield from _starter(dns_bed, artifact_dir, request)


@pytest.fixture
def tun2socks(start_tun2socks: bedlib.StartTun2socks) -> bedlib.Tun2socks:
    """tun2socks with the bed's default config: no-auth danted, log level info."""
    return start_tun2socks()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        for t2s in item.stash.get(STARTED_KEY, []):
            report.sections.append((f"tun2socks log tail ({t2s.log_path})", t2s.log_tail()))
    return report

"""The dashboard in a real browser: headless Chromium opens it while a download runs through
tun2socks, sees the live chart and the connection, saves a screenshot (test-artifacts/), and
closes the connection with its button: the client sees a reset."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tests.integration import apiclient
from tests.integration import bed as bedlib

HERE = Path(__file__).resolve().parent
BROWSER_SCRIPT = HERE / "dashboard_browser.py"
CHROMIUM = "/usr/bin/chromium"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        bool(bedlib.missing_requirements()),
        reason="needs " + ", ".join(bedlib.missing_requirements()),
    ),
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium"),
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None, reason="needs playwright (extra test)"
    ),
]


def test_dashboard_shows_live_traffic_and_closes_a_connection(
    bed: bedlib.Bed,
    start_tun2socks: bedlib.StartTun2socks,
    artifact_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token = "dash-" + bed.socks_password[:10]
    monkeypatch.setenv("T2S_TEST_API_TOKEN", token)
    start_tun2socks(extra={"api": {"token": "${T2S_TEST_API_TOKEN}"}})
    # Not much slower: curl sees the reset only after reading what its socket holds (Linux
    # delivers queued data before ECONNRESET). At 2 MB/s it had 28 MB queued (the receive
    # buffer may grow to tcp_rmem's 32 MB): 14 s of reading, beyond the wait below (CI). At
    # 10 MB/s even a full buffer is read in about 3 s; measured, the queue stays short.
    download = apiclient.slow_download(bed, 1 << 40, "10M")
    screenshot = artifact_dir / "dashboard.png"
    try:
        apiclient.wait_for(
            "the download", lambda: apiclient.find_connection(bed, token), timeout=15
        )
        seen = apiclient.python_in_client_ns(
            bed,
            str(BROWSER_SCRIPT),
            *("--url", f"{apiclient.API}/#token={token}", "--expect", apiclient.TARGET),
            *("--screenshot", str(screenshot), "--close", "--timeout", "40"),
            timeout=180,
        )
        assert "error" not in seen, seen
        assert seen["errors"] == [], seen  # no script errors in the page
        assert seen["status"] == "live"
        assert seen["samples"] >= 4 and seen["max_rate"] > 100_000, seen  # a 10 MB/s flow
        cells = seen["row"]
        assert apiclient.TARGET in cells and "ESTABLISHED" in cells, cells
        assert screenshot.stat().st_size > 10_000
        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert seen["closed"] is True
        download.wait(15)
        assert download.returncode == 56, download.stderr  # curl: connection reset
    finally:
        apiclient.stop(download)

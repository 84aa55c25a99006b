"""TCP through tun2socks end to end: real curl and Python clients in the client namespace, danted
and an HTTP server in the server namespace (see bed.py). Every client call has a time bound."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration import apiclient, httpserver
from tests.integration import bed as bedlib

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        bool(bedlib.missing_requirements()),
        reason="needs " + ", ".join(bedlib.missing_requirements()),
    ),
]

URL = f"http://{bedlib.TARGET_IP}:{bedlib.HTTP_PORT}"
URL6 = f"http://[{bedlib.TARGET_IP6}]:{bedlib.HTTP_PORT}"
MIB = 1024 * 1024
AUTH_FAILURE = re.compile(r"(?i)(auth|password|credential).*(fail|reject|denied|invalid|wrong|bad)")


def curl(bed: bedlib.Bed, *args: str, max_time: float = 10.0) -> subprocess.CompletedProcess[str]:
    """curl in the client namespace; its traffic follows the default route into the TUN."""
    cmd = ["curl", "-sS", "-g", "--max-time", str(max_time), *args]
    return bed.run_cli(cmd, timeout=max_time + 10)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


def download_and_check(bed: bedlib.Bed, base_url: str, size: int, dest: Path) -> None:
    try:
        proc = curl(
            bed, "-o", str(dest), "-w", "%{http_code}", f"{base_url}/bytes/{size}", max_time=120
        )
        assert (proc.returncode, proc.stdout) == (0, "200"), proc.stderr
        assert dest.stat().st_size == size
        assert file_sha256(dest) == httpserver.payload_sha256(size)
    finally:
        dest.unlink(missing_ok=True)


def test_bed_socks_servers_work_without_tun2socks(bed: bedlib.Bed) -> None:
    """The bed itself: clients speaking SOCKS5 to danted reach the target (both ports)."""
    proxy = f"{bedlib.SRV_VETH_IP}:{bedlib.SOCKS_PORT}"
    assert curl(bed, "--socks5", proxy, f"{URL}/small").stdout == httpserver.SMALL_BODY.decode()
    user = f"{bed.socks_user}:{bed.socks_password}"
    auth_proxy = f"{user}@{bedlib.SRV_VETH_IP}:{bedlib.SOCKS_AUTH_PORT}"
    assert curl(bed, "--socks5", auth_proxy, f"{URL6}/small").stdout.startswith("hello")


def test_get_small(bed: bedlib.Bed, tun2socks: bedlib.Tun2socks) -> None:
    proc = curl(bed, f"{URL}/small")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == httpserver.SMALL_BODY.decode()


def test_download_100_mib_sha256(
    bed: bedlib.Bed, tun2socks: bedlib.Tun2socks, tmp_path: Path
) -> None:
    download_and_check(bed, URL, 100 * MIB, tmp_path / "download.bin")


def test_download_with_the_tun_writer_thread_sha256_and_four_at_once(
    bed: bedlib.Bed, start_tun2socks: bedlib.StartTun2socks, tmp_path: Path
) -> None:
    # tun.write_thread (off by default): large writes go through tun_writer.py's thread, whose
    # FIFO must keep every flow's order while four downloads share it.
    start_tun2socks(extra={"tun": {"write_thread": True}})
    jobs = [(40 * MIB + n, tmp_path / f"download-{n}.bin") for n in range(4)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        for done in [pool.submit(download_and_check, bed, URL, *job) for job in jobs]:
            done.result()
    tun = apiclient.get_json(bed, "/stats")["tun"]
    assert tun["packets_to_writer"] > 100, tun  # the thread wrote the downloads


def test_one_gib_each_way_sha256(
    bed: bedlib.Bed, tun2socks: bedlib.Tun2socks, tmp_path: Path
) -> None:
    """The speed work (offloads, 64 KiB segments) must not weaken correctness: 1 GiB each way."""
    size = 1024 * MIB
    download_and_check(bed, URL, size, tmp_path / "download.bin")
    source = tmp_path / "upload.bin"
    digest = hashlib.sha256()
    block = hashlib.sha256(b"gib").digest() * (MIB // 32)
    with open(source, "wb") as f:
        for i in range(size // MIB):
            chunk = i.to_bytes(8, "big") + block[8:]  # every MiB different
            digest.update(chunk)
            f.write(chunk)
    try:
        # -T streams the file (--data-binary would load 1 GiB into curl's memory).
        proc = curl(bed, "-X", "POST", "-T", str(source), "-H", "Expect:", f"{URL}/upload",
                    max_time=180)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        answer = json.loads(proc.stdout)
        assert (answer["length"], answer["sha256"]) == (size, digest.hexdigest())
    finally:
        source.unlink(missing_ok=True)


def test_upload_100_mib_sha256(
    bed: bedlib.Bed, tun2socks: bedlib.Tun2socks, tmp_path: Path
) -> None:
    source = tmp_path / "upload.bin"
    digest = hashlib.sha256()
    with open(source, "wb") as f:
        for i in range(100):
            chunk = hashlib.sha256(i.to_bytes(4, "big")).digest() * (MIB // 32)
            digest.update(chunk)
            f.write(chunk)
    try:
        proc = curl(
            bed,
            "--data-binary",
            f"@{source}",
            "-H",
            "Expect:",  # no 100-continue round trip
            "-H",
            "Content-Type: application/octet-stream",
            f"{URL}/upload",
            max_time=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == {"length": 100 * MIB, "sha256": digest.hexdigest()}
    finally:
        source.unlink(missing_ok=True)


def test_200_concurrent_connections(bed: bedlib.Bed, tun2socks: bedlib.Tun2socks) -> None:
    expected = hashlib.sha256(httpserver.SMALL_BODY).hexdigest()
    args = ["get-many", "--host", bedlib.TARGET_IP, "--path", "/small", "-n", "200", "-c", "200"]
    result = bed.netclient(
        [*args, "--expect-sha256", expected, "--req-timeout", "20", "--total-timeout", "40"],
        timeout=60,
    )
    assert (result["ok"], result["fail"]) == (200, 0), result["errors"]


def test_closed_port_is_refused_fast(bed: bedlib.Bed, tun2socks: bedlib.Tun2socks) -> None:
    started = time.monotonic()
    proc = curl(bed, f"http://{bedlib.TARGET_IP}:9/")
    elapsed = time.monotonic() - started
    assert proc.returncode == 7, f"curl exit {proc.returncode}: {proc.stderr}"
    assert elapsed < 2.0


def test_ipv6_get_and_download(
    bed: bedlib.Bed, tun2socks: bedlib.Tun2socks, tmp_path: Path
) -> None:
    proc = curl(bed, f"{URL6}/small")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == httpserver.SMALL_BODY.decode()
    download_and_check(bed, URL6, 10 * MIB, tmp_path / "download6.bin")


def test_auth_with_right_password(bed: bedlib.Bed, start_tun2socks: bedlib.StartTun2socks) -> None:
    t2s = start_tun2socks(auth=True)
    proc = curl(bed, f"{URL}/small")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == httpserver.SMALL_BODY.decode()
    assert bed.socks_password not in t2s.log_text()


def test_auth_with_wrong_password_fails_fast_and_logs_once(
    bed: bedlib.Bed, start_tun2socks: bedlib.StartTun2socks
) -> None:
    wrong = "wrong-" + bed.socks_password[::-1]
    t2s = start_tun2socks(auth=True, password=wrong)
    started = time.monotonic()
    proc = curl(bed, f"{URL}/small")
    elapsed = time.monotonic() - started
    assert proc.returncode in (7, 52, 56), f"curl exit {proc.returncode}: {proc.stderr}"
    assert elapsed < 3.0
    deadline = time.monotonic() + 2.0  # the log line may be written after the RST
    while not AUTH_FAILURE.search(t2s.log_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # a duplicate line would show up by now
    bed.wait_for_log(t2s, "tun2socks running: ", 15)
    log = t2s.log_text()
    # The start-up summary says it once too (its UDP probe logs in): flows add one line.
    lines = [line for line in log.splitlines() if AUTH_FAILURE.search(line)]
    assert [line for line in lines if "tun2socks running: " in line], log
    lines = [line for line in lines if "tun2socks running: " not in line]
    assert len(lines) == 1, f"expected one authentication failure line, got {lines}"
    assert wrong not in log
    assert bed.socks_password not in log


def test_half_closed_client_gets_full_reply(bed: bedlib.Bed, tun2socks: bedlib.Tun2socks) -> None:
    size = 1_000_000
    args = ["half-close", "--host", bedlib.TARGET_IP, "--size", str(size), "--timeout", "20"]
    result = bed.netclient(args, timeout=40)
    assert result == {"status": 200, "length": size, "sha256": httpserver.payload_sha256(size)}


def test_sigterm_exits_zero_resets_flows_and_removes_tun(
    bed: bedlib.Bed, tun2socks: bedlib.Tun2socks
) -> None:
    # two open flows: an idle one and a download in progress; both must be reset, not left hanging
    hold_cmd = [sys.executable, str(bedlib.NET_CLIENT_SCRIPT), "hold", "--host", bedlib.TARGET_IP]
    idle = subprocess.Popen(
        [*bed.cli_prefix(), *hold_cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    curl_cmd = ["curl", "-sS", "--max-time", "30", "-o", "/dev/null", f"{URL}/bytes/{1 << 40}"]
    download = subprocess.Popen(
        [*bed.cli_prefix(), *curl_cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        assert idle.stdout is not None
        ready, _, _ = select.select([idle.stdout], [], [], 10.0)
        assert ready and "connected" in idle.stdout.readline(), "the idle flow did not open"
        time.sleep(0.5)
        assert download.poll() is None, "the download ended before SIGTERM"
        started = time.monotonic()
        returncode = tun2socks.stop(timeout=5.0)
        assert returncode == 0, f"exit {returncode} after {time.monotonic() - started:.1f} s"
        assert not bed.tun_exists()
        out, err = idle.communicate(timeout=5)
        assert json.loads(out.strip().splitlines()[-1]) == {"result": "reset"}, err
        assert download.wait(5) == 56  # curl: "Recv failure: Connection reset by peer"
    finally:
        for client in (idle, download):
            if client.poll() is None:
                client.kill()
            client.wait(5)


def test_slow_reader_keeps_memory_bounded(
    bed: bedlib.Bed, start_tun2socks: bedlib.StartTun2socks
) -> None:
    flow_buffer = 262144
    t2s = start_tun2socks(extra={"limits": {"flow_buffer": flow_buffer}})
    warm_up = curl(bed, "-o", "/dev/null", f"{URL}/bytes/{4 * MIB}")
    assert warm_up.returncode == 0, warm_up.stderr
    time.sleep(0.5)
    baseline = bedlib.process_rss_bytes(t2s.pid)
    size = 200 * MIB
    args = ["slow-read", "--host", bedlib.TARGET_IP, "--size", str(size)]
    rate_args = ["--rate", str(MIB), "--duration", "8"]
    reader = subprocess.Popen(
        [*bed.cli_prefix(), sys.executable, str(bedlib.NET_CLIENT_SCRIPT), *args, *rate_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    samples = []
    try:
        deadline = time.monotonic() + 20
        while reader.poll() is None and time.monotonic() < deadline:
            samples.append(bedlib.process_rss_bytes(t2s.pid))
            time.sleep(0.5)
        out, err = reader.communicate(timeout=5)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait(5)
    assert out.strip(), f"slow reader printed nothing: {err}"
    result = json.loads(out.strip().splitlines()[-1])
    assert "received" in result, result
    assert 2 * MIB <= result["received"] <= 12 * MIB, result
    growth = max(samples) - baseline
    assert growth < 2 * flow_buffer + 20 * MIB, f"RSS grew by {growth / MIB:.1f} MiB"

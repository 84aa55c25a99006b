"""The control API of a running tun2socks in the bed: each endpoint's shape, counters that follow
real traffic, the token, closing a connection, /metrics, packet capture read back by tshark, and
`tun2socks status`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration import apiclient, httpserver
from tests.integration import bed as bedlib
from tests.integration.apiclient import MIB, TARGET, URL, call, get_json, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        bool(bedlib.missing_requirements()),
        reason="needs " + ", ".join(bedlib.missing_requirements()),
    ),
]

TOKEN_ENV = "T2S_TEST_API_TOKEN"


def curl(bed: bedlib.Bed, *args: str, max_time: float = 60.0) -> subprocess.CompletedProcess[str]:
    proc = bed.run_cli(["curl", "-sS", "--max-time", str(max_time), *args], timeout=max_time + 10)
    assert proc.returncode == 0, proc.stderr
    return proc


def within_1_percent(counted: int, transferred: int) -> bool:
    return transferred <= counted <= transferred * 1.01


def test_endpoint_shapes(bed: bedlib.Bed, tun2socks: bedlib.Tun2socks) -> None:
    assert curl(bed, f"{URL}/small").stdout == httpserver.SMALL_BODY.decode()
    assert get_json(bed, "/healthz") == {"status": "ok"}

    stats = get_json(bed, "/stats")
    assert set(stats) >= {"uptime_s", "tun", "flows", "relayed", "drops", "upstream_errors"}
    assert set(stats["tun"]) >= {"packets_in", "bytes_in", "packets_out", "bytes_out"}
    assert set(stats["flows"]) == {"open", "half_open", "total"}
    assert set(stats["relayed"]) == {"bytes_up", "bytes_down"}
    assert isinstance(stats["components"], dict) and isinstance(stats["drops"], dict)
    assert stats["flows"]["total"] >= 1 and stats["tun"]["packets_in"] > 0
    assert stats["pcap"]["running"] is False

    config = get_json(bed, "/config")
    assert config["tun"]["name"] == bedlib.TUN_NAME
    assert config["api"]["listen"] == "127.0.0.1:9090"
    assert get_json(bed, "/pcap")["running"] is False

    download = apiclient.slow_download(bed, 1 << 40, "1M")
    try:
        # A flow shows up from its SYN on (LISTEN while the proxy connects): wait for the data.
        conn = wait_for(
            "the download established in /connections",
            lambda: (c := apiclient.find_connection(bed)) and c["state"] == "ESTABLISHED" and c,
        )
        assert set(conn) == {
            *("id", "protocol", "source", "destination", "domain", "route", "proxy"),
            *("bytes_up", "bytes_down", "age_s", "state"),
        }
        assert conn["protocol"] == "tcp" and conn["route"] == "proxy"
        assert conn["source"].startswith(bedlib.TUN_IP + ":")
        assert conn["proxy"] == f"{bedlib.SRV_VETH_IP}:{bedlib.SOCKS_PORT}"
        assert conn["state"] == "ESTABLISHED" and 0 <= conn["age_s"] < 60  # a download just begun
        later = wait_for(
            "the download's bytes to grow",
            lambda: (c := apiclient.find_connection(bed)) and c["bytes_down"] > conn["bytes_down"],
        )
        assert later
        busiest = get_json(bed, "/connections?sort=bytes&limit=1")["connections"]
        assert len(busiest) == 1
    finally:
        apiclient.stop(download)
    assert call(bed, "/connections?sort=nonsense").status == 400
    assert call(bed, "/no-such-route").status == 404


def test_foreign_web_pages_cannot_drive_the_api(
    bed: bedlib.Bed, tun2socks: bedlib.Tun2socks
) -> None:
    # DNS rebinding: a page from evil.example whose name now points at 127.0.0.1
    assert call(bed, "/stats", headers=("Host: evil.example:9090",)).status == 403
    # a cross-origin form post from any page
    post = call(bed, "/pcap/start", method="POST", headers=("Origin: http://evil.example",))
    assert post.status == 403
    assert get_json(bed, "/pcap")["running"] is False
    same_origin = ("Origin: http://127.0.0.1:9090",)
    assert call(bed, "/pcap/start", method="POST", headers=same_origin).status == 200
    assert call(bed, "/stats", headers=("Host: localhost:9090",)).status == 200


def test_counters_match_a_known_transfer(
    bed: bedlib.Bed, tun2socks: bedlib.Tun2socks, tmp_path: Path
) -> None:
    size = 20 * MIB
    before = get_json(bed, "/stats")
    curl(bed, "-o", "/dev/null", f"{URL}/bytes/{size}")
    after = get_json(bed, "/stats")
    relayed = after["relayed"]["bytes_down"] - before["relayed"]["bytes_down"]
    tun_out = after["tun"]["bytes_out"] - before["tun"]["bytes_out"]
    assert within_1_percent(relayed, size), (relayed, size)
    assert within_1_percent(tun_out, size), (tun_out, size)  # IP/TCP headers: well under 1%
    assert after["flows"]["total"] == before["flows"]["total"] + 1

    upload = tmp_path / "upload.bin"
    upload.write_bytes(b"\x5a" * (10 * MIB))
    before = after
    reply = curl(bed, "--data-binary", f"@{upload}", "-H", "Expect:", f"{URL}/upload")
    assert json.loads(reply.stdout)["length"] == 10 * MIB
    after = get_json(bed, "/stats")
    relayed = after["relayed"]["bytes_up"] - before["relayed"]["bytes_up"]
    tun_in = after["tun"]["bytes_in"] - before["tun"]["bytes_in"]
    assert within_1_percent(relayed, 10 * MIB), (relayed, 10 * MIB)
    assert within_1_percent(tun_in, 10 * MIB), (tun_in, 10 * MIB)


def test_token_is_enforced_and_never_shown(
    bed: bedlib.Bed, start_tun2socks: bedlib.StartTun2socks, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "t0ken-" + bed.socks_password[:12]
    monkeypatch.setenv(TOKEN_ENV, token)  # the bed passes its environment to tun2socks
    t2s = start_tun2socks(extra={"api": {"token": f"${{{TOKEN_ENV}}}"}})
    for path in ("/stats", "/connections", "/config", "/metrics", "/events", "/pcap"):
        assert call(bed, path).status == 401, path
        assert call(bed, path, token="wrong-" + token).status == 401, path
    assert call(bed, "/connections/1", method="DELETE").status == 401
    assert call(bed, "/pcap/start", method="POST").status == 401
    assert get_json(bed, "/healthz") == {"status": "ok"}  # for liveness probes
    assert call(bed, "/").status == 200  # the page itself holds no data
    curl(bed, f"{URL}/small")  # one flow, which the stats read with the token must show
    stats = get_json(bed, "/stats", token=token)
    assert stats["flows"]["total"] == 1
    config = call(bed, "/config", token=token)
    assert config.status == 200 and token not in config.body
    assert config.json()["api"]["token"] != token
    assert token not in t2s.log_text()


def test_config_hides_the_proxy_password(
    bed: bedlib.Bed, start_tun2socks: bedlib.StartTun2socks
) -> None:
    t2s = start_tun2socks(auth=True)
    curl(bed, f"{URL}/small")
    config = call(bed, "/config")
    assert config.status == 200
    assert bed.socks_password not in config.body
    assert config.json()["proxy"]["url"].startswith(f"socks5://{bed.socks_user}:***@")
    assert bed.socks_password not in t2s.log_text()


def test_delete_resets_the_client(bed: bedlib.Bed, tun2socks: bedlib.Tun2socks) -> None:
    hold = [sys.executable, str(bedlib.NET_CLIENT_SCRIPT), "hold", "--host", bedlib.TARGET_IP]
    client = subprocess.Popen(
        [*bed.cli_prefix(), *hold], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert client.stdout is not None
        assert "connected" in client.stdout.readline()
        conn = wait_for("the held flow", lambda: apiclient.find_connection(bed))
        reply = call(bed, f"/connections/{conn['id']}", method="DELETE")
        assert (reply.status, reply.json()) == (200, {"closed": conn["id"]})
        out, err = client.communicate(timeout=15)
        assert json.loads(out.strip().splitlines()[-1]) == {"result": "reset"}, err
        assert apiclient.find_connection(bed) is None
        assert call(bed, f"/connections/{conn['id']}", method="DELETE").status == 404
        assert call(bed, "/connections/abc", method="DELETE").status == 400
    finally:
        if client.poll() is None:
            client.kill()
        client.wait(10)


def samples(families: dict[str, Any], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in families[name].samples}


def test_metrics_parse_and_follow_traffic(bed: bedlib.Bed, tun2socks: bedlib.Tun2socks) -> None:
    curl(bed, "-o", "/dev/null", f"{URL}/bytes/{MIB}")
    refused = bed.run_cli(
        ["curl", "-sS", "--max-time", "10", f"http://{bedlib.TARGET_IP}:9/"], timeout=20
    )
    assert refused.returncode == 7, refused.stderr  # nothing listens there: the proxy says so
    reply = call(bed, "/metrics")
    assert reply.status == 200
    families = {f.name: f for f in text_string_to_metric_families(reply.body)}
    assert families["tun2socks_tun_bytes"].type == "counter"
    tun_bytes = samples(families, "tun2socks_tun_bytes")
    assert tun_bytes[(("direction", "out"),)] >= MIB
    assert samples(families, "tun2socks_relayed_bytes")[(("direction", "down"),)] >= MIB
    assert families["tun2socks_flows"].samples[0].value >= 2
    assert families["tun2socks_flows_open"].type == "gauge"
    errors = samples(families, "tun2socks_upstream_errors")
    # Labelled by the SOCKS5 reply (RFC 1928 section 6: REP 5), as Socks5ReplyError.kind says.
    assert errors.get((("kind", "connection_refused"),), 0) >= 1, errors
    assert "process_resident_memory_bytes" in families
    stats = get_json(bed, "/stats")
    assert sum(stats["upstream_errors"].values()) == sum(errors.values())


def tshark_fields(capture: Path, *fields: str, display_filter: str) -> list[list[str]]:
    args = ["tshark", "-r", str(capture), "-Y", display_filter, "-T", "fields"]
    for field in fields:
        args += ["-e", field]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [line.split("\t") for line in proc.stdout.splitlines()]


def assert_handshake_and_request(capture: Path) -> None:
    """The capture holds one whole curl: SYN, SYN-ACK, ACK, then the HTTP GET, in order."""
    rows = tshark_fields(
        capture,
        *("tcp.stream", "tcp.srcport", "tcp.flags.syn", "tcp.flags.ack", "tcp.len"),
        "http.request.method",
        "http.request.uri",
        display_filter=f"tcp.port == {bedlib.HTTP_PORT}",
    )
    streams = {row[0] for row in rows}
    assert len(streams) == 1, rows
    first = rows[:4]
    server = str(bedlib.HTTP_PORT)
    assert (first[0][1] != server, first[0][2:4]) == (True, ["1", "0"]), rows  # SYN
    assert (first[1][1], first[1][2:4]) == (server, ["1", "1"]), rows  # SYN-ACK
    assert (first[2][1] != server, first[2][2:5]) == (True, ["0", "1", "0"]), rows  # ACK
    requests = [row[5:7] for row in rows if row[5]]
    assert requests == [["GET", "/small"]], rows


@pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark (Debian tshark)")
def test_capture_from_the_start_is_read_by_tshark(
    bed: bedlib.Bed, start_tun2socks: bedlib.StartTun2socks, artifact_dir: Path
) -> None:
    capture = artifact_dir / "from-start.pcap"
    start_tun2socks(extra={"api": {"pcap": {"file": str(capture)}}})
    assert get_json(bed, "/pcap")["running"] is True
    curl(bed, f"{URL}/small")
    status = call(bed, "/pcap/stop", method="POST").json()
    assert status["running"] is False and status["packets"] >= 6
    assert capture.stat().st_size == status["bytes"]
    assert_handshake_and_request(capture)


@pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark (Debian tshark)")
def test_capture_through_the_api_is_bounded_and_read_by_tshark(
    bed: bedlib.Bed, tun2socks: bedlib.Tun2socks, artifact_dir: Path
) -> None:
    assert call(bed, "/pcap/download").status == 404  # nothing captured yet
    assert call(bed, "/pcap/start", method="POST").json()["running"] is True
    curl(bed, f"{URL}/small")
    assert call(bed, "/pcap/stop", method="POST").json()["running"] is False
    capture = artifact_dir / "api.pcap"
    assert call(bed, "/pcap/download", output=str(capture)).status == 200
    assert_handshake_and_request(capture)

    limit = 20_000
    reply = call(bed, "/pcap/start", method="POST", data=json.dumps({"max_bytes": limit}))
    assert reply.json()["max_bytes"] == limit
    curl(bed, "-o", "/dev/null", f"{URL}/bytes/{MIB}")
    status = get_json(bed, "/pcap")
    assert (status["running"], status["full"]) == (False, True), status
    bounded = artifact_dir / "bounded.pcap"
    call(bed, "/pcap/download", output=str(bounded))
    assert 0 < bounded.stat().st_size <= limit
    bad = call(bed, "/pcap/start", method="POST", data=json.dumps({"max_bytes": "lots"}))
    assert bad.status == 400


def test_status_command_lists_the_busiest_connection(
    bed: bedlib.Bed, tun2socks: bedlib.Tun2socks
) -> None:
    download = apiclient.slow_download(bed, 1 << 40, "1M")
    try:
        wait_for(
            "the download to move bytes",
            lambda: (c := apiclient.find_connection(bed)) and c["bytes_down"] > 0,
        )
        proc = apiclient.tun2socks_status(bed, "-n", "5")
    finally:
        apiclient.stop(download)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("TUN:") for line in lines), proc.stdout
    header = next(i for i, line in enumerate(lines) if line.startswith("ID "))
    assert "DESTINATION" in lines[header] and "DOWN" in lines[header]
    assert TARGET in lines[header + 1] and "ESTABLISHED" in lines[header + 1], proc.stdout
    missing = apiclient.tun2socks_status(bed, "--api", "127.0.0.1:1")
    assert missing.returncode == 1 and "cannot reach the API" in missing.stderr


def test_busy_api_port_leaves_the_data_path_running(
    bed: bedlib.Bed, start_tun2socks: bedlib.StartTun2socks
) -> None:
    squatter_code = (
        "import socket, sys, time\n"
        "s = socket.create_server(('127.0.0.1', 9090))\n"
        "print('listening', flush=True)\n"
        "time.sleep(60)\n"
    )
    squatter = subprocess.Popen(
        [*bed.cli_prefix(), sys.executable, "-c", squatter_code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert squatter.stdout is not None and squatter.stdout.readline() == "listening\n"
        t2s = start_tun2socks()
        assert curl(bed, f"{URL}/small").stdout == httpserver.SMALL_BODY.decode()
        assert "control API: cannot listen on 127.0.0.1:9090" in t2s.log_text()
    finally:
        squatter.kill()
        squatter.wait(10)

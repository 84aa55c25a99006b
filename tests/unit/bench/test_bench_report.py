"""The benchmark's pure parts: verdicts against the issues' targets, curl's timings, the pcap
reader and the connection timeline, the profile summary, and the README sections
(`python -m bench` itself needs root and runs outside the test suite)."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path
from typing import Any

import pytest

from bench import delayrelay, pcapread, profile, report, targets, timeline
from bench.rows import LABEL_CEILING, LABEL_TUN, parse_curl_timings


def _iperf(gbit_s: float, cpu_s_per_gb: float | None = None) -> dict[str, Any]:
    metrics: dict[str, Any] = {"gbit_s": gbit_s, "bytes": int(gbit_s * 1e9)}
    if cpu_s_per_gb is not None:
        metrics["cpu_s_per_gb"] = cpu_s_per_gb
    return metrics


def _churn(fail: int, slow: int) -> dict[str, Any]:
    return {
        "fail": fail,
        "slow": slow,
        "connections": 6000,
        "req_per_s": 700.0,
        "max_ms": 900.0,
    }


def _results() -> dict[str, dict[str, Any]]:
    """A run that meets every target."""
    return {
        LABEL_CEILING: {
            "up_P1": _iperf(10.0),
            "down_P1": _iperf(10.0),
            "up_P4": _iperf(12.0),
            "down_P4": _iperf(11.0),
            "rate_c200": {"req_per_s": 600.0, "fail": 0},
            "seq_n500_c1": {"req_per_s": 500.0, "fail": 0},
            "churn_n2000_c100": _churn(0, 0),
            "latency_c1": {"p50_ms": 2.0, "connect_p50_ms": 0.2, "fail": 0},
            "latency_remote": {"p50_ms": 65.0, "connect_p50_ms": 0.2, "fail": 0},
        },
        LABEL_TUN: {
            "up_P1": _iperf(7.0, 1.5),
            "down_P1": _iperf(6.0, 2.5),
            "up_P4": _iperf(7.1, 1.4),
            "down_P4": _iperf(6.0, 2.4),
            "rate_c200": {"req_per_s": 600.0, "fail": 0},
            "seq_n500_c1": {"req_per_s": 460.0, "fail": 0},
            "churn_n2000_c100": _churn(0, 0),
            "latency_c1": {"p50_ms": 2.2, "connect_p50_ms": 1.1, "fail": 0},
            "latency_remote": {"p50_ms": 45.0, "connect_p50_ms": 22.0, "fail": 0},
            "memory": {
                "n": 10_000,
                "opened": 10_000,
                "lost_while_idle": 0,
                "rss_idle_bytes": 50_000_000,
                "rss_after_bytes": 90_000_000,
                "per_conn_bytes": 4000,
            },
        },
    }


def _by_key(results: dict[str, dict[str, Any]]) -> dict[str, targets.Verdict]:
    return {v.measurement: v for v in targets.evaluate(results)}


def test_every_target_row_met() -> None:
    verdicts = _by_key(_results())
    assert {k for k, v in verdicts.items() if v.met is not True} == {"cpu_up", "cpu_down"}
    assert verdicts["up_P1"].ratio == "70%"
    assert verdicts["latency_c1"].ratio == "1.10x"
    assert verdicts["latency_c1"].ours == "2.20 ms (connect 1.10)"
    assert verdicts["latency_remote"].ratio == "0.69x"
    assert verdicts["seq_n500_c1"].ratio == "92%"
    assert "1.50 s/GB (1 stream)" in verdicts["cpu_up"].ours


@pytest.mark.parametrize(
    ("label", "key", "metrics", "missed"),
    [
        (LABEL_TUN, "up_P1", _iperf(6.5), "up_P1"),  # 65% < 71% - 5 points
        (LABEL_TUN, "down_P1", _iperf(5.8), "down_P1"),  # 58% < 64% - 5 points
        (LABEL_TUN, "up_P4", _iperf(6.9), "up_P4"),  # lower than 1 stream (7.0)
        (LABEL_TUN, "rate_c200", {"req_per_s": 590.0, "fail": 0}, "rate_c200"),  # 98% < 100%
        (LABEL_TUN, "seq_n500_c1", {"req_per_s": 440.0, "fail": 0}, "seq_n500_c1"),  # 88%
        (LABEL_TUN, "churn_n2000_c100", _churn(0, 1), "churn_n2000_c100"),
        (LABEL_TUN, "churn_n2000_c100", _churn(1, 0), "churn_n2000_c100"),
        (LABEL_TUN, "churn_n2000_c100", {**_churn(0, 0), "req_per_s": 660.0}, "churn_n2000_c100"),
        (LABEL_CEILING, "latency_c1", {"p50_ms": 1.9, "fail": 0}, "latency_c1"),  # 1.16x
        (LABEL_TUN, "latency_c1", {"p50_ms": 2.0, "fail": 1}, "latency_c1"),  # a GET failed
        (LABEL_TUN, "latency_remote", {"p50_ms": 46.0, "fail": 0}, "latency_remote"),  # 0.71x
    ],
)
def test_each_target_can_be_missed(label: str, key: str, metrics: Any, missed: str) -> None:
    results = _results()
    results[label][key] = metrics
    verdicts = _by_key(results)
    assert verdicts[missed].met is False
    assert sum(v.met is False for v in verdicts.values()) == 1


def test_an_early_accept_run_judges_the_20_ms_row_by_the_stretch() -> None:
    results = _results()  # 45 ms against 65: met as the plain row, not as the stretch
    plain = _by_key(results)["latency_remote"]
    stretch = {v.measurement: v for v in targets.evaluate(results, early_accept=True)}
    assert plain.met is True and stretch["latency_remote"].met is False
    assert "stretch" in stretch["latency_remote"].row
    assert stretch["latency_remote"].target.startswith("<= 0.40x")
    results[LABEL_TUN]["latency_remote"] = {"p50_ms": 25.0, "fail": 0}  # 0.38x
    met = {v.measurement: v for v in targets.evaluate(results, early_accept=True)}
    assert met["latency_remote"].met is True


def test_memory_targets() -> None:
    results = _results()
    results[LABEL_TUN]["memory"].update(rss_idle_bytes=61_000_000, per_conn_bytes=16 * 1024)
    verdicts = _by_key(results)
    assert verdicts["memory_idle"].met is False
    assert verdicts["memory_per_conn"].met is False


def test_memory_per_connection_needs_every_connection_held() -> None:
    results = _results()
    results[LABEL_TUN]["memory"].update(opened=9_000)
    assert _by_key(results)["memory_per_conn"].met is False
    results[LABEL_TUN]["memory"].update(opened=10_000, lost_while_idle=3)
    assert _by_key(results)["memory_per_conn"].met is False


def test_errors_and_missing_rows_have_no_verdict() -> None:
    results = _results()
    results[LABEL_TUN]["up_P1"] = {"error": "ValueError: iperf3 rc 1"}
    del results[LABEL_TUN]["memory"]
    verdicts = _by_key(results)
    assert verdicts["up_P1"].met is None
    assert verdicts["up_P1"].ours.startswith("error: ValueError")
    assert verdicts["up_P4"].met is None  # its target needs the 1-stream figure
    assert verdicts["memory_idle"].met is None


def test_profile_summary_inclusive_self_and_trunk() -> None:
    raw = "\n".join(
        [
            "<module> (t.py:1);main (t.py:3);a (t.py:10);b (t.py:20) 6",
            "<module> (t.py:1);main (t.py:3);a (t.py:10) 2",
            "<module> (t.py:1);main (t.py:3);c (t.py:30);c (t.py:30) 2",  # recursion
        ]
    )
    summary = profile.summarize(raw)
    assert summary["samples"] == 10
    assert summary["trunk"] == ["<module> (t.py)", "main (t.py)"]
    shares = {row["function"]: (row["inclusive"], row["self"]) for row in summary["top"]}
    assert shares == {"a (t.py)": (0.8, 0.2), "b (t.py)": (0.6, 0.6), "c (t.py)": (0.2, 0.2)}


def test_variant_of() -> None:
    assert report.variant_of(None, True) == report.VARIANT_DEFAULTS
    assert report.variant_of(1500, False) == report.VARIANT_PLAIN
    assert report.variant_of(9000, True) is None
    assert report.variant_of(None, False) is None


def test_replace_section_touches_only_its_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(
        "intro\n<!-- bench:defaults:begin -->\nold\n<!-- bench:defaults:end -->\n"
        "<!-- bench:profile:begin -->\nkeep\n<!-- bench:profile:end -->\n"
    )
    report.replace_section("defaults", "new | table", readme)
    text = readme.read_text()
    assert "new | table" in text and "old" not in text and "keep" in text
    with pytest.raises(SystemExit):
        report.replace_section("mtu1500-no-offload", "x", readme)


def test_curl_timings_count_missing_and_bad_answers_as_failed() -> None:
    out = "200 12 0.000200 0.001500\n200 12 0.000300 0.002500\n404 10 0.0001 0.001\n"
    timings = parse_curl_timings(out + "200 12 0.000100 0.000500\n", expected=5)
    assert timings["p50_ms"] == 1.5
    assert timings["connect_p50_ms"] == 0.2
    assert timings["fail"] == 2  # the 404 and the GET without a line
    assert timings["errors"] == ["HTTP 404, 10 bytes"]


# -- the connection timeline: synthetic captures of one GET through tun2socks ------------------

CLIENT, TARGET, T2S, PROXY = "198.18.254.1", "198.19.0.10", "198.18.0.1", "198.18.0.2"
S, SA, A, PA, FA = 0x02, 0x12, 0x10, 0x18, 0x11


def _ipv4_tcp(
    src: str, sport: int, dst: str, dport: int, flags: int, seq: int, data: bytes
) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 65535, 0, 0) + data
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0,
        bytes(int(b) for b in src.split(".")), bytes(int(b) for b in dst.split(".")),
    )  # fmt: skip
    return header + tcp


def _pcap(linktype: int, packets: list[tuple[float, bytes]]) -> bytes:
    out = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, linktype)
    for when, packet in packets:
        frame = packet if linktype == pcapread.LINKTYPE_RAW else b"\0" * 12 + b"\x08\x00" + packet
        if linktype == pcapread.LINKTYPE_ETHERNET:
            frame += b"\0" * max(0, 60 - len(frame))  # Ethernet padding, past the IP length
        seconds, micros = int(when), round((when % 1) * 1e6)
        out += struct.pack("<IIII", seconds, micros, len(frame), len(frame)) + frame
    return out


def _one_get(
    auth: bool = False, pooled: bool = False
) -> tuple[list[pcapread.Segment], list[pcapread.Segment]]:
    """The TUN's and the proxy side's segments of one GET; times in ms from 1000 s. `pooled`:
    the proxy session was opened and greeted 5 ms before the SYN came in."""
    ms = 0.001
    connect = b"\x05\x01\x00\x01" + bytes([198, 19, 0, 10]) + struct.pack("!H", 8080)
    reply = b"\x05\x00\x00\x01" + bytes(4) + b"\0\0"
    greeting = b"\x05\x01\x02" if auth else b"\x05\x01\x00"
    early = -5.0 if pooled else 0.0
    up: list[tuple[float, bytes]] = [(0.5 + early, greeting)]
    down: list[tuple[float, bytes]] = [(0.7 + early, b"\x05\x02" if auth else b"\x05\x00")]
    if auth:
        up.append((0.8, b"\x01\x01u\x02pw"))
        down.append((0.9, b"\x01\x00"))
    up += [(1.0, connect), (2.5, b"GET /small HTTP/1.0\r\n\r\n")]
    down += [(1.5, reply), (3.0, b"HTTP/1.0 200 OK\r\n\r\nhi")]
    proxy = [
        (0.2 + early, _ipv4_tcp(T2S, 40000, PROXY, 1080, S, 100, b"")),
        (0.3 + early, _ipv4_tcp(PROXY, 1080, T2S, 40000, SA, 900, b"")),
    ]
    seq = 101
    for when, data in up:
        proxy.append((when, _ipv4_tcp(T2S, 40000, PROXY, 1080, PA, seq, data)))
        seq += len(data)
    seq = 901
    for when, data in down:
        proxy.append((when, _ipv4_tcp(PROXY, 1080, T2S, 40000, PA, seq, data)))
        proxy.append((when, _ipv4_tcp(PROXY, 1080, T2S, 40000, PA, seq, data)))  # a retransmit
        seq += len(data)
    proxy.append((3.1, _ipv4_tcp(PROXY, 1080, T2S, 40000, FA, seq, b"")))
    tun = [
        (0.0, _ipv4_tcp(CLIENT, 50000, TARGET, 8080, S, 1, b"")),
        (1.8, _ipv4_tcp(TARGET, 8080, CLIENT, 50000, SA, 5, b"")),
        (1.9, _ipv4_tcp(CLIENT, 50000, TARGET, 8080, A, 2, b"")),
        (2.0, _ipv4_tcp(CLIENT, 50000, TARGET, 8080, PA, 2, b"GET /small HTTP/1.0\r\n\r\n")),
        (3.3, _ipv4_tcp(TARGET, 8080, CLIENT, 50000, FA, 6, b"HTTP/1.0 200 OK\r\n\r\nhi")),
    ]

    def stamp(packets: list[tuple[float, bytes]]) -> list[tuple[float, bytes]]:
        return sorted((1000.0 + when * ms, p) for when, p in packets)

    return (
        pcapread.read_segments(_pcap(pcapread.LINKTYPE_RAW, stamp(tun))),
        pcapread.read_segments(_pcap(pcapread.LINKTYPE_ETHERNET, stamp(proxy))),
    )


def test_pcap_reader_raw_and_ethernet() -> None:
    tun, proxy = _one_get()
    assert (tun[0].src, tun[0].sport, tun[0].dport, tun[0].syn) == (CLIENT, 50000, 8080, True)
    assert tun[0].time == pytest.approx(1000.0)
    assert proxy[2].payload == b"\x05\x01\x00"  # the Ethernet padding is not payload
    with pytest.raises(pcapread.PcapError):
        pcapread.read_segments(b"\x0a\x0d\x0d\x0a" + bytes(40))  # pcapng


def test_timeline_merges_tun_and_proxy_side_rfc1928_steps() -> None:
    tun, proxy = _one_get()
    (steps,) = timeline.flow_timelines(tun, proxy, 8080, 1080)
    expected = {
        "SYN in (TUN)": 0.0,
        "dial: SYN to the proxy": 0.2,
        "proxy's SYN-ACK": 0.3,
        "greeting sent": 0.5,
        "method reply": 0.7,
        "CONNECT sent": 1.0,
        "CONNECT reply": 1.5,
        "SYN-ACK out (TUN)": 1.8,
        "ACK in (TUN)": 1.9,
        "request in (TUN)": 2.0,
        "request to the proxy": 2.5,
        "response from the proxy": 3.0,
        "FIN from the proxy": 3.1,
        "response out (TUN)": 3.3,
        "FIN out (TUN)": 3.3,
    }
    assert steps == pytest.approx(expected, abs=0.002)
    ceiling = timeline.flow_timelines(None, proxy, 8080, 1080)
    assert ceiling[0]["dial: SYN to the proxy"] == 0.0
    assert ceiling[0]["CONNECT reply"] == pytest.approx(1.3, abs=0.002)


def test_timeline_window_and_a_session_opened_before_the_flow() -> None:
    tun, proxy = _one_get(pooled=True)
    (steps,) = timeline.flow_timelines(tun, proxy, 8080, 1080, window=(999.9999, 1000.1))
    assert steps["greeting sent"] == pytest.approx(-4.5, abs=0.002)  # before the SYN in
    assert steps["CONNECT sent"] == pytest.approx(1.0, abs=0.002)
    assert timeline.flow_timelines(tun, proxy, 8080, 1080, window=(1000.1, 1001.0)) == []
    assert timeline.flow_timelines(None, proxy, 8080, 1080, window=(1000.1, 1001.0)) == []


def test_timeline_rfc1929_auth_and_pipelined_greeting() -> None:
    tun, proxy = _one_get(auth=True)
    (steps,) = timeline.flow_timelines(tun, proxy, 8080, 1080)
    assert steps["auth sent"] == pytest.approx(0.8, abs=0.002)
    assert steps["auth reply"] == pytest.approx(0.9, abs=0.002)
    assert steps["CONNECT sent"] == pytest.approx(1.0, abs=0.002)
    connect = b"\x05\x01\x00\x01" + bytes([198, 19, 0, 10]) + struct.pack("!H", 8080)
    reply = b"\x05\x00\x00\x01" + bytes(6)
    pipelined = timeline.socks_steps(
        [(1.0, b"\x05\x01\x00" + connect), (2.0, b"GET")], [(1.5, b"\x05\x00" + reply + b"HTTP")]
    )
    assert pipelined == {
        "greeting sent": 1.0,
        "method reply": 1.5,
        "CONNECT sent": 1.0,
        "CONNECT reply": 1.5,
        "request to the proxy": 2.0,
        "response from the proxy": 1.5,
    }


def test_timeline_markdown_medians() -> None:
    flows = [{"SYN in (TUN)": 0.0, "SYN-ACK out (TUN)": x} for x in (1.0, 3.0, 2.0)]
    medians = timeline.median_steps(flows)
    assert medians == {"SYN in (TUN)": 0.0, "SYN-ACK out (TUN)": 2.0}
    table = timeline.markdown({"scenarios": {"t": {"flows": 3, "steps": medians}}}, "now")
    assert "| SYN-ACK out (TUN) | 2.00 |" in table
    assert "| CONNECT sent |" not in table


# -- the delaying relay of the 20 ms rows, on loopback ----------------------------------------


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()  # after the client's EOF: our EOF must still reach it through the relay


async def _through_relay(payload: bytes, delay_ms: float) -> tuple[bytes, float, float]:
    loop = asyncio.get_running_loop()
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]
    relay = delayrelay.Relay("127.0.0.1", echo_port, delay_ms / 1000.0, max_conns=10)
    server = await loop.create_server(relay.accept, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        started = loop.time()
        writer.write(b"x")
        first = await asyncio.wait_for(reader.readexactly(1), 5)
        round_trip = loop.time() - started
        writer.write(payload)
        writer.write_eof()
        back = first + await asyncio.wait_for(reader.read(-1), 10)  # until the relayed EOF
        writer.close()
        return back, round_trip, loop.time() - started
    finally:
        server.close()
        echo.close()


def test_delay_relay_holds_each_way_keeps_order_and_passes_eof() -> None:
    payload = bytes(range(256)) * 12_000  # 3 MB: past the relay's 1 MiB queue limit
    back, round_trip, _ = asyncio.run(_through_relay(payload, delay_ms=10.0))
    assert back == b"x" + payload
    assert 0.020 <= round_trip < 1.0  # 10 ms each way

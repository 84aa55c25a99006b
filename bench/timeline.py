"""The timeline of one connection: when each step of a small GET happens (`--timeline`).

Two captures, merged by timestamp (both on the machine's wall clock):
  - tun2socks' own capture of its TUN (`api.pcap.file`): the client's side, stamped when
    tun2socks reads or writes each packet: SYN in, SYN-ACK out, ACK in, request in, response
    out, FIN each way;
  - tshark on the server end of the veth: the proxy's side, as the proxy (or the delaying relay
    in front of it) sees it: the dial's SYN, the SOCKS5 greeting and its reply, CONNECT and its
    reply, the request going up and the response coming down, FIN each way.

Each scenario makes CONNS GETs one after the other (one curl each, after one warm-up GET); the
table shows, per step, the median over them of its time after the connection's first packet
(the SYN in for tun2socks, the SYN to the proxy for the ceiling, whose curl speaks SOCKS5
itself). The SOCKS5 messages are found by parsing each direction's byte stream (RFC 1928 and
RFC 1929 framing), so a greeting sent together with CONNECT, or a session opened before the
flow (negative times), still shows where it is.
"""

from __future__ import annotations

import select
import signal
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

from tests.integration import bed as bedlib

from .pcapread import Segment, read_segments

CONNS = 7
GAP_S = 0.2  # between the GETs of a scenario: each connection's close is over before the next

# the steps in the order one connection of today's tun2socks goes through them
STEPS = (
    "SYN in (TUN)",
    "dial: SYN to the proxy",
    "proxy's SYN-ACK",
    "greeting sent",
    "method reply",
    "auth sent",
    "auth reply",
    "CONNECT sent",
    "CONNECT reply",
    "SYN-ACK out (TUN)",
    "ACK in (TUN)",
    "request in (TUN)",
    "request to the proxy",
    "response from the proxy",
    "FIN from the proxy",
    "response out (TUN)",
    "FIN out (TUN)",
    "FIN in (TUN)",
    "FIN to the proxy",
)


# -- the pure part: steps from segments -----------------------------------------------------


def _connections(segments: list[Segment], server_port: int) -> list[list[Segment]]:
    """Segments grouped by connection (client address and port), each in capture order, the
    connections ordered by their first segment."""
    flows: dict[tuple[str, int], list[Segment]] = {}
    for seg in segments:
        if seg.dport == server_port:
            flows.setdefault((seg.src, seg.sport), []).append(seg)
        elif seg.sport == server_port:
            flows.setdefault((seg.dst, seg.dport), []).append(seg)
    return sorted(flows.values(), key=lambda flow: flow[0].time)


def _stream(flow: list[Segment], upstream: bool, port: int) -> list[tuple[float, bytes]]:
    """One direction's payload in sequence order, each chunk with its first capture time."""
    chunks: dict[int, tuple[float, bytes]] = {}
    for seg in flow:
        if seg.payload and (seg.dport == port) == upstream and seg.seq not in chunks:
            chunks[seg.seq] = (seg.time, seg.payload)
    start = min(chunks, default=0)
    return [chunks[s] for s in sorted(chunks, key=lambda s: (s - start) % (1 << 32))]


def _time_at(chunks: list[tuple[float, bytes]], offset: int) -> float | None:
    """When the byte at `offset` of the stream was first seen."""
    seen = 0
    for when, data in chunks:
        seen += len(data)
        if offset < seen:
            return when
    return None


def _socks_address_end(buf: bytes, at: int) -> int | None:
    """End of a request or reply starting at `at` (VER CMD/REP RSV ATYP ADDR PORT), RFC 1928 4-6."""
    if len(buf) < at + 5:
        return None
    atyp = buf[at + 3]
    length = {1: 4, 4: 16}.get(atyp, buf[at + 4] + 1 if atyp == 3 else -1)
    return at + 4 + length + 2 if length >= 0 else None


def socks_steps(up: list[tuple[float, bytes]], down: list[tuple[float, bytes]]) -> dict[str, float]:
    """The SOCKS5 messages of one proxy connection and the data after them, with their times."""
    sent, received = b"".join(d for _, d in up), b"".join(d for _, d in down)
    steps: dict[str, float | None] = {}
    if len(sent) < 2 or sent[0] != 5:
        return {}
    steps["greeting sent"] = _time_at(up, 0)
    at, back = 2 + sent[1], 2
    steps["method reply"] = _time_at(down, 0)
    if len(received) >= 2 and received[1] == 2 and len(sent) > at + 1:  # RFC 1929 exchange
        steps["auth sent"] = _time_at(up, at)
        ulen = sent[at + 1]
        at += 2 + ulen + 1 + (sent[at + 2 + ulen] if len(sent) > at + 2 + ulen else 0)
        steps["auth reply"] = _time_at(down, back)
        back += 2
    steps["CONNECT sent"] = _time_at(up, at)
    steps["CONNECT reply"] = _time_at(down, back)
    request_at, response_at = _socks_address_end(sent, at), _socks_address_end(received, back)
    if request_at is not None:
        steps["request to the proxy"] = _time_at(up, request_at)
    if response_at is not None:
        steps["response from the proxy"] = _time_at(down, response_at)
    return {name: when for name, when in steps.items() if when is not None}


def proxy_flow_steps(flow: list[Segment], port: int) -> dict[str, float]:
    steps = socks_steps(_stream(flow, True, port), _stream(flow, False, port))
    firsts: dict[str, Callable[[Segment], bool]] = {
        "dial: SYN to the proxy": lambda s: s.syn and not s.ack and s.dport == port,
        "proxy's SYN-ACK": lambda s: s.syn and s.ack and s.sport == port,
        "FIN from the proxy": lambda s: s.fin and s.sport == port,
        "FIN to the proxy": lambda s: s.fin and s.dport == port,
    }
    steps.update(_first_times(flow, firsts))
    return steps


def tun_flow_steps(flow: list[Segment], port: int) -> dict[str, float]:
    synack = next((s.time for s in flow if s.syn and s.ack and s.sport == port), None)
    firsts: dict[str, Callable[[Segment], bool]] = {
        "SYN in (TUN)": lambda s: s.syn and not s.ack and s.dport == port,
        "SYN-ACK out (TUN)": lambda s: s.syn and s.ack and s.sport == port,
        "ACK in (TUN)": lambda s: (
            s.dport == port
            and not s.syn
            and not s.payload
            and synack is not None
            and s.time >= synack
        ),
        "request in (TUN)": lambda s: bool(s.payload) and s.dport == port,
        "response out (TUN)": lambda s: bool(s.payload) and s.sport == port,
        "FIN out (TUN)": lambda s: s.fin and s.sport == port,
        "FIN in (TUN)": lambda s: s.fin and s.dport == port,
    }
    return _first_times(flow, firsts)


def _first_times(
    flow: list[Segment], firsts: dict[str, Callable[[Segment], bool]]
) -> dict[str, float]:
    """When each test of `firsts` first matched a segment of `flow` (never: left out)."""
    times: dict[str, float] = {}
    for name, test in firsts.items():
        hit = next((s.time for s in flow if test(s)), None)
        if hit is not None:
            times[name] = hit
    return times


def flow_timelines(
    tun: list[Segment] | None,
    proxy: list[Segment],
    target_port: int,
    proxy_port: int,
    window: tuple[float, float] = (0.0, float("inf")),
) -> list[dict[str, float]]:
    """Per connection, each step's time in ms after its first one. `tun` None: the ceiling
    (clients speak SOCKS5 themselves: the proxy's side is all there is). A TUN flow is paired
    with the first proxy connection not yet taken whose CONNECT went out after its SYN in.
    Only connections that start (SYN in; for the ceiling CONNECT sent) within `window` count;
    their proxy sessions are read whole, even when opened before it (a pool's)."""
    proxy_flows = [proxy_flow_steps(f, proxy_port) for f in _connections(proxy, proxy_port)]
    proxy_flows = [p for p in proxy_flows if "CONNECT sent" in p]
    merged: list[dict[str, float]] = []
    if tun is None:
        merged = [p for p in proxy_flows if window[0] <= p["CONNECT sent"] <= window[1]]
    else:
        free = sorted(proxy_flows, key=lambda p: p["CONNECT sent"])
        for flow in _connections(tun, target_port):
            steps = tun_flow_steps(flow, target_port)
            syn = steps.get("SYN in (TUN)")
            if syn is None or not window[0] <= syn <= window[1]:
                continue
            match = next((p for p in free if p["CONNECT sent"] >= syn), None)
            if match is not None:
                free.remove(match)
                steps = {**match, **steps}
            merged.append(steps)
    timelines = []
    for steps in merged:
        first = steps.get("SYN in (TUN)", steps.get("dial: SYN to the proxy"))
        if first is not None:
            timelines.append({k: round((v - first) * 1000.0, 3) for k, v in steps.items()})
    return timelines


def median_steps(timelines: list[dict[str, float]]) -> dict[str, float]:
    names = {name for t in timelines for name in t}
    return {
        name: round(statistics.median(t[name] for t in timelines if name in t), 3)
        for name in STEPS
        if name in names
    }


def markdown(timeline: dict[str, Any], context: str) -> str:
    """The table: one row per step, one column per scenario (median ms after the first step)."""
    if "error" in timeline:
        return f"Timeline not recorded: {timeline['error']}"
    scenarios: dict[str, dict[str, Any]] = timeline["scenarios"]
    names = list(scenarios)
    header = "| step | " + " | ".join(f"{n} ({scenarios[n]['flows']})" for n in names) + " |"
    lines = [
        f"Recorded {context}: median over the GETs of each scenario (their count in brackets) "
        "of each step's time in ms after the connection's first packet; `-`: not part of it.",
        "",
        header,
        "|---" * (len(names) + 1) + "|",
    ]
    for step in STEPS:
        cells = [scenarios[n]["steps"].get(step) for n in names]
        if any(c is not None for c in cells):
            text = ["-" if c is None else f"{c:.2f}" for c in cells]
            lines.append(f"| {step} | " + " | ".join(text) + " |")
    return "\n".join(lines)


# -- the captures -------------------------------------------------------------------------


def _start_tshark(bed: bedlib.Bed, path: str, ports: list[int]) -> subprocess.Popen[str]:
    capture_filter = " or ".join(f"tcp port {p}" for p in ports)
    proc = subprocess.Popen(
        [
            *("ip", "netns", "exec", bed.srv_ns, "tshark", "-i", bedlib.SRV_VETH),
            *("-F", "pcap", "-w", path, "-f", capture_filter),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], max(0.0, deadline - time.monotonic()))
        line = proc.stderr.readline() if ready else ""
        if "Capturing on" in line:
            return proc
        if proc.poll() is not None:
            break
    _stop_tshark(proc)
    raise bedlib.BedError("tshark did not start capturing on the server veth")


def _stop_tshark(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # lets it write out what it holds
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _gets(bed: bedlib.Bed, socks_port: int | None, count: int) -> tuple[float, float]:
    """`count` GETs one after the other after a warm-up GET; the window (epoch seconds) in which
    the counted ones ran."""
    url = f"http://{bedlib.TARGET_IP}:{bedlib.HTTP_PORT}/small"
    cmd = ["curl", "-sS", "--http1.0", "-o", "/dev/null", "--max-time", "5", url]
    if socks_port is not None:
        cmd[1:1] = ["--socks5", f"{bedlib.SRV_VETH_IP}:{socks_port}"]
    bed.run_cli(cmd, timeout=15)
    time.sleep(GAP_S)
    start = time.time()
    for _ in range(count):
        bed.run_cli(cmd, timeout=15)
        time.sleep(GAP_S)
    return start, time.time()


def record(
    bed: bedlib.Bed,
    extra_for: Callable[[int | None], dict[str, Any]],
    time_left: Callable[[float], float],
    relay_port: int | None,
) -> dict[str, Any]:
    """Capture each scenario (tun2socks and the ceiling; local proxy, and the relay 20 ms away
    when `relay_port` is given) and return the per-step medians. `extra_for(port)`: the bench's
    tun2socks settings for the proxy on `port` (None: danted)."""
    time_left(60)
    proxies = [("local proxy", bedlib.SOCKS_PORT)]
    if relay_port is not None:
        proxies.append(("proxy 20 ms away", relay_port))
    proxy_pcap = bed.workdir / "timeline-proxy-side.pcap"
    tshark = _start_tshark(bed, str(proxy_pcap), [p for _, p in proxies])
    windows: list[tuple[str, int, str | None, tuple[float, float]]] = []
    try:
        for where, port in proxies:
            tun_pcap = bed.workdir / f"timeline-tun-{port}.pcap"
            extra = extra_for(None if port == bedlib.SOCKS_PORT else port)
            extra["api"] = {"pcap": {"file": str(tun_pcap)}}
            bed.start_tun2socks(bed.workdir / f"tun2socks-timeline-{port}.log", extra=extra)
            try:
                window = _gets(bed, None, CONNS)
            finally:
                bed.stop_tun2socks()  # closes the capture file
            windows.append((f"tun2socks, {where}", port, str(tun_pcap), window))
            windows.append((f"ceiling, {where}", port, None, _gets(bed, port, CONNS)))
    finally:
        time.sleep(0.5)
        _stop_tshark(tshark)
    proxy_side = read_segments(proxy_pcap.read_bytes())
    scenarios = {}
    for name, port, tun_file, window in windows:
        tun = None
        if tun_file is not None:
            with open(tun_file, "rb") as pcap:
                tun = read_segments(pcap.read())
        timelines = flow_timelines(tun, proxy_side, bedlib.HTTP_PORT, port, window)
        scenarios[name] = {
            "flows": len(timelines),
            "steps": median_steps(timelines),
            "per_flow": timelines,
        }
    return {"conns": CONNS, "scenarios": scenarios}

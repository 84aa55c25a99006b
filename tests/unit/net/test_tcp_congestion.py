"""Congestion control toward the client: RFC 5681 slow start and congestion avoidance,
RFC 6928 initial window, RFC 6582 NewReno fast recovery; windows counted in bytes."""

from __future__ import annotations

from tests.support.tcp_helpers import Client, check, established, wrap
from tun2socks.net.congestion import NewReno
from tun2socks.net.tcp import TcpSegment

MSS = 1000
DATA = bytes(range(256)) * 1000  # 256 000 bytes: always more than the windows


def _bulk(wscale: int | None = 7) -> Client:
    c = established(mss=MSS, wscale=wscale, window=65535)
    c.stack.send(c.flow_id, DATA)
    return c


def _payload(segments: list[TcpSegment]) -> int:
    return sum(len(s.payload) for s in segments)


def test_congestion_first_flight_is_the_initial_window_of_ten_segments() -> None:
    # RFC 6928: IW = min(10 * MSS, max(2 * MSS, 14600)); not the client's whole window.
    c = _bulk()
    first = c.output()
    assert [len(s.payload) for s in first] == [MSS] * 10


def test_congestion_slow_start_grows_by_the_bytes_a_stretch_ack_covers() -> None:
    # RFC 5681 3.1 with byte counting (RFC 3465): one ACK for ten segments opens ten more.
    c = _bulk()
    c.absorb(c.output())
    c.send()
    assert _payload(c.output()) == 20 * MSS


def test_congestion_timeout_resends_one_segment_only() -> None:
    # RFC 5681 3.1 equation 4: after an RTO the congestion window is one segment (the loss
    # window), not the whole flight again.
    c = _bulk()
    first = c.output()
    (again,) = c.next_timer_output()
    check(again, seq=first[0].seq, payload=first[0].payload)


def test_congestion_slow_start_after_timeout_doubles_per_round_trip() -> None:
    c = _bulk()
    c.output()
    flights = [c.next_timer_output()]
    for _ in range(3):
        c.absorb(flights[-1])
        c.send()
        flights.append(c.output())
    assert [_payload(f) for f in flights] == [MSS, 2 * MSS, 4 * MSS, 5 * MSS]  # ssthresh 5


def test_congestion_fast_retransmit_halves_the_window() -> None:
    # RFC 5681 3.2: three duplicate ACKs resend the hole and set ssthresh to half the flight;
    # after the full ACK the next flight is at most ssthresh (RFC 6582 3.2 step 3).
    c = _bulk()
    first = c.output()
    c.absorb(first[:1])  # segment 2 is lost; 3..10 arrive out of order
    c.send()
    more = c.output()  # slow start: two more for the one acknowledged
    assert _payload(more) == 2 * MSS
    for _ in range(3):
        c.send()
    (retransmitted,) = c.output()
    check(retransmitted, seq=first[1].seq, payload=first[1].payload)
    c.rcv_nxt = wrap(more[-1].seq + len(more[-1].payload))  # the hole filled: all in
    c.send()
    assert _payload(c.output()) <= 11 * MSS // 2


def test_congestion_partial_ack_resends_the_next_hole() -> None:
    # RFC 6582 3.2 step 4: a partial ACK during recovery retransmits the next hole at once.
    c = _bulk()
    first = c.output()
    c.absorb(first[:1])
    c.send()
    c.output()
    for _ in range(3):
        c.send()
    c.output()  # the fast retransmission of segment 2
    c.rcv_nxt = first[3].seq  # segments 2 and 3 in, segment 4 also lost
    c.send()
    assert c.output()[0].seq == first[3].seq


def test_congestion_dupacks_below_recover_after_a_timeout_do_not_fast_retransmit() -> None:
    # RFC 6582 3.2 step 2: after a timeout, duplicate ACKs for data sent before it (below
    # `recover`) must not start another fast retransmit and halve the window again.
    c = _bulk()
    first = c.output()
    c.absorb(first[:1])  # its ACK was lost
    (again,) = c.next_timer_output()
    assert again.seq == first[0].seq
    c.send()  # ACK for segment 1
    resent = c.output()
    assert resent[0].seq == first[1].seq
    for _ in range(3):  # late copies of the first flight arriving out of order
        c.send()
    assert c.output() == []


def test_congestion_avoidance_adds_one_segment_per_window_acknowledged() -> None:
    # RFC 5681 3.1 equation 3, by bytes: cwnd grows by one SMSS per cwnd of data acked.
    cc = NewReno(MSS)
    cc.on_timeout(flight=20 * MSS, snd_max=20 * MSS, mss=MSS)  # ssthresh = 10 segments
    for _ in range(9):
        cc.on_ack(MSS, 0, 0, MSS)
    assert cc.cwnd == 10 * MSS  # slow start up to ssthresh
    for _ in range(10):
        cc.on_ack(MSS, 0, 0, MSS)
    assert cc.cwnd == 11 * MSS

"""Retransmission (RFC 6298 timer, RFC 5681 fast retransmit, RFC 6582 partial ACKs)."""

from __future__ import annotations

import itertools

import pytest

from tests.support.tcp_helpers import Client, check, established, syn_received, wrap
from tun2socks.net.events import FlowReset
from tun2socks.net.tcp import ACK, FIN, PSH, RST
from tun2socks.net.tcp_conn import TcpState

RTO_MIN = 0.2  # TcpConfig.rto_min: Linux's floor, the link being the local kernel


def test_retransmission_lost_segment_is_resent_after_rto() -> None:
    c = established()
    c.stack.send(c.flow_id, b"lost in the TUN queue")
    (original,) = c.output()
    (again,) = c.next_timer_output()
    check(again, seq=original.seq, payload=original.payload)


def test_retransmission_timeout_doubles() -> None:
    c = established()
    c.stack.send(c.flow_id, b"x" * 100)
    c.output()
    times = [c.now]
    for _ in range(4):
        assert c.next_timer_output()
        times.append(c.now)
    intervals = [b - a for a, b in itertools.pairwise(times)]
    assert intervals == pytest.approx([RTO_MIN, 2 * RTO_MIN, 4 * RTO_MIN, 8 * RTO_MIN])


def test_retransmission_timeout_resends_from_oldest_unacked_byte() -> None:
    c = established(mss=100)
    c.stack.send(c.flow_id, bytes(range(250)))
    first = c.output()
    c.absorb(first[:1])
    c.send()  # the first segment arrived, the other two were lost
    assert c.output() == []
    (again,) = c.next_timer_output()  # one segment: the loss window (RFC 5681 3.1)
    assert again.seq == c.rcv_nxt
    assert c.absorb([again]) == bytes(range(100, 200))
    c.send()
    assert c.absorb(c.output()) == bytes(range(200, 250))


def test_retransmission_stops_when_everything_is_acked() -> None:
    c = established()
    c.stack.send(c.flow_id, b"hello")
    c.absorb(c.output())
    c.send()
    assert c.run_timers(c.now + 100.0) == []


def test_retransmission_three_duplicate_acks_fast_retransmit() -> None:
    c = established(mss=100)
    c.stack.send(c.flow_id, bytes(400))
    segments = c.output()
    lost = segments[0]
    for _ in range(3):  # segments 2, 3 and 4 arrived out of order
        c.send()
    check(c.output_one(), seq=lost.seq, payload=lost.payload)


def test_retransmission_two_duplicate_acks_do_not_retransmit() -> None:
    c = established(mss=100)
    c.stack.send(c.flow_id, bytes(400))
    c.output()
    c.send()
    c.send()
    assert c.output() == []


def test_retransmission_window_update_is_not_a_duplicate_ack() -> None:
    c = established(mss=100)
    c.stack.send(c.flow_id, bytes(400))
    c.output()
    for window in (60000, 61000, 62000):
        c.send(window=window)
    assert c.output() == []


def test_retransmission_partial_ack_resends_next_hole() -> None:
    c = established(mss=100)
    c.stack.send(c.flow_id, bytes(range(200)) * 2)
    segments = c.output()
    for _ in range(3):
        c.send()
    c.output()  # the fast retransmission of segment 1
    c.absorb(segments[:2])  # segment 2 had arrived, segment 3 is lost as well
    c.send()
    check(c.output_one(), seq=segments[2].seq, payload=segments[2].payload)


def test_retransmission_rtt_samples_lower_rto_to_min() -> None:
    c = syn_received()
    c.now += 0.5
    c.send()  # the handshake took 0.5 s: RTO = 0.5 + 4 * 0.25 (RFC 6298 2.2)
    c.stack.send(c.flow_id, b"slow")
    c.output()
    sent_at = c.now
    c.absorb(c.next_timer_output())
    assert c.now - sent_at == pytest.approx(1.5)
    c.send()  # ACK of a retransmission: no sample (Karn)
    for _ in range(40):
        c.stack.send(c.flow_id, b"fast")
        c.absorb(c.output())
        c.now += 0.01
        c.send()
    c.stack.send(c.flow_id, b"lost")
    c.output()
    sent_at = c.now
    c.next_timer_output()
    assert c.now - sent_at == pytest.approx(RTO_MIN)


def test_retransmission_limit_resets_flow_and_sends_rst() -> None:
    c = established()
    c.stack.send(c.flow_id, b"nobody listens")
    c.output()
    retransmissions = 0
    for _ in range(20):
        segments = c.next_timer_output()
        if any(s.flags & RST for s in segments):
            break
        retransmissions += len(segments)
    else:
        pytest.fail("no RST after the retransmissions")
    assert retransmissions == 8  # TcpConfig.max_retransmissions
    assert c.events() == [FlowReset(c.flow_id, "retransmission timeout")]
    assert c.stack.flow_count == 0


def test_retransmission_ack_of_data_sent_before_go_back_n_is_accepted() -> None:
    c = established(mss=100)
    c.stack.send(c.flow_id, bytes(300))
    segments = c.output()
    c.send(window=100)  # the client shrinks its window: go-back-N resends one segment
    c.next_timer_output()
    c.absorb(segments)  # ... but all three had arrived; their ACK was just late
    c.send(window=65535)
    assert c.output() == []
    c.stack.send(c.flow_id, b"next")
    check(c.output_one(), seq=c.rcv_nxt, payload=b"next")


def test_retransmission_lost_fin_is_resent() -> None:
    c = established()
    c.stack.shutdown(c.flow_id)
    (fin,) = c.output()
    (again,) = c.next_timer_output()
    check(again, seq=fin.seq, flags=FIN | ACK)
    assert c.state is TcpState.FIN_WAIT_1


def test_retransmission_syn_ack_retransmitted_flow_still_establishes() -> None:
    c = syn_received()
    c.next_timer_output()
    c.send()
    assert c.state is TcpState.ESTABLISHED
    assert c.output() == []


def test_retransmission_ack_sent_with_every_retransmission() -> None:
    c = established(Client(wscale=None))
    c.send_data(b"request")
    c.output()
    c.stack.send(c.flow_id, b"reply")
    c.output()
    (again,) = c.next_timer_output()
    check(again, flags=ACK | PSH, ack=c.snd_nxt, seq=wrap(c.rcv_nxt))

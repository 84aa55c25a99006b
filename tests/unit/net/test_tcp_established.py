"""ESTABLISHED: receiving (reassembly, ACKs, our window) and sending (MSS, their window)."""

from __future__ import annotations

import itertools
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.tcp_helpers import Client, check, established, make_stack, wrap
from tun2socks.net.events import DataReceived, SendSpaceAvailable
from tun2socks.net.tcp import ACK, PSH, SYN, TcpOptions
from tun2socks.net.tcp_conn import TcpState

# ---------------------------------------------------------------- receiving: in order


def test_established_in_order_data_reports_data_received_once() -> None:
    c = established()
    for chunk in (b"one ", b"two ", b"three"):
        c.send_data(chunk)
    assert c.events() == [DataReceived(c.flow_id)]


def test_established_receive_returns_data_in_order() -> None:
    c = established()
    for chunk in (b"one ", b"two ", b"three"):
        c.send_data(chunk)
    assert c.stack.receive(c.flow_id) == b"one two three"
    assert c.stack.receive(c.flow_id) == b""


def test_established_batch_of_segments_gets_one_cumulative_ack() -> None:
    c = established()
    for chunk in (b"a" * 100, b"b" * 100, b"c" * 100):
        c.send_data(chunk)
    check(c.output_one(), flags=ACK, ack=c.snd_nxt)


def test_established_ack_piggybacks_on_reply_data() -> None:
    c = established()
    c.send_data(b"request")
    c.stack.send(c.flow_id, b"reply")
    check(c.output_one(), flags=ACK | PSH, ack=c.snd_nxt, payload=b"reply")


def test_established_keepalive_is_acked() -> None:
    # RFC 9293 3.8.4: a keep-alive carries SEG.SEQ = SND.NXT-1 and must be answered.
    c = established()
    c.send(seq=wrap(c.snd_nxt - 1))
    check(c.output_one(), flags=ACK, ack=c.snd_nxt, seq=c.rcv_nxt)


@pytest.mark.parametrize("version", [4, 6])
def test_established_data_both_ways(version: int) -> None:
    c = established(version=version)
    c.send_data(b"ping")
    assert c.stack.receive(c.flow_id) == b"ping"
    c.stack.send(c.flow_id, b"pong")
    segment = c.output_one()
    check(segment, ack=c.snd_nxt)
    assert c.absorb([segment]) == b"pong"


def test_established_data_received_again_after_buffer_drained() -> None:
    c = established()
    c.send_data(b"first")
    c.events()
    c.stack.receive(c.flow_id)
    c.send_data(b"second")
    assert c.events() == [DataReceived(c.flow_id)]


# ---------------------------------------------------------------- receiving: out of order


def test_established_out_of_order_segment_sends_duplicate_ack() -> None:
    c = established()
    expected = c.snd_nxt
    c.send(payload=b"later", seq=wrap(c.snd_nxt + 5))
    check(c.output_one(), flags=ACK, ack=expected)


def test_established_out_of_order_data_waits_for_gap() -> None:
    c = established()
    c.send(payload=b"later", seq=wrap(c.snd_nxt + 5))
    assert c.events() == []
    assert c.stack.receive(c.flow_id) == b""


def test_established_gap_filled_delivers_everything_in_order() -> None:
    c = established()
    start = c.snd_nxt
    c.send(payload=b"CCCCC", seq=wrap(start + 10))
    c.send(payload=b"BBBBB", seq=wrap(start + 5))
    c.output()
    c.send_data(b"AAAAA")
    assert c.events() == [DataReceived(c.flow_id)]
    assert c.stack.receive(c.flow_id) == b"AAAAABBBBBCCCCC"
    check(c.output_one(), ack=wrap(start + 15))


def test_established_old_duplicate_is_acked_and_ignored() -> None:
    c = established()
    first = c.send_data(b"hello")
    c.output()
    c.send_segment(first)
    check(c.output_one(), flags=ACK, ack=c.snd_nxt)
    assert c.stack.receive(c.flow_id) == b"hello"


def test_established_overlapping_segment_adds_only_new_bytes() -> None:
    c = established()
    start = c.snd_nxt
    c.send_data(b"hello")
    c.send(payload=b"llo world", seq=wrap(start + 2))
    assert c.stack.receive(c.flow_id) == b"hello world"


def test_established_overlapping_out_of_order_segments_merge() -> None:
    c = established()
    start = c.snd_nxt
    c.send(payload=b"defgh", seq=wrap(start + 3))
    c.send(payload=b"ghijk", seq=wrap(start + 6))
    c.send(payload=b"cdef", seq=wrap(start + 2))
    c.send(payload=b"ab", seq=start)
    assert c.stack.receive(c.flow_id) == b"abcdefghijk"


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_established_reassembly_of_permuted_duplicated_overlapping_segments(
    data: st.DataObject,
) -> None:
    stream = data.draw(st.binary(min_size=1, max_size=3000), label="stream")
    size = len(stream)
    cuts = data.draw(st.sets(st.integers(1, max(1, size - 1)), max_size=25), label="cuts")
    bounds = sorted({0, size} | {cut for cut in cuts if cut < size})
    pieces = list(itertools.pairwise(bounds))
    extra = data.draw(
        st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, 700)), max_size=20),
        label="duplicates and overlaps",
    )
    pieces += [(start, min(size, start + length)) for start, length in extra]
    order = data.draw(st.permutations(pieces), label="order")
    reads = data.draw(st.lists(st.booleans(), min_size=len(order), max_size=len(order)))
    recv_buffer = data.draw(st.sampled_from([512, 1000, 4096]), label="recv_buffer")

    c = established(Client(make_stack(recv_buffer=recv_buffer)))
    base = c.snd_nxt
    delivered = bytearray()
    for (start, end), read in zip(order, reads, strict=True):
        c.send(payload=stream[start:end], seq=wrap(base + start))
        if read:
            delivered += c.stack.receive(c.flow_id)
    # The client retransmits from whatever the stack acknowledged until all is delivered.
    for _ in range(100):
        delivered += c.stack.receive(c.flow_id)
        if len(delivered) == size:
            break
        acks = [s.ack for s in c.output()]
        acked = (acks[-1] - base) & 0xFFFF_FFFF if acks else len(delivered)
        c.send(payload=stream[acked : acked + 400], seq=wrap(base + acked))
    assert bytes(delivered) == stream


def test_established_out_of_order_data_held_is_bounded_by_window() -> None:
    # DESIGN: memory per flow is bounded whatever the peers do.  Overlapping out-of-order
    # segments that each start one byte later must not be stored once per segment.
    recv_buffer = 16 * 1024
    c = established(Client(make_stack(recv_buffer=recv_buffer)))
    start = c.snd_nxt
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for offset in range(1, 1001):
            c.send(payload=bytes(1400), seq=wrap(start + offset))
            c.output()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 4 * recv_buffer + 64 * 1024, held


# ---------------------------------------------------------------- receiving: our window


def test_established_full_receive_buffer_advertises_zero_window() -> None:
    c = established(Client(make_stack(recv_buffer=4000)))
    for _ in range(4):
        c.send_data(b"x" * 1000)
    check(c.output_one(), ack=c.snd_nxt, window=0)


def test_established_advertised_window_shrinks_with_buffered_data() -> None:
    c = established(Client(make_stack(recv_buffer=4000)))
    c.send_data(b"x" * 1500)
    check(c.output_one(), window=2500)


def test_established_segment_beyond_zero_window_is_not_accepted() -> None:
    c = established(Client(make_stack(recv_buffer=1000)))
    c.send_data(b"x" * 1000)
    c.output()
    edge = c.snd_nxt
    c.send_data(b"overflow")
    check(c.output_one(), ack=edge, window=0)
    assert c.stack.receive(c.flow_id) == b"x" * 1000


def test_established_segment_straddling_window_edge_is_trimmed() -> None:
    c = established(Client(make_stack(recv_buffer=1000)))
    start = c.snd_nxt
    c.send_data(b"a" * 900 + b"b" * 200)
    check(c.output_one(), ack=wrap(start + 1000), window=0)
    assert c.stack.receive(c.flow_id) == b"a" * 900 + b"b" * 100


def test_established_receive_sends_window_update() -> None:
    c = established(Client(make_stack(recv_buffer=4000)))
    c.send_data(b"x" * 4000)
    c.output()
    c.stack.receive(c.flow_id)
    check(c.output_one(), flags=ACK, ack=c.snd_nxt, window=4000)


def test_established_window_field_is_shifted_by_our_wscale() -> None:
    c = established(Client(make_stack(recv_buffer=256 * 1024), wscale=2))
    c.send_data(b"x" * 1000)
    check(c.output_one(), window=(256 * 1024 - 1000) >> 3)


def test_established_window_field_unscaled_without_client_wscale() -> None:
    c = established(Client(make_stack(recv_buffer=256 * 1024), wscale=None))
    c.send_data(b"x" * 1000)
    check(c.output_one(), window=0xFFFF)


# ---------------------------------------------------------------- sending


def test_established_send_cuts_segments_at_client_mss() -> None:
    c = established(mss=500)
    c.stack.send(c.flow_id, bytes(1200))
    assert [len(s.payload) for s in c.output()] == [500, 500, 200]


def test_established_send_cuts_segments_at_our_mss() -> None:
    c = established(Client(make_stack(mtu=1000), mss=9000))
    c.stack.send(c.flow_id, bytes(2000))
    assert [len(s.payload) for s in c.output()] == [960, 960, 80]


def test_established_send_without_client_mss_uses_default_536() -> None:
    c = established(mss=None)
    c.stack.send(c.flow_id, bytes(600))
    assert [len(s.payload) for s in c.output()] == [536, 64]


def test_established_send_data_is_sequenced_and_pushed() -> None:
    c = established(mss=500)
    payload = bytes(range(256)) * 4
    c.stack.send(c.flow_id, payload)
    segments = c.output()
    assert c.absorb(segments) == payload
    assert segments[-1].flags == ACK | PSH
    assert all(s.ack == c.snd_nxt for s in segments)


def test_established_send_never_exceeds_client_window() -> None:
    c = established(window=1000)
    c.stack.send(c.flow_id, bytes(5000))
    assert sum(len(s.payload) for s in c.output()) == 1000


def test_established_send_resumes_when_window_opens() -> None:
    c = established(window=1000)
    c.stack.send(c.flow_id, bytes(3000))
    c.absorb(c.output())
    c.send(window=2000)
    segments = c.output()
    assert segments[0].seq == c.rcv_nxt
    assert sum(len(s.payload) for s in segments) == 2000


def test_established_client_wscale_scales_send_window() -> None:
    c = established(wscale=4, mss=200)  # full segments: silly-window avoidance stays out
    c.send(window=100)  # 100 << 4 = 1600 bytes
    c.stack.send(c.flow_id, bytes(5000))
    assert sum(len(s.payload) for s in c.output()) == 1600


def test_established_zero_window_after_ack_arms_persist_probe() -> None:
    c = established(window=1000)
    c.stack.send(c.flow_id, bytes(3000))
    c.absorb(c.output())
    c.send(window=0)
    assert c.output() == []
    probe = c.next_timer_output(limit=c.now + 60)
    assert len(probe) == 1
    check(probe[0], flags=ACK, seq=wrap(c.rcv_nxt - 1), payload=b"")


def test_established_send_into_zero_window_arms_persist_probe() -> None:
    c = established(window=0)
    c.stack.send(c.flow_id, b"waiting")
    assert c.output() == []
    probe = c.next_timer_output(limit=c.now + 60)
    assert len(probe) == 1
    check(probe[0], flags=ACK, seq=wrap(c.rcv_nxt - 1), payload=b"")


def test_established_persist_probes_back_off() -> None:
    c = established(window=1000)
    c.stack.send(c.flow_id, bytes(3000))
    c.absorb(c.output())
    c.send(window=0)
    times = [c.now]
    for _ in range(3):
        assert len(c.next_timer_output(limit=c.now + 60)) == 1
        c.send(window=0)  # the client answers each probe: still zero
        times.append(c.now)
    intervals = [b - a for a, b in itertools.pairwise(times)]
    assert intervals[1] > intervals[0]
    assert intervals[2] > intervals[1]


def test_established_data_flows_after_window_update() -> None:
    c = established(window=1000)
    c.stack.send(c.flow_id, bytes(3000))
    c.absorb(c.output())
    c.send(window=0)
    c.next_timer_output(limit=c.now + 60)
    c.send(window=65535)
    segments = c.output()
    assert segments[0].seq == c.rcv_nxt
    assert sum(len(s.payload) for s in segments) == 2000


def test_established_send_returns_no_space_when_buffer_full() -> None:
    c = established(Client(make_stack(send_buffer=4096)))
    assert c.stack.send(c.flow_id, bytes(1000)) == 3096
    assert c.stack.send(c.flow_id, bytes(3096)) <= 0


def test_established_send_space_available_after_acks_drain_buffer() -> None:
    c = established(Client(make_stack(send_buffer=4096), mss=1000))
    assert c.stack.send(c.flow_id, bytes(4096)) <= 0
    segments = c.output()
    c.absorb(segments[:1])
    c.send()
    assert c.events() == []  # 3096 bytes still queued: more than half
    c.absorb(segments[1:3])
    c.send()
    assert c.events() == [SendSpaceAvailable(c.flow_id)]


def test_established_ack_of_unsent_data_is_answered_and_ignored() -> None:
    c = established()
    c.stack.send(c.flow_id, b"hello")
    c.output()
    c.send(ack=wrap(c.rcv_nxt + 1000))
    check(c.output_one(), flags=ACK, seq=wrap(c.rcv_nxt + 5), ack=c.snd_nxt)
    assert c.state is TcpState.ESTABLISHED


def test_established_syn_sends_challenge_ack() -> None:
    c = established()
    c.send(flags=SYN, seq=wrap(c.snd_nxt + 100), options=TcpOptions(mss=1460))
    check(c.output_one(), flags=ACK, ack=c.snd_nxt)
    assert c.state is TcpState.ESTABLISHED
    assert c.events() == []

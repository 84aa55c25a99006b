"""Blind in-window attacks (RFC 5961) and segment acceptability (RFC 9293 3.10.7.4).

An off-path attacker guesses sequence numbers; each check here makes a guess that is not
exact cost nothing but a (rate-limited) ACK.
"""

from __future__ import annotations

from tests.support.tcp_helpers import Client, check, established, make_stack, syn_sent, wrap
from tun2socks.net.events import FlowReset
from tun2socks.net.tcp import ACK, PSH, RST, SYN
from tun2socks.net.tcp_conn import TcpState

# ---------------------------------------------------------------- unacceptable segments


def test_established_blind_segment_far_ahead_is_dropped_and_keeps_the_send_window() -> None:
    # RFC 9293 3.10.7.4: an unacceptable segment gets an ACK and is dropped; its ACK and
    # window never reach the send-window logic (RFC 5961 5.2).
    c = established()
    c.send(seq=wrap(c.snd_nxt + 2**30), ack=wrap(c.rcv_nxt - 2**30), window=0)
    check(c.output_one(), flags=ACK, seq=c.rcv_nxt, ack=c.snd_nxt)
    c.stack.send(c.flow_id, b"the download goes on")
    check(c.output_one(), flags=ACK | PSH, payload=b"the download goes on")


def test_established_window_update_still_accepted_after_a_blind_segment() -> None:
    # The blind segment must not move SND.WL1 ahead: a genuine update later still counts.
    c = established()
    c.send(window=0)
    c.send(seq=wrap(c.snd_nxt + 2**30), window=0)
    c.output()
    c.send(window=65535)
    c.stack.send(c.flow_id, b"x" * 100)
    check(c.output_one(), payload=b"x" * 100)


# ---------------------------------------------------------------- ACK acceptability


def test_established_data_with_ack_far_below_snd_una_gets_challenge_ack_and_is_dropped() -> None:
    # RFC 5961 5.2: SEG.ACK < SND.UNA - MAX.SND.WND: challenge ACK, data not delivered.
    c = established()
    c.send(payload=b"injected", ack=wrap(c.rcv_nxt - 2**31 + 1))
    check(c.output_one(), flags=ACK, ack=c.snd_nxt, seq=c.rcv_nxt)
    assert c.events() == []
    assert c.stack.receive(c.flow_id) == b""


def test_established_ack_above_snd_nxt_gets_challenge_ack_and_is_dropped() -> None:
    # RFC 5961 5.2 / RFC 9293 3.10.7.4: an ACK for something not yet sent.
    c = established()
    c.send(payload=b"injected", ack=wrap(c.rcv_nxt + 1000))
    check(c.output_one(), flags=ACK, ack=c.snd_nxt)
    assert c.stack.receive(c.flow_id) == b""


def test_established_old_ack_within_max_snd_wnd_is_a_harmless_duplicate() -> None:
    # RFC 5961 5.2: an ACK in [SND.UNA - MAX.SND.WND, SND.UNA) is acceptable; data counts.
    c = established()
    c.stack.send(c.flow_id, b"a" * 100)
    c.absorb(c.output())
    c.send()
    c.send_data(b"late but fine", ack=wrap(c.rcv_nxt - 50))
    assert c.stack.receive(c.flow_id) == b"late but fine"


def test_established_zero_window_probe_at_rcv_nxt_still_acknowledges_our_data() -> None:
    # RFC 9293 3.10.7.4: with RCV.WND zero, valid ACKs are still accepted.
    c = established(Client(make_stack(recv_buffer=1000)))
    c.send_data(b"f" * 1000)  # our receive window is now 0
    c.output()
    c.stack.send(c.flow_id, b"reply")
    c.absorb(c.output())
    c.send(payload=b"p")  # a zero-window probe carrying the ACK of "reply"
    check(c.output_one(), flags=ACK, window=0)
    assert c.run_timers(c.now + 30.0) == []  # nothing left to retransmit


# ---------------------------------------------------------------- challenge ACK rate limit


def test_established_challenge_acks_are_rate_limited() -> None:
    # RFC 5961 7: a flood of in-window SYNs or RSTs must not become a flood of ACKs.
    c = established()
    for _ in range(30):
        c.send(flags=SYN, seq=c.snd_nxt)
    for offset in range(1, 31):
        c.send(flags=RST, seq=wrap(c.snd_nxt + offset))
    assert len(c.output()) == 10
    assert c.state is TcpState.ESTABLISHED
    c.now += 5.0
    c.send(flags=SYN, seq=c.snd_nxt)
    check(c.output_one(), flags=ACK, ack=c.snd_nxt)


# ---------------------------------------------------------------- LISTEN (upstream pending)


def test_listen_rst_with_inexact_sequence_keeps_the_pending_flow() -> None:
    # RFC 5961 3 (RFC 9293 3.10.7.2): only a RST at exactly the next sequence number counts.
    c = syn_sent()
    for seq in (wrap(c.snd_nxt + 1), wrap(c.snd_nxt + 5000), wrap(c.snd_nxt - 1)):
        c.send(flags=RST, seq=seq, ack=0)
    assert c.events() == []
    assert c.state is TcpState.LISTEN
    c.send(flags=RST, seq=c.snd_nxt, ack=0)
    assert c.events() == [FlowReset(c.flow_id, "reset by client")]
    assert c.state is None

"""Idle connections live (RFC 5382 REQ-5): keep-alive probes (RFC 9293 3.8.4, RFC 1122
4.2.3.6), and a reset only when the client no longer answers."""

from __future__ import annotations

from tests.support.tcp_helpers import Client, check, established, make_stack, syn_sent, wrap
from tun2socks.net.events import FlowReset
from tun2socks.net.tcp import ACK, RST
from tun2socks.net.tcp_conn import TcpState

HOUR = 3600.0


def test_keepalive_idle_flow_is_probed_with_an_ack_at_snd_nxt_minus_one() -> None:
    # RFC 9293 3.8.4: a keep-alive is a segment with SEG.SEQ = SND.NXT - 1, no data.
    c = established(Client(make_stack(idle_timeout=30.0, keepalive_interval=5.0)))
    c.stack.send(c.flow_id, b"hello")
    c.absorb(c.output())
    c.send()
    (probe,) = c.run_timers(c.now + 30.0)
    check(probe, flags=ACK, seq=wrap(c.rcv_nxt - 1), ack=c.snd_nxt, payload=b"")
    assert c.state is TcpState.ESTABLISHED


def test_keepalive_answered_probes_keep_an_idle_flow_for_hours() -> None:
    # RFC 5382 REQ-5: an established flow must not be dropped for idleness under 2 h 4 min;
    # a client that answers keep-alives is kept whatever the time.
    c = established()
    end = c.now + 3 * HOUR
    probes = 0
    for _ in range(1000):
        segments = c.next_timer_output(limit=end)
        if not segments:
            break
        assert [s.flags for s in segments] == [ACK]
        probes += 1
        c.send()  # the client's kernel answers the out-of-window probe with an ACK
    assert probes >= 3 * HOUR / 600.0 - 1
    assert c.state is TcpState.ESTABLISHED
    assert c.events() == []


def test_keepalive_probes_restart_when_the_client_answers_late() -> None:
    c = established(Client(make_stack(idle_timeout=30.0, keepalive_interval=5.0)))
    c.run_timers(c.now + 30.0 + 8 * 5.0)  # nine probes unanswered so far
    c.send()  # the client is back
    segments = c.run_timers(c.now + 30.0)
    assert [s.flags for s in segments] == [ACK]
    assert c.state is TcpState.ESTABLISHED


def test_listen_flow_still_times_out_at_the_idle_timeout() -> None:
    # Nothing can be probed before the handshake: a half-open flow goes after idle_timeout.
    c = syn_sent(Client(make_stack(idle_timeout=30.0)))
    segments = c.run_timers(c.now + 30.0)
    assert [s.flags & RST for s in segments] == [RST]
    assert c.events() == [FlowReset(c.flow_id, "idle timeout")]

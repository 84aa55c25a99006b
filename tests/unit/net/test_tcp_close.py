"""Closing: FIN each way (RFC 9293 3.6), TIME-WAIT, RST (RFC 5961), CLOSED, idle timeout."""

from __future__ import annotations

import pytest

from tests.support.tcp_helpers import (
    Client,
    check,
    close_wait,
    established,
    fin_wait_1,
    fin_wait_2,
    last_ack,
    make_stack,
    syn_sent,
    time_wait,
    wrap,
)
from tun2socks.net.events import DataReceived, EofReceived, FlowEnded, FlowRequested, FlowReset
from tun2socks.net.tcp import ACK, FIN, PSH, RST, SYN
from tun2socks.net.tcp_conn import TcpState

TIME_WAIT = 2.0  # StackConfig.time_wait

# ---------------------------------------------------------------- passive close


def test_established_client_fin_reports_eof() -> None:
    c = established()
    c.send_fin()
    assert c.events() == [EofReceived(c.flow_id)]


def test_established_client_fin_is_acked_and_enters_close_wait() -> None:
    c = established()
    c.send_fin()
    check(c.output_one(), flags=ACK, ack=c.snd_nxt)
    assert c.state is TcpState.CLOSE_WAIT


def test_established_client_fin_after_data_keeps_data_first() -> None:
    c = established()
    c.send_data(b"last words", flags=FIN | ACK)
    assert c.events() == [DataReceived(c.flow_id), EofReceived(c.flow_id)]
    assert c.stack.receive(c.flow_id) == b"last words"


def test_close_wait_shutdown_sends_fin_and_enters_last_ack() -> None:
    c = close_wait()
    c.stack.shutdown(c.flow_id)
    check(c.output_one(), flags=FIN | ACK, seq=c.rcv_nxt, ack=c.snd_nxt)
    assert c.state is TcpState.LAST_ACK


def test_close_wait_server_data_still_reaches_client() -> None:
    c = close_wait()
    c.stack.send(c.flow_id, b"half-close reply")
    assert c.absorb(c.output()) == b"half-close reply"


def test_last_ack_ack_of_fin_ends_flow() -> None:
    c = last_ack()
    c.send()
    assert c.events() == [FlowEnded(c.flow_id)]
    assert c.stack.connection(c.flow_id) is None
    assert c.output() == []


def test_last_ack_retransmitted_client_fin_is_acked_again() -> None:
    c = last_ack()
    c.send(flags=FIN | ACK, seq=wrap(c.snd_nxt - 1), ack=wrap(c.rcv_nxt - 1))
    check(c.output_one(), flags=ACK, ack=c.snd_nxt, seq=c.rcv_nxt)
    assert c.state is TcpState.LAST_ACK


def test_close_wait_rst_resets_flow() -> None:
    c = close_wait()
    c.send(flags=RST)
    assert c.events() == [FlowReset(c.flow_id, "reset by client")]
    assert c.stack.connection(c.flow_id) is None


# ---------------------------------------------------------------- active close


def test_established_shutdown_sends_fin_after_queued_data() -> None:
    c = established(mss=100)
    c.stack.send(c.flow_id, bytes(250))
    c.stack.shutdown(c.flow_id)
    segments = c.output()
    assert len(c.absorb(segments)) == 250
    check(segments[-1], flags=ACK | PSH | FIN, seq=wrap(c.rcv_nxt - 51))
    assert c.state is TcpState.FIN_WAIT_1


def test_fin_wait_1_ack_of_fin_enters_fin_wait_2() -> None:
    c = fin_wait_1()
    c.send()
    assert c.state is TcpState.FIN_WAIT_2
    assert c.events() == []


def test_fin_wait_1_ack_of_data_only_stays_in_fin_wait_1() -> None:
    c = established(mss=100)
    c.stack.send(c.flow_id, bytes(200))
    c.stack.shutdown(c.flow_id)
    segments = c.output()
    c.absorb(segments[:1])
    c.send()
    assert c.state is TcpState.FIN_WAIT_1


def test_fin_wait_2_client_data_still_delivered() -> None:
    c = fin_wait_2()
    c.send_data(b"still talking")
    assert c.events() == [DataReceived(c.flow_id)]
    assert c.stack.receive(c.flow_id) == b"still talking"


def test_fin_wait_2_client_fin_enters_time_wait_and_ends_flow() -> None:
    c = fin_wait_2()
    c.send_fin()
    check(c.output_one(), flags=ACK, ack=c.snd_nxt, seq=c.rcv_nxt)
    assert c.events() == [EofReceived(c.flow_id), FlowEnded(c.flow_id)]
    assert c.state is TcpState.TIME_WAIT


def test_time_wait_flow_removed_after_time_wait() -> None:
    c = time_wait()
    start = c.now
    assert c.run_timers(start + TIME_WAIT - 0.01) == []
    assert c.state is TcpState.TIME_WAIT
    assert c.run_timers(start + TIME_WAIT) == []
    assert c.stack.connection(c.flow_id) is None
    assert c.events() == []


def test_time_wait_retransmitted_fin_is_acked_again() -> None:
    c = time_wait()
    c.send(flags=FIN | ACK, seq=wrap(c.snd_nxt - 1))
    check(c.output_one(), flags=ACK, ack=c.snd_nxt, seq=c.rcv_nxt)
    assert c.state is TcpState.TIME_WAIT


def test_time_wait_retransmitted_fin_restarts_timer() -> None:
    # RFC 9293 3.10.7.4 (TIME-WAIT): "Restart the 2 MSL time-wait timeout."
    c = time_wait()
    c.run_timers(c.now + TIME_WAIT / 2)
    c.send(flags=FIN | ACK, seq=wrap(c.snd_nxt - 1))
    c.output()
    refreshed = c.now
    c.run_timers(refreshed + TIME_WAIT - 0.01)
    assert c.state is TcpState.TIME_WAIT


def test_time_wait_new_syn_starts_new_connection() -> None:
    c = time_wait()
    old = c.flow_id
    c.iss = wrap(c.snd_nxt + 100_000)
    c.send_syn()
    (event,) = c.events()
    assert isinstance(event, FlowRequested)
    assert event.flow_id != old
    assert c.stack.connection(old) is None


def test_time_wait_rst_removes_flow_without_event() -> None:
    c = time_wait()
    c.send(flags=RST)
    assert c.events() == []
    assert c.stack.connection(c.flow_id) is None


# ---------------------------------------------------------------- simultaneous close


def test_fin_wait_1_client_fin_enters_closing() -> None:
    c = fin_wait_1()
    c.send_fin(ack=wrap(c.rcv_nxt - 1))  # the client has not seen our FIN yet
    check(c.output_one(), flags=ACK, ack=c.snd_nxt)
    assert c.events() == [EofReceived(c.flow_id)]
    assert c.state is TcpState.CLOSING


def test_closing_ack_of_fin_enters_time_wait() -> None:
    c = fin_wait_1()
    c.send_fin(ack=wrap(c.rcv_nxt - 1))
    c.output()
    c.events()
    c.send()
    assert c.events() == [FlowEnded(c.flow_id)]
    assert c.state is TcpState.TIME_WAIT


def test_fin_wait_1_fin_acking_our_fin_enters_time_wait() -> None:
    c = fin_wait_1()
    c.send_fin()
    check(c.output_one(), flags=ACK, ack=c.snd_nxt)
    assert c.events() == [EofReceived(c.flow_id), FlowEnded(c.flow_id)]
    assert c.state is TcpState.TIME_WAIT


# ---------------------------------------------------------------- FIN out of order


def test_established_out_of_order_fin_waits_for_data() -> None:
    c = established()
    start = c.snd_nxt
    c.send(payload=b"world", seq=wrap(start + 6), flags=FIN | ACK)
    assert c.events() == []
    assert c.state is TcpState.ESTABLISHED
    check(c.output_one(), ack=start)


def test_established_out_of_order_fin_processed_when_gap_fills() -> None:
    c = established()
    start = c.snd_nxt
    c.send(payload=b"world", seq=wrap(start + 6), flags=FIN | ACK)
    c.output()
    c.send_data(b"hello ")
    assert c.events() == [DataReceived(c.flow_id), EofReceived(c.flow_id)]
    assert c.stack.receive(c.flow_id) == b"hello world"
    check(c.output_one(), ack=wrap(start + 12))
    assert c.state is TcpState.CLOSE_WAIT


# ---------------------------------------------------------------- RST (RFC 5961 3.2)


def test_established_rst_with_exact_seq_resets_flow() -> None:
    c = established()
    c.send(flags=RST)
    assert c.events() == [FlowReset(c.flow_id, "reset by client")]
    assert c.stack.connection(c.flow_id) is None
    assert c.output() == []


def test_established_rst_in_window_wrong_seq_sends_challenge_ack() -> None:
    c = established()
    c.send(flags=RST, seq=wrap(c.snd_nxt + 1000))
    check(c.output_one(), flags=ACK, ack=c.snd_nxt, seq=c.rcv_nxt)
    assert c.events() == []
    assert c.state is TcpState.ESTABLISHED


def test_established_rst_outside_window_is_ignored() -> None:
    c = established()
    c.send(flags=RST, seq=wrap(c.snd_nxt - 1000))
    assert c.output() == []
    assert c.state is TcpState.ESTABLISHED


def test_established_abort_sends_rst() -> None:
    c = established()
    c.stack.abort(c.flow_id)
    check(c.output_one(), flags=RST | ACK, seq=c.rcv_nxt)
    assert c.events() == []
    assert c.stack.connection(c.flow_id) is None


def test_established_abort_after_go_back_n_rst_carries_highest_seq_sent() -> None:
    # RFC 9293 3.10.5: <SEQ=SND.NXT><CTL=RST>, SND.NXT being the highest sequence sent; a
    # client that got everything accepts a RST only at its RCV.NXT (RFC 5961 3.2).
    c = established(mss=100)
    c.stack.send(c.flow_id, bytes(300))
    segments = c.output()
    c.send(window=100)  # the window shrinks: the go-back-N resends one segment only
    c.next_timer_output()
    c.absorb(segments)  # all three had arrived; the client's ACK is still on its way
    c.stack.abort(c.flow_id)
    check(c.output_one(), flags=RST | ACK, seq=c.rcv_nxt)


def test_listen_abort_sends_rst_for_syn() -> None:
    c = syn_sent()
    c.stack.abort(c.flow_id)
    check(c.output_one(), flags=RST | ACK, ack=wrap(c.iss + 1))
    assert c.stack.flow_count == 0


# ---------------------------------------------------------------- CLOSED (RFC 9293 3.10.7.1)


@pytest.mark.parametrize("version", [4, 6])
def test_closed_segment_with_ack_gets_rst_with_seq_of_their_ack(version: int) -> None:
    c = Client(version=version)
    c.send(seq=1234, ack=5678, payload=b"stray")
    check(c.output_one(), flags=RST, seq=5678, ack=0)
    assert c.stack.drops["no_flow"] == 1
    assert c.events() == []


@pytest.mark.parametrize("version", [4, 6])
def test_closed_segment_without_ack_gets_rst_ack_acking_it(version: int) -> None:
    c = Client(version=version)
    c.send(seq=1234, ack=0, flags=FIN, payload=b"stray")
    check(c.output_one(), flags=RST | ACK, seq=0, ack=1234 + 5 + 1)


def test_closed_rst_is_not_answered() -> None:
    c = Client()
    c.send(flags=RST)
    assert c.output() == []


def test_closed_syn_ack_gets_rst() -> None:
    c = Client()
    c.send(flags=SYN | ACK, ack=777)
    check(c.output_one(), flags=RST, seq=777)
    assert c.events() == []


def test_closed_after_flow_ended_segments_get_rst() -> None:
    c = last_ack()
    c.send()
    c.events()
    c.send_data(b"late")
    check(c.output_one(), flags=RST, seq=c.rcv_nxt)


# ---------------------------------------------------------------- idle flows (keep-alive)


def test_established_idle_flow_reset_only_after_unanswered_keepalives() -> None:
    # RFC 9293 3.8.4, RFC 5382 REQ-5: silence alone never resets; unanswered probes do.
    c = established(Client(make_stack(idle_timeout=30.0, keepalive_interval=5.0)))
    start = c.now
    segments = c.run_timers(start + 30.0 + 9 * 5.0)
    assert [s.flags for s in segments] == [ACK] * 9 + [RST | ACK]
    assert c.events() == [FlowReset(c.flow_id, "keep-alive timeout")]
    assert c.stack.connection(c.flow_id) is None


def test_established_client_segment_restarts_idle_timer() -> None:
    c = established(Client(make_stack(idle_timeout=30.0)))
    c.run_timers(c.now + 20.0)
    c.send()
    c.run_timers(c.now + 20.0)
    assert c.state is TcpState.ESTABLISHED
    assert c.events() == []

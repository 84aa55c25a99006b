"""LISTEN (the SYN held until the upstream answers) and SYN-RECEIVED, segment by segment."""

from __future__ import annotations

import itertools
from ipaddress import ip_address

import pytest

from tests.support.tcp_helpers import (
    CLIENT_PORT,
    SERVER_PORT,
    Client,
    check,
    make_stack,
    syn_received,
    syn_sent,
    wrap,
)
from tun2socks.net.events import FlowRequested, FlowReset
from tun2socks.net.tcp import ACK, FIN, RST, SYN
from tun2socks.net.tcp_conn import TcpState

# ---------------------------------------------------------------- LISTEN (waiting for accept)


@pytest.mark.parametrize("version", [4, 6])
def test_listen_syn_requests_flow(version: int) -> None:
    c = Client(version=version)
    c.send_syn()
    events = c.events()
    assert len(events) == 1
    event = events[0]
    assert isinstance(event, FlowRequested)
    assert (event.src, event.src_port) == (ip_address(c.addr), CLIENT_PORT)
    assert (event.dst, event.dst_port) == (ip_address(c.server_addr), SERVER_PORT)


def test_listen_syn_sends_nothing_until_accept() -> None:
    c = syn_sent()
    assert c.output() == []
    assert c.run_timers(c.now + 30.0) == []


def test_listen_retransmitted_syn_changes_nothing() -> None:
    c = syn_sent()
    c.send_syn()
    assert c.events() == []
    assert c.output() == []
    assert c.stack.flow_count == 1
    assert c.state is TcpState.LISTEN


@pytest.mark.parametrize(("version", "header"), [(4, 40), (6, 60)])
def test_listen_accept_sends_syn_ack_with_mss_from_mtu(version: int, header: int) -> None:
    c = syn_sent(Client(make_stack(mtu=1400), version))
    c.stack.accept(c.flow_id, c.now)
    syn_ack = c.output_one()
    check(syn_ack, flags=SYN | ACK, ack=wrap(c.iss + 1), payload=b"")
    assert syn_ack.options.mss == 1400 - header


def test_listen_accept_without_client_wscale_omits_wscale() -> None:
    c = syn_sent(wscale=None)
    c.stack.accept(c.flow_id, c.now)
    assert c.output_one().options.wscale is None


def test_listen_accept_with_client_wscale_sends_wscale() -> None:
    c = syn_sent(Client(make_stack(recv_buffer=256 * 1024), wscale=7))
    c.stack.accept(c.flow_id, c.now)
    syn_ack = c.output_one()
    # 256 KiB needs a shift of 3 to fit the 16-bit window field (RFC 7323 2.3).
    assert syn_ack.options.wscale == 3
    assert syn_ack.window == 0xFFFF  # never scaled in a SYN (RFC 7323 2.2)


def test_listen_reject_sends_rst_ack_for_syn() -> None:
    c = syn_sent()
    c.stack.reject(c.flow_id)
    rst = c.output_one()
    check(rst, flags=RST | ACK, ack=wrap(c.iss + 1))
    assert c.stack.flow_count == 0
    assert c.events() == []


def test_listen_rst_resets_flow() -> None:
    c = syn_sent()
    c.send(flags=RST, ack=0)
    assert c.events() == [FlowReset(c.flow_id, "reset by client")]
    assert c.output() == []
    assert c.stack.flow_count == 0


def test_listen_over_half_open_cap_answers_from_the_syn_cache() -> None:
    """Over the cap a SYN gets a SYN-ACK at once and no upstream (a SYN flood costs nothing)."""
    stack = make_stack(max_half_open=2)
    for port in (1000, 1001):
        syn_sent(Client(stack, port=port))
    extra = Client(stack, port=1002)
    extra.send_syn()
    syn_ack = extra.output_one()
    check(syn_ack, flags=SYN | ACK, ack=wrap(extra.iss + 1))
    assert extra.events() == []  # no FlowRequested until the client proves it is real
    assert stack.drops["half_open_limit"] == 1


def syn_answered_from_the_cache() -> Client:
    """The half-open cap (1) taken by another client: this one's SYN on port 1001 got its
    SYN-ACK from the SYN cache, not yet ACKed (the stack has asked for no flow yet)."""
    stack = make_stack(max_half_open=1)
    syn_sent(Client(stack, port=1000))
    extra = Client(stack, port=1001)
    extra.send_syn()
    syn_ack = extra.output_one()
    extra.snd_nxt = wrap(extra.iss + 1)
    extra.rcv_nxt = wrap(syn_ack.seq + 1)
    return extra


def test_syn_cache_flow_is_requested_once_the_handshake_completes() -> None:
    extra = syn_answered_from_the_cache()
    stack = extra.stack
    extra.send_data(b"early")
    events = extra.events()
    assert isinstance(events[-1], FlowRequested) and events[-1].src_port == 1001, events
    extra.flow_id = events[-1].flow_id
    assert extra.state is TcpState.ESTABLISHED
    stack.accept(extra.flow_id, extra.now)  # the upstream connected: nothing more to do
    assert stack.receive(extra.flow_id) == b"early"


def test_syn_cache_flow_whose_upstream_fails_is_reset() -> None:
    extra = syn_answered_from_the_cache()
    stack = extra.stack
    extra.send()
    [requested] = extra.events()
    assert isinstance(requested, FlowRequested)
    extra.output()
    stack.reject(requested.flow_id)
    check(extra.output_one(), flags=RST | ACK)
    assert stack.connection(requested.flow_id) is None


def test_syn_cache_is_bounded_oldest_evicted_silently() -> None:
    stack = make_stack(max_half_open=1, max_syn_cache=2)
    syn_sent(Client(stack, port=1000))
    flood = [Client(stack, port=2000 + i) for i in range(3)]
    for client in flood[:2]:
        client.send_syn()
        check(client.output_one(), flags=SYN | ACK)
    flood[2].send_syn()
    replies = {segment.dst_port: segment.flags for segment in flood[2].output()}
    assert replies == {2002: SYN | ACK}  # no RST for 2000: it may be a real client
    assert stack.flow_count == 1 + 2  # the held SYN and a cache of two


def syn_cache_full_of_flood(stack_options: dict[str, int] | None = None) -> tuple[Client, int]:
    """A real client answered from the SYN cache, then evicted by a flood; its SYN-ACK's seq."""
    stack = make_stack(max_half_open=1, max_syn_cache=2, **(stack_options or {}))
    syn_sent(Client(stack, port=1000))
    real = Client(stack, port=1001, wscale=7, mss=1400)
    real.send_syn()
    syn_ack = real.output_one()
    for port in (2000, 2001):
        flood = Client(stack, port=port)
        flood.send_syn()
        assert all(segment.dst_port == port for segment in flood.output())  # none for 1001
    assert stack.flow_count == 3 and not any(
        conn.remote_port == 1001 for conn in stack.connections()
    )
    real.snd_nxt = wrap(real.iss + 1)
    real.rcv_nxt = wrap(syn_ack.seq + 1)
    return real, syn_ack.seq


def test_rfc4987_s3_6_ack_after_syn_cache_eviction_completes_from_the_cookie() -> None:
    """The flaky SYN-flood test: a real client's cache entry was evicted by the flood (with a
    RST) before its ACK arrived; the ACK then met no flow (another RST). Now the SYN-ACK's ISN
    is a cookie, eviction is silent and the ACK rebuilds the flow."""
    real, _ = syn_cache_full_of_flood()
    real.send_data(b"hello")
    events = real.events()
    assert isinstance(events[-1], FlowRequested) and events[-1].src_port == 1001, events
    real.flow_id = events[-1].flow_id
    assert real.state is TcpState.ESTABLISHED
    [ack] = real.output()
    check(ack, flags=ACK, ack=real.snd_nxt)  # the data is acknowledged, nothing is reset
    conn = real.stack.connection(real.flow_id)
    # the cookie kept the SYN's window scale and its MSS, rounded down to the table's 1360
    assert conn is not None and (conn.snd_wscale, conn.peer_mss) == (7, 1360)
    real.stack.accept(real.flow_id, real.now)
    assert real.stack.receive(real.flow_id) == b"hello"
    assert real.stack.cookie_flows == 1


def test_rfc4987_s3_6_syn_retransmitted_after_eviction_gets_the_same_syn_ack() -> None:
    real, first_seq = syn_cache_full_of_flood()
    real.now += 1.0  # the SYN-ACK was lost: the client's SYN timer fires
    real.send_syn()
    check(real.output_one(), flags=SYN | ACK, seq=first_seq, ack=wrap(real.iss + 1))


def test_syn_cache_syn_ack_is_retransmitted_like_any_other_before_giving_up() -> None:
    """A burst queues real clients' ACKs for seconds: a cache entry that gave up after one
    retry (3 s) reset them. It now keeps the RFC 6298 backoff and Linux's 5 retries."""
    stack = make_stack(max_half_open=1)
    syn_sent(Client(stack, port=1000))
    cached = Client(stack, port=1001)
    cached.send_syn()
    first = cached.output_one()
    times, syn_acks = [cached.now], 0
    for _ in range(20):
        segments = [s for s in cached.next_timer_output() if s.dst_port == 1001]
        if any(s.flags & RST for s in segments):
            break
        syn_acks += sum(1 for s in segments if s.flags & SYN and s.seq == first.seq)
        times.append(cached.now)
    assert syn_acks == 5
    assert [b - a for a, b in itertools.pairwise(times)] == pytest.approx([1, 2, 4, 8, 16])


def test_rfc4987_s3_6_ack_with_a_forged_or_expired_cookie_is_reset() -> None:
    real, _ = syn_cache_full_of_flood()
    real.rcv_nxt = wrap(real.rcv_nxt + 1)  # a guess one off
    real.send()
    check(real.output_one(), flags=RST)
    assert real.events() == [] and real.stack.drops["no_flow"] == 1
    late, _ = syn_cache_full_of_flood()
    late.now += 129.0  # two clock periods of 64 s
    late.send()
    check(late.output_one(), flags=RST)
    assert late.events() == [] and late.stack.cookie_flows == 0


def test_listen_established_flows_do_not_count_as_half_open() -> None:
    stack = make_stack(max_half_open=1)
    first = syn_received(Client(stack, port=1000))
    first.send()
    second = Client(stack, port=1001)
    second.send_syn()
    assert len(second.events()) == 1
    assert stack.drops["half_open_limit"] == 0


def test_listen_max_flows_answers_extra_syn_with_rst() -> None:
    stack = make_stack(max_flows=2)
    for port in (1000, 1001):
        syn_sent(Client(stack, port=port))
    extra = Client(stack, port=1002)
    extra.send_syn()
    check(extra.output_one(), flags=RST | ACK, ack=wrap(extra.iss + 1))
    assert extra.events() == []
    assert stack.flow_count == 2
    assert stack.drops["flow_limit"] == 1


# ---------------------------------------------------------------- SYN-RECEIVED


def test_syn_received_ack_establishes() -> None:
    c = syn_received()
    c.send()
    assert c.state is TcpState.ESTABLISHED
    assert c.output() == []
    assert c.events() == []
    assert c.stack.half_open_count == 0


def test_syn_received_retransmitted_syn_resends_syn_ack() -> None:
    c = syn_received()
    c.send_syn()
    check(c.output_one(), flags=SYN | ACK, seq=c.server_iss, ack=wrap(c.iss + 1))
    assert c.events() == []
    assert c.state is TcpState.SYN_RECEIVED


def test_syn_received_bad_ack_sends_rst() -> None:
    c = syn_received()
    bad_ack = wrap(c.rcv_nxt + 1000)
    c.send(ack=bad_ack)
    check(c.output_one(), flags=RST, seq=bad_ack)
    assert c.state is TcpState.SYN_RECEIVED


def test_syn_received_bad_ack_then_good_ack_establishes() -> None:
    c = syn_received()
    c.send(ack=wrap(c.rcv_nxt - 1))
    c.output()
    c.send()
    assert c.state is TcpState.ESTABLISHED


def test_syn_received_lost_syn_ack_is_retransmitted_on_timer() -> None:
    c = syn_received()
    sent_at = c.now
    check(c.next_timer_output()[0], flags=SYN | ACK, seq=c.server_iss, ack=wrap(c.iss + 1))
    assert c.now - sent_at == pytest.approx(1.0)  # RFC 6298 2.1: initial RTO


def test_syn_received_syn_ack_retransmission_backs_off() -> None:
    c = syn_received()
    times = [c.now]
    for _ in range(4):
        (syn_ack,) = c.next_timer_output()
        check(syn_ack, flags=SYN | ACK)
        times.append(c.now)
    intervals = [b - a for a, b in itertools.pairwise(times)]
    assert intervals == pytest.approx([1.0, 2.0, 4.0, 8.0])


def test_syn_received_syn_ack_retransmission_limit_resets_flow() -> None:
    c = syn_received()
    syn_acks = 0
    for _ in range(20):
        segments = c.next_timer_output()
        if any(s.flags & RST for s in segments):
            break
        syn_acks += sum(1 for s in segments if s.flags & SYN)
    else:
        pytest.fail("no RST after the SYN-ACK retransmissions")
    assert syn_acks == 5  # as Linux's tcp_synack_retries
    assert c.events() == [FlowReset(c.flow_id, "retransmission timeout")]
    assert c.stack.flow_count == 0


def test_syn_received_rst_resets_flow() -> None:
    c = syn_received()
    c.send(flags=RST)
    assert c.events() == [FlowReset(c.flow_id, "reset by client")]
    assert c.stack.flow_count == 0


def test_syn_received_ack_with_data_establishes_and_delivers() -> None:
    c = syn_received()
    c.send_data(b"hello")
    assert c.state is TcpState.ESTABLISHED
    check(c.output_one(), flags=ACK, ack=c.snd_nxt)
    assert c.stack.receive(c.flow_id) == b"hello"


def test_syn_received_data_queued_before_ack_is_sent_after_it() -> None:
    c = syn_received()
    c.stack.send(c.flow_id, b"banner")
    assert c.output() == []
    c.send()
    check(c.output_one(), seq=c.rcv_nxt, payload=b"banner")


def test_syn_received_shutdown_sends_fin_after_ack() -> None:
    c = syn_received()
    c.stack.shutdown(c.flow_id)
    assert c.output() == []
    c.send()
    check(c.output_one(), seq=c.rcv_nxt, flags=ACK | FIN)
    assert c.state is TcpState.FIN_WAIT_1

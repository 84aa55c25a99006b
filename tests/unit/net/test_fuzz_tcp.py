"""Property-based fuzzing of the TCP state machine and the stack's caps (see tcp_fuzz_model.py).

test_stack_input.py already checks that single random segments never raise; these tests run
whole scenarios (many flows, the layer above, the clock) against invariants, and the caps
under a SYN flood. The same scenarios run for longer under atheris: tests/fuzz/README.md.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.tcp_fuzz_model import (
    ACCEPT,
    ACK_OP,
    APP_RECEIVE,
    APP_SEND,
    APP_SHUTDOWN,
    CONNECT,
    DATA,
    FIN_OP,
    N_OPS,
    SYN_OP,
    WAIT,
    WINDOW,
    Op,
    Scenario,
    ops_from_bytes,
)
from tun2socks.net.ip import IpPacket
from tun2socks.net.stack import Stack, StackConfig
from tun2socks.net.tcp import ACK, RST, SYN, TcpSegment

u32 = st.integers(0, 0xFFFF_FFFF)
u40 = st.integers(0, 0xFF_FFFF_FFFF)
few_clients = st.sampled_from([0, 0, 0, 1, 2])  # most moves on one flow: deep scenarios

any_op = st.builds(
    Op,
    code=st.integers(0, N_OPS - 1),
    client=st.integers(0, 7),
    a=u32,
    b=u40,
    data=st.binary(max_size=300),
)
# Mostly the moves of a working connection, so that scenarios get deep into each state.
useful_op = st.one_of(
    st.builds(Op, code=st.just(CONNECT), client=few_clients, a=u32, b=u40),
    st.builds(Op, code=st.just(ACCEPT), a=st.integers(0, 7)),
    st.builds(
        Op, code=st.just(DATA), client=few_clients, data=st.binary(min_size=1, max_size=1400)
    ),
    st.builds(Op, code=st.just(ACK_OP), client=few_clients),
    st.builds(
        Op, code=st.just(APP_SEND), client=few_clients, data=st.binary(min_size=1, max_size=200)
    ),
    st.builds(Op, code=st.just(APP_RECEIVE), client=few_clients),
    st.builds(Op, code=st.just(WAIT), a=st.integers(0, 5000)),
    st.builds(Op, code=st.sampled_from([FIN_OP, APP_SHUTDOWN, WINDOW]), client=few_clients, b=u40),
)
scenarios = st.lists(st.one_of(any_op, useful_op, useful_op, useful_op), min_size=15, max_size=80)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=scenarios, seed=st.integers(0, 2**16))
def test_random_scenarios_keep_every_invariant(ops: list[Op], seed: int) -> None:
    Scenario(seed).run(ops)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=2000))
def test_scenarios_decoded_from_raw_bytes_keep_every_invariant(data: bytes) -> None:
    # The atheris harness's decoding, so that its inputs are exercised in the suite too.
    Scenario().run(ops_from_bytes(data))


def test_a_working_connection_scenario_moves_data_both_ways() -> None:
    # The model is not vacuous: this scenario transfers data in both directions.
    ops = [
        Op(SYN_OP, 0, a=1000, b=65535),
        Op(ACCEPT),
        Op(ACK_OP, 0),
        Op(DATA, 0, data=b"hello"),
        Op(APP_RECEIVE, 0),
        Op(APP_SEND, 0, data=b"world"),
        Op(ACK_OP, 0),
    ]
    scenario = Scenario()
    for op in ops:
        scenario.step(op)
    [conn] = scenario.stack.connections()
    assert (conn.bytes_received, conn.bytes_sent) == (5, 5)
    scenario.finish()


# ---------------------------------------------------------------- SYN flood against the caps


def _syn(port: int, src: bytes) -> bytes:
    return TcpSegment(port, 80, 1000, 0, SYN, 65535).build(4, src, bytes((192, 0, 2, 80)))


@settings(max_examples=50, deadline=None)
@given(
    sources=st.lists(st.tuples(u32, st.integers(1, 0xFFFF)), min_size=1, max_size=400),
    max_half_open=st.integers(1, 50),
    accept_every=st.integers(0, 5),
)
def test_syn_flood_holds_the_half_open_cap_and_resets_the_rest(
    sources: list[tuple[int, int]], max_half_open: int, accept_every: int
) -> None:
    stack = Stack(StackConfig(max_half_open=max_half_open, max_flows=200), random.Random(1))
    requested = 0
    for i, (address, port) in enumerate(sources):
        src = address.to_bytes(4, "big")
        before = stack.flow_count
        stack.receive_packet(_syn(port, src), float(i))
        while (event := stack.next_event()) is not None:
            requested += 1
            if accept_every and requested % accept_every == 0:
                stack.accept(event.flow_id, float(i))  # type: ignore[union-attr]
        answers = [TcpSegment.parse(IpPacket.parse(p)) for p in stack.packets_to_send(float(i))]
        assert stack.half_open_count <= max_half_open
        assert stack.flow_count <= 200
        if stack.flow_count == before and not any(a.flags & SYN for a in answers):
            # Not admitted (a cap, or a retransmitted SYN of a flow we hold): RST or nothing.
            assert all(a.flags & RST for a in answers)
    # Every half-open flow times out: SYN-RECEIVED after its SYN-ACK retries, LISTEN is the
    # layer above's business (its dial times out), so reject those here.
    for conn in stack.connections():
        stack.reject(conn.flow_id)
    for _ in range(10_000):
        deadline = stack.get_timer()
        if deadline is None:
            break
        stack.handle_timer(deadline)
        stack.packets_to_send(deadline)
    assert stack.flow_count == 0


def test_syn_beyond_the_half_open_cap_gets_a_syn_ack_from_the_syn_cache() -> None:
    stack = Stack(StackConfig(max_half_open=2), random.Random(1))
    for port in (1001, 1002):
        stack.receive_packet(_syn(port, bytes((10, 0, 0, 1))), 0.0)
    assert stack.packets_to_send(0.0) == []  # held, waiting for the upstream
    stack.receive_packet(_syn(1003, bytes((10, 0, 0, 1))), 0.0)
    [reply] = [TcpSegment.parse(IpPacket.parse(p)) for p in stack.packets_to_send(0.0)]
    assert (reply.dst_port, reply.flags, reply.ack) == (1003, SYN | ACK, 1001)
    assert stack.drops["half_open_limit"] == 1
    assert stack.half_open_count == 2  # the cap holds: cached SYNs are not half-open flows

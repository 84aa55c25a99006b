"""Retransmission timing (RFC 6298) and persist backoff, on their own."""

from __future__ import annotations

import pytest

from tun2socks.net.tcp_rtt import RttEstimator


def test_rtt_first_sample_sets_srtt_and_rto() -> None:
    # RFC 6298 2.2: SRTT = R, RTTVAR = R/2, RTO = SRTT + max(G, 4 * RTTVAR).
    rtt = RttEstimator(1.0, 0.2, 60.0, 10.0)
    rtt.sample(0.5)
    assert rtt.rto == pytest.approx(0.5 + 4 * 0.25)


def test_rtt_rto_is_clamped_to_the_configured_maximum() -> None:
    # RFC 6298 2.5: a maximum may be placed on RTO; it comes from TcpConfig.rto_max.
    rtt = RttEstimator(1.0, 0.2, 5.0, 10.0)
    rtt.sample(100.0)
    assert rtt.rto == 5.0
    rtt.back_off()
    assert rtt.rto == 5.0


def test_rtt_karn_no_sample_from_a_cancelled_probe() -> None:
    # Karn's algorithm: a retransmission makes the running measurement ambiguous.
    rtt = RttEstimator(1.0, 0.2, 60.0, 10.0)
    rtt.start(100, now=0.0)
    rtt.cancel()
    rtt.on_ack(100, now=3.0)
    assert rtt.rto == 1.0


def test_rtt_persist_intervals_double_up_to_the_cap() -> None:
    rtt = RttEstimator(1.0, 0.2, 60.0, 10.0)
    assert rtt.first_persist_interval() == 1.0
    assert [rtt.next_persist_interval() for _ in range(5)] == [2.0, 4.0, 8.0, 10.0, 10.0]

"""The vocabulary of one TCP connection: its states, its parameters, sequence arithmetic."""

from __future__ import annotations

import enum
from dataclasses import dataclass

SEQ_MASK = 0xFFFFFFFF
DEFAULT_MSS_V4 = 536  # RFC 9293 3.7.1: assumed when the SYN has no MSS option
DEFAULT_MSS_V6 = 1220  # RFC 8200 8.3
MIN_PEER_MSS = 48  # as Linux's tcp_min_snd_mss: an MSS of 1 would mean a packet per byte
# Floors for a path MTU learnt from ICMP (RFC 5927 4.2: do not believe tiny ones): IPv4's
# 576-byte datagrams (RFC 791) and IPv6's minimum MTU of 1280 (RFC 8200 5).
MIN_PMTU_MSS = {4: 576 - 40, 6: 1280 - 60}
MAX_WINDOW_FIELD = 0xFFFF


def seq_diff(a: int, b: int) -> int:
    """`a - b` in 32-bit sequence space, as a signed number (RFC 9293 3.4)."""
    d = (a - b) & SEQ_MASK
    return d - 0x1_0000_0000 if d & 0x8000_0000 else d


def window_shift(buffer_size: int) -> int:
    """The smallest RFC 7323 shift that lets `buffer_size` be advertised."""
    shift = 0
    while (buffer_size >> shift) > MAX_WINDOW_FIELD and shift < 14:
        shift += 1
    return shift


class TcpState(enum.Enum):
    LISTEN = "LISTEN"
    SYN_RECEIVED = "SYN-RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN-WAIT-1"
    FIN_WAIT_2 = "FIN-WAIT-2"
    CLOSING = "CLOSING"
    TIME_WAIT = "TIME-WAIT"
    CLOSE_WAIT = "CLOSE-WAIT"
    LAST_ACK = "LAST-ACK"
    CLOSED = "CLOSED"


# States in which the client may still send us data.
RECEIVING = frozenset({TcpState.ESTABLISHED, TcpState.FIN_WAIT_1, TcpState.FIN_WAIT_2})
# States in which we may still send data or our FIN.
SENDING = frozenset(
    {
        TcpState.ESTABLISHED,
        TcpState.CLOSE_WAIT,
        TcpState.FIN_WAIT_1,
        TcpState.LAST_ACK,
        TcpState.CLOSING,
    }
)


@dataclass(frozen=True, slots=True)
class TcpConfig:
    """Per-connection parameters, fixed by the stack."""

    mss: int  # advertised in our SYN-ACK: the TUN MTU minus the IP and TCP headers
    recv_buffer: int = 256 * 1024
    send_buffer: int = 256 * 1024
    # With TSO: send super-packets of up to this many bytes that the kernel cuts at the
    # flow's MSS (see `GsoPacket`); None: one segment per packet.
    super_segment: int | None = None
    offload: bool = False  # checksums left to the kernel (vnet header)
    # Keep-alive (RFC 9293 3.8.4, RFC 5382 REQ-5): after this long without a segment from
    # the client, probe it every `keepalive_interval`; reset after `keepalive_probes`
    # unanswered probes.  Half-open flows are reset after `idle_timeout` instead.
    idle_timeout: float = 600.0
    keepalive_interval: float = 75.0
    keepalive_probes: int = 9
    time_wait: float = 2.0
    rto_initial: float = 1.0  # RFC 6298 2.1
    # RFC 6298 2.4 says 1 s; like Linux we use 200 ms, the link being the local kernel.
    rto_min: float = 0.2
    rto_max: float = 60.0
    max_retransmissions: int = 8
    max_syn_ack_retransmissions: int = 5  # as Linux's tcp_synack_retries
    persist_max: float = 10.0
    # RFC 5961 7: at most this many challenge ACKs per flow per `challenge_ack_interval`.
    challenge_ack_limit: int = 10
    challenge_ack_interval: float = 5.0

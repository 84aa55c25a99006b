"""Events the stack reports to the layer above, in the order they happened.

Every TCP flow starts with `FlowRequested` and, unless the layer above ended it itself
(`reject` or `abort`), finishes with exactly one `FlowEnded` or `FlowReset`.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

IPAddress = IPv4Address | IPv6Address


@dataclass(frozen=True, slots=True)
class FlowRequested:
    """A client sent a SYN: connect upstream, then `accept` (SYN-ACK) or `reject` (RST)."""

    flow_id: int
    src: IPAddress
    src_port: int
    dst: IPAddress
    dst_port: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    """The flow's receive buffer went from empty to non-empty: call `receive`."""

    flow_id: int


@dataclass(frozen=True, slots=True)
class EofReceived:
    """The client sent FIN: once the buffered data is taken, it will send no more."""

    flow_id: int


@dataclass(frozen=True, slots=True)
class SendSpaceAvailable:
    """The send buffer, which `send` reported full, has drained below half."""

    flow_id: int


@dataclass(frozen=True, slots=True)
class FlowEnded:
    """Both directions closed with FIN and acknowledged."""

    flow_id: int


@dataclass(frozen=True, slots=True)
class FlowReset:
    """The flow ended abnormally: client RST, keep-alives unanswered (or a half-open flow idle),
    or retransmissions exhausted."""

    flow_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class DatagramReceived:
    """A UDP datagram from a client; answer with `Stack.send_datagram` (src and dst swapped)."""

    src: IPAddress
    src_port: int
    dst: IPAddress
    dst_port: int
    payload: bytes


Event = (
    FlowRequested
    | DataReceived
    | EofReceived
    | SendSpaceAvailable
    | FlowEnded
    | FlowReset
    | DatagramReceived
)

"""Whether a SOCKS5 proxy takes greeting, authentication and request in one write.

Theory of operation: RFC 1928 lets a client that offers a single method know the server's
choice in advance, so it may send everything at once (one round trip instead of up to three).
Servers that read one message per ``recv`` lose what follows the greeting (microsocks 1.0.3:
the connection then waits forever), so ``proxy.pipeline: auto`` finds out once, on first use:
it sends greeting, authentication and a ``UDP ASSOCIATE 0.0.0.0:0`` (RFC 1928 section 4: the
address a client uses when it does not know its own yet; the association ends with the
connection, which the probe closes at once) in one write. Any well-formed reply to that
request, success or refusal, proves the server read it; silence after the method selection,
or a close, means it did not. Until the answer is known, and when the proxy cannot be reached
or rejects the login (the probe cannot tell then, and tries again later), the sequential
form is used: it works everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal

from tun2socks.outbound import socks5
from tun2socks.outbound.socks5_wire import Command

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0
RETRY_AFTER_S = 5.0

PipelineSetting = bool | Literal["auto"]
Probe = Callable[[], Awaitable[bool | None]]


class Pipelining:
    """One proxy's pipelining: forced on or off, or ``auto`` (probed on first use)."""

    def __init__(
        self,
        setting: PipelineSetting,
        probe: Probe | None = None,
        label: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if setting == "auto" and probe is None:
            raise ValueError("pipeline auto needs a probe")
        self.setting = setting
        self.supported: bool | None = setting if isinstance(setting, bool) else None
        self._probe = probe
        self.label = label  # host:port, for the log line
        self._clock = clock
        self._retry_at = float("-inf")
        self._task: asyncio.Task[None] | None = None

    def use_now(self) -> bool:
        """Pipeline this handshake? Starts the probe the first time it is not known yet."""
        if self.supported is None:
            self._start_probe()
        return bool(self.supported)

    def state(self) -> int:
        """For /stats: 1 pipelined, 0 sequential, -1 not known yet (sequential meanwhile)."""
        return -1 if self.supported is None else int(self.supported)

    def _start_probe(self) -> None:
        if self._task is not None or self._probe is None or self._clock() < self._retry_at:
            return
        self._task = asyncio.get_running_loop().create_task(self._run(self._probe))

    async def _run(self, probe: Probe) -> None:
        try:
            found = await probe()
        finally:
            self._task = None
        if found is None:
            self._retry_at = self._clock() + RETRY_AFTER_S
            return
        self.supported = found
        how = "in one write" if found else "one message at a time (it loses pipelined ones)"
        log.info("proxy %s: SOCKS5 handshakes go %s", self.label, how)

    async def close(self) -> None:
        task = self._task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def probe_pipelining(
    proxy: socks5.ProxyEndpoint,
    *,
    timeout: float = PROBE_TIMEOUT_S,
    prepare_socket: socks5.SocketHook | None = None,
) -> bool | None:
    """True: the proxy answered a request written together with the greeting (and login).
    False: it did not (silence or a close after the greeting). None: it cannot tell (the
    proxy is unreachable or rejects the login)."""
    try:
        sock, _bound = await socks5.request(
            proxy,
            Command.UDP_ASSOCIATE,
            "0.0.0.0",
            0,
            timeout=timeout,
            pipeline=True,
            prepare_socket=prepare_socket,
        )
    except socks5.Socks5ReplyError:
        return True  # refused, but it read the request
    except (socks5.Socks5ProxyUnreachable, socks5.Socks5AuthFailed):
        return None
    except (socks5.Socks5Timeout, socks5.Socks5ProtocolError):
        return False
    sock.close()
    return True

"""A TCP server that accepts connections and holds them open, sending nothing: the far end of the
memory row's idle connections (run as a script inside the bed's server namespace).

The bed's HTTP server runs one thread per connection, which 10,000 idle connections would turn
into 10,000 threads; an asyncio listener holds them at a few KiB each. Every connection is closed
when its peer closes it; the process runs until SIGTERM (the bench stops it, and deleting the
namespace kills it in any case).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import signal
import sys


class _Hold(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        pass  # idle connections send nothing; anything else is discarded

    def eof_received(self) -> bool:
        return False  # close our side too


async def _serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = await loop.create_server(_Hold, host, port, backlog=4096, reuse_address=True)
    print(f"holding on {host}:{port}", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="accept TCP connections and hold them")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-fds", type=int, default=65536)
    args = parser.parse_args(argv)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.max_fds, args.max_fds))
    asyncio.run(_serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())

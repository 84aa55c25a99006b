"""Small threaded HTTP/1.1 server for the integration bed (run as a script inside a namespace).

Routes:
  GET  /small          a short text (SMALL_BODY)
  GET  /bytes/N        N deterministic pseudo-random bytes, streamed in chunks
  GET  /peer           the client's address as this server sees it (one line)
  POST /upload         reads the body as a stream, answers {"length": N, "sha256": HEX}
                       (PUT is accepted too; Content-Length or chunked bodies)

The payload of /bytes/N is a fixed pseudo-random block repeated. Its period is a prime number
of bytes, so a segment delivered at a wrong offset (always a multiple of some power of two in
practice) never matches the bytes expected there. Tests compute the expected digest with
`payload_sha256(n)` instead of storing files.

Every response closes the connection, so clients may read to EOF; a client that half-closed
its sending side after the request still receives the whole reply.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import json
import random
import socket
import socketserver
import sys
from collections.abc import Iterator

SMALL_BODY = b"hello from the tun2socks test server\n"
PATTERN_PERIOD = 1_048_573  # a prime just below 1 MiB
PATTERN_SEED = 0x7532_5350
CHUNK_SIZE = 256 * 1024
MAX_BYTES = 1 << 40  # refuse absurd sizes instead of streaming forever


@functools.cache
def _pattern_twice() -> bytes:
    """The pattern block written twice, so any window of <= PATTERN_PERIOD bytes is contiguous."""
    block = random.Random(PATTERN_SEED).randbytes(PATTERN_PERIOD)
    return block + block


def iter_payload(size: int, chunk_size: int = CHUNK_SIZE) -> Iterator[memoryview]:
    """The body of GET /bytes/<size>, as chunks of at most chunk_size bytes."""
    view = memoryview(_pattern_twice())
    offset = 0
    while offset < size:
        length = min(chunk_size, size - offset, PATTERN_PERIOD)
        start = offset % PATTERN_PERIOD
        yield view[start : start + length]
        offset += length


def payload_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for chunk in iter_payload(size, PATTERN_PERIOD):
        digest.update(chunk)
    return digest.hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # needed for "Expect: 100-continue" handling
    server_version = "t2s-test-httpd"

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request would dominate the bed's logs

    def log_error(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def _reply(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/small":
            self._reply(200, SMALL_BODY)
            return
        if self.path == "/peer":  # where the connection comes from (IPv4-mapped shown as v4)
            peer = str(self.client_address[0]).removeprefix("::ffff:")
            self._reply(200, peer.encode() + b"\n")
            return
        if self.path.startswith("/bytes/"):
            try:
                size = int(self.path.removeprefix("/bytes/"))
            except ValueError:
                size = -1
            if not 0 <= size <= MAX_BYTES:
                self._reply(400, b"bad size\n")
                return
            self.close_connection = True
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.send_header("Connection", "close")
            self.end_headers()
            for chunk in iter_payload(size):
                self.wfile.write(chunk)
            return
        self._reply(404, b"not found\n")

    def do_POST(self) -> None:
        if self.path != "/upload":
            self._reply(404, b"not found\n")
            return
        digest = hashlib.sha256()
        length = 0
        for chunk in self._iter_body():
            digest.update(chunk)
            length += len(chunk)
        answer = {"length": length, "sha256": digest.hexdigest()}
        self._reply(200, json.dumps(answer).encode() + b"\n", "application/json")

    do_PUT = do_POST

    def _iter_body(self) -> Iterator[bytes]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            yield from self._iter_chunked()
            return
        remaining = int(self.headers.get("Content-Length", "0"))
        while remaining > 0:
            data = self.rfile.read(min(CHUNK_SIZE, remaining))
            if not data:
                raise ConnectionError(f"body ended {remaining} bytes early")
            remaining -= len(data)
            yield data

    def _iter_chunked(self) -> Iterator[bytes]:
        while True:
            size_line = self.rfile.readline(1024)
            if not size_line:
                raise ConnectionError("chunked body ended early")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return
            remaining = size
            while remaining > 0:
                data = self.rfile.read(min(CHUNK_SIZE, remaining))
                if not data:
                    raise ConnectionError("chunked body ended early")
                remaining -= len(data)
                yield data
            self.rfile.readline(16)  # CRLF after the chunk


class DualStackServer(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    request_queue_size = 1024  # the default 5 would make concurrency tests measure the server
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # HTTPServer.server_bind would resolve the bind address (getfqdn): no DNS in the bed.
        socketserver.TCPServer.server_bind(self)
        self.server_name = "t2s-test-httpd"
        self.server_port = self.server_address[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="HTTP server for the tun2socks integration bed")
    parser.add_argument("--bind", default="::")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    with DualStackServer((args.bind, args.port), Handler) as server:
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())

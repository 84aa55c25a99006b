"""``tun2socks check`` for an HTTP CONNECT proxy: the steps after TCP connect.

One CONNECT request (RFC 9110 section 9.3.6) is sent and its answer read with a blocking
socket; the answer is then judged in three steps, so that each cause has its own line:
the answer is HTTP at all, the credentials were accepted (not 407), the tunnel was opened (2xx).
"""

from __future__ import annotations

import socket

from tun2socks.outbound.http_connect import AUTH_STATUSES, refusal
from tun2socks.outbound.http_connect_wire import (
    MAX_HEAD,
    HttpWireError,
    ResponseHead,
    build_connect,
    parse_response_head,
)


class StepFailed(Exception):
    """A step of the HTTP probe failed; str() is the cause (never the password)."""


class HttpConnectProbe:
    """Sends one CONNECT on a connected socket, then answers one question per step."""

    def __init__(self, username: str | None, password: str | None, timeout: float) -> None:
        self.username = username
        self.password = password
        self.timeout = timeout
        self.head: ResponseHead | None = None

    def answer(self, sock: socket.socket, host: str, port: int) -> str:
        """Step "HTTP answer": send CONNECT, read the response head."""
        credentials = None
        if self.username is not None:
            credentials = (self.username, self.password or "")
        try:
            sock.sendall(build_connect(host, port, credentials))
        except HttpWireError as exc:
            raise StepFailed(str(exc)) from None
        except OSError as exc:
            raise StepFailed(f"send failed: {exc.strerror or exc}") from None
        data = b""
        while (head := parse_response_head(data)) is None:
            try:
                chunk = sock.recv(MAX_HEAD)
            except TimeoutError:
                raise StepFailed(f"no answer within {self.timeout:g} s") from None
            except OSError as exc:
                cause = (exc.strerror or str(exc)).lower()
                raise StepFailed(f"{cause} before the answer") from None
            if not chunk:
                raise StepFailed("the proxy closed the connection before answering")
            data += chunk
        self.head = head
        return f"HTTP {head.status_line}"

    def authenticate(self) -> str:
        """Step "authentication": anything but 407 (or 401) means the credentials will do."""
        assert self.head is not None
        if self.head.status in AUTH_STATUSES:
            raise StepFailed(refusal(self.head, self.username)[1])
        if self.username is None:
            return "none required"
        return f"user {self.username!r} accepted"

    def tunnel(self) -> str:
        """Step "CONNECT target": a 2xx opened the tunnel."""
        assert self.head is not None
        if not self.head.is_success:
            raise StepFailed(refusal(self.head, self.username)[1])
        return f"tunnel open ({self.head.status_line})"

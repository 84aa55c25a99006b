"""The asyncio SOCKS5 client against a real Dante server on loopback, and against small
misbehaving servers written here for what Dante never does (bad bytes, silence, early data)."""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest

from tests.integration.helpers_danted import (
    DantedProcess,
    create_system_user,
    danted_skip_reason,
    free_tcp_port,
    loopback_config,
    remove_system_user,
    start_danted,
)
from tests.support.bounded_run import run_bounded
from tun2socks.outbound.socks5 import (
    ProxyEndpoint,
    Socks5AuthFailed,
    Socks5ProtocolError,
    Socks5ProxyUnreachable,
    Socks5ReplyError,
    Socks5Timeout,
    connect,
)
from tun2socks.outbound.socks5_wire import (
    AuthMethod,
    ReplyCode,
    build_auth,
    build_connect,
    build_greeting,
    build_reply,
)

pytestmark = pytest.mark.integration

_skip_reason = danted_skip_reason()
if _skip_reason is not None:
    pytest.skip(_skip_reason, allow_module_level=True)

LOCALHOST = "127.0.0.1"
TEST_USER = "t2s-socks5-test"


# --- servers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def socks5_noauth_danted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DantedProcess]:
    workdir = tmp_path_factory.mktemp("danted-noauth")
    port = free_tcp_port()
    config = loopback_config(port, logoutput=workdir / "danted.log")
    server = start_danted(config, workdir, host=LOCALHOST, port=port)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def socks5_auth_danted(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[DantedProcess, str, str]]:
    workdir = tmp_path_factory.mktemp("danted-auth")
    password = secrets.token_urlsafe(16)
    remove_system_user(TEST_USER)  # left over from a run that was killed
    create_system_user(TEST_USER, password)
    try:
        port = free_tcp_port()
        config = loopback_config(port, socksmethod="username", logoutput=workdir / "danted.log")
        server = start_danted(config, workdir, host=LOCALHOST, port=port)
        try:
            yield server, TEST_USER, password
        finally:
            server.stop()
    finally:
        remove_system_user(TEST_USER)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def _serve(handler: Handler) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, LOCALHOST, 0)
    port: int = server.sockets[0].getsockname()[1]
    return server, port


async def _echo_through(sock: socket.socket, payload: bytes) -> bytes:
    """Wrap the proxied socket the way the relay will, and echo ``payload`` through it."""
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(payload)
        await writer.drain()
        return await reader.readexactly(len(payload))
    finally:
        writer.close()


# --- Dante, no authentication ------------------------------------------------------------------


@pytest.mark.parametrize("pipeline", [True, False], ids=["pipelined", "step-by-step"])
def test_connect_relays_bytes_both_ways(
    socks5_noauth_danted: DantedProcess, pipeline: bool
) -> None:
    proxy = ProxyEndpoint(LOCALHOST, socks5_noauth_danted.port)

    async def body() -> None:
        echo, echo_port = await _serve(_echo)
        async with echo:
            sock, bound = await connect(proxy, LOCALHOST, echo_port, timeout=5, pipeline=pipeline)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            assert sock.getblocking() is False
            assert bound[0] == LOCALHOST and 0 < bound[1] < 65536
            payload = secrets.token_bytes(200_000)
            assert await _echo_through(sock, payload) == payload

    run_bounded(body())


def test_connect_to_a_domain_name_lets_the_proxy_resolve_it(
    socks5_noauth_danted: DantedProcess,
) -> None:
    proxy = ProxyEndpoint(LOCALHOST, socks5_noauth_danted.port)

    async def body() -> None:
        echo, echo_port = await _serve(_echo)
        async with echo:
            sock, _ = await connect(proxy, "localhost", echo_port, timeout=5)
            assert await _echo_through(sock, b"by name") == b"by name"

    run_bounded(body())


def test_proxy_given_by_name_is_resolved(socks5_noauth_danted: DantedProcess) -> None:
    # "localhost" may resolve to ::1 first, where nobody listens: the next address is tried.
    proxy = ProxyEndpoint("localhost", socks5_noauth_danted.port)

    async def body() -> None:
        echo, echo_port = await _serve(_echo)
        async with echo:
            sock, _ = await connect(proxy, LOCALHOST, echo_port, timeout=5)
            assert await _echo_through(sock, b"x") == b"x"

    run_bounded(body())


@pytest.mark.parametrize("pipeline", [True, False], ids=["pipelined", "step-by-step"])
def test_connect_to_a_closed_port_raises_the_reply_code(
    socks5_noauth_danted: DantedProcess, pipeline: bool
) -> None:
    proxy = ProxyEndpoint(LOCALHOST, socks5_noauth_danted.port)
    closed_port = free_tcp_port()
    with pytest.raises(Socks5ReplyError) as info:
        run_bounded(connect(proxy, LOCALHOST, closed_port, timeout=5, pipeline=pipeline))
    # Dante 1.4 relays the ECONNREFUSED it got as "connection refused".
    assert info.value.reply_code == ReplyCode.CONNECTION_REFUSED
    assert str(info.value) == (
        f"SOCKS5 proxy 127.0.0.1:{proxy.port}: CONNECT 127.0.0.1:{closed_port} failed: "
        "connection refused (reply 5)"
    )


def test_destination_outside_the_ruleset_is_not_allowed(
    socks5_noauth_danted: DantedProcess,
) -> None:
    # The config only passes 127.0.0.0/8; ::1 is loopback too, so nothing leaves the machine.
    proxy = ProxyEndpoint(LOCALHOST, socks5_noauth_danted.port)
    with pytest.raises(Socks5ReplyError) as info:
        run_bounded(connect(proxy, "::1", 9, timeout=5))
    assert info.value.reply_code == ReplyCode.CONNECTION_NOT_ALLOWED
    assert "[::1]:9" in str(info.value)


def test_client_without_credentials_is_refused_by_an_auth_proxy(
    socks5_auth_danted: tuple[DantedProcess, str, str],
) -> None:
    server, _, _ = socks5_auth_danted
    with pytest.raises(Socks5AuthFailed) as info:
        run_bounded(connect(ProxyEndpoint(LOCALHOST, server.port), LOCALHOST, 9, timeout=5))
    assert info.value.reply_code is None
    assert "none of the offered methods" in str(info.value)


# --- Dante, username/password ------------------------------------------------------------------


@pytest.mark.parametrize("pipeline", [True, False], ids=["pipelined", "step-by-step"])
def test_username_password_login_relays_bytes(
    socks5_auth_danted: tuple[DantedProcess, str, str], pipeline: bool
) -> None:
    server, user, password = socks5_auth_danted
    proxy = ProxyEndpoint(LOCALHOST, server.port, user, password)

    async def body() -> None:
        echo, echo_port = await _serve(_echo)
        async with echo:
            sock, _ = await connect(proxy, LOCALHOST, echo_port, timeout=5, pipeline=pipeline)
            assert await _echo_through(sock, b"authenticated") == b"authenticated"

    run_bounded(body())


@pytest.mark.parametrize("pipeline", [True, False], ids=["pipelined", "step-by-step"])
def test_wrong_password_fails_fast_and_never_shows_it(
    socks5_auth_danted: tuple[DantedProcess, str, str], pipeline: bool
) -> None:
    server, user, password = socks5_auth_danted
    wrong = password + "-wrong"
    proxy = ProxyEndpoint(LOCALHOST, server.port, user, wrong)
    started = time.monotonic()
    with pytest.raises(Socks5AuthFailed) as info:
        run_bounded(connect(proxy, LOCALHOST, 9, timeout=10, pipeline=pipeline))
    assert time.monotonic() - started < 2.0  # the rejection, not the timeout
    assert info.value.reply_code is None
    for text in (str(info.value), repr(info.value), info.value.reason, repr(proxy)):
        assert wrong not in text
        assert password not in text


# --- no proxy, or a silent one -----------------------------------------------------------------


def test_nobody_listening_on_the_proxy_port_is_unreachable() -> None:
    proxy = ProxyEndpoint(LOCALHOST, free_tcp_port())
    started = time.monotonic()
    with pytest.raises(Socks5ProxyUnreachable) as info:
        run_bounded(connect(proxy, LOCALHOST, 80, timeout=5))
    assert time.monotonic() - started < 2.0
    assert info.value.reply_code is None
    assert str(info.value) == (
        f"SOCKS5 proxy 127.0.0.1:{proxy.port}: CONNECT 127.0.0.1:80 failed: "
        "cannot reach proxy: Connection refused"
    )


def _accept_and_wait_for_eof(received: asyncio.Queue[bytes]) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # never answers; returns when the client closes
        received.put_nowait(data)
        writer.close()

    return handler


def test_silent_proxy_times_out_and_the_socket_is_closed() -> None:
    async def body() -> None:
        received: asyncio.Queue[bytes] = asyncio.Queue()
        server, port = await _serve(_accept_and_wait_for_eof(received))
        async with server:
            started = time.monotonic()
            with pytest.raises(Socks5Timeout) as info:
                await connect(ProxyEndpoint(LOCALHOST, port), LOCALHOST, 80, timeout=0.3)
            assert 0.3 <= time.monotonic() - started < 2.0
            assert info.value.reply_code is None
            assert "timed out after 0.3 s waiting for the method selection" in str(info.value)
            # EOF reached the server: the client closed its socket.
            sent = await asyncio.wait_for(received.get(), 5)
            assert sent == build_greeting([AuthMethod.NO_AUTHENTICATION]) + build_connect(
                LOCALHOST, 80
            )

    run_bounded(body())


# --- scripted servers: what Dante never does ---------------------------------------------------


def _scripted(expect: bytes, answer: bytes) -> Handler:
    """A server that reads exactly ``expect`` (all of it before answering), then sends ``answer``
    in one write and waits for the client to close."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if await reader.readexactly(len(expect)) != expect:
                return  # no answer: the client times out and the test fails
            writer.write(answer)
            await writer.drain()
            await reader.read()
        except asyncio.IncompleteReadError:
            pass  # the client gave up first
        finally:
            writer.close()

    return handler


def test_pipelined_login_sends_everything_before_the_first_reply() -> None:
    # The server answers only once greeting, auth and CONNECT have all arrived: a client that
    # waited for each reply would time out here.
    request = (
        build_greeting([AuthMethod.USERNAME_PASSWORD])
        + build_auth("u", "p")
        + build_connect("example.com", 443)
    )
    answer = b"\x05\x02" + b"\x01\x00" + build_reply(0, "10.1.2.3", 4242)

    async def body() -> None:
        server, port = await _serve(_scripted(request, answer))
        async with server:
            proxy = ProxyEndpoint(LOCALHOST, port, "u", "p")
            sock, bound = await connect(proxy, "example.com", 443, timeout=5)
            sock.close()
            assert bound == ("10.1.2.3", 4242)
            with pytest.raises(Socks5Timeout):
                await connect(proxy, "example.com", 443, timeout=0.3, pipeline=False)

    run_bounded(body())


def test_bytes_after_the_reply_are_left_in_the_socket() -> None:
    request = build_greeting([AuthMethod.NO_AUTHENTICATION]) + build_connect("example.com", 25)
    answer = b"\x05\x00" + build_reply(0, "example.net", 25) + b"220 early banner\r\n"

    async def body() -> None:
        server, port = await _serve(_scripted(request, answer))
        async with server:
            sock, bound = await connect(
                ProxyEndpoint(LOCALHOST, port), "example.com", 25, timeout=5
            )
            assert bound == ("example.net", 25)
            reader, writer = await asyncio.open_connection(sock=sock)
            assert await reader.readexactly(18) == b"220 early banner\r\n"
            writer.close()

    run_bounded(body())


@pytest.mark.parametrize(
    ("answer", "detail"),
    [
        (b"\x04\x00", "method selection has version 4"),
        (b"\x05\x00\x05\x00\x00\x09", "unknown address type 9"),
        (b"\x05\x00\x05\x00\x00\x01\x7f", "proxy closed the connection while waiting for the"),
    ],
)
def test_malformed_answers_are_protocol_errors(answer: bytes, detail: str) -> None:
    request = build_greeting([AuthMethod.NO_AUTHENTICATION]) + build_connect(LOCALHOST, 80)

    async def body() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readexactly(len(request))
            writer.write(answer)
            await writer.drain()
            writer.close()  # a short answer ends in EOF

        server, port = await _serve(handler)
        async with server:
            with pytest.raises(Socks5ProtocolError, match=detail) as info:
                await connect(ProxyEndpoint(LOCALHOST, port), LOCALHOST, 80, timeout=5)
            assert info.value.reply_code is None

    run_bounded(body())


def test_method_not_offered_is_a_protocol_error() -> None:
    request = build_greeting([AuthMethod.NO_AUTHENTICATION]) + build_connect(LOCALHOST, 80)

    async def body() -> None:
        server, port = await _serve(_scripted(request, b"\x05\x02"))
        async with server:
            with pytest.raises(Socks5ProtocolError, match="not offered"):
                await connect(ProxyEndpoint(LOCALHOST, port), LOCALHOST, 80, timeout=5)

    run_bounded(body())


def test_failure_reply_cut_short_still_reports_its_code() -> None:
    request = build_greeting([AuthMethod.NO_AUTHENTICATION]) + build_connect(LOCALHOST, 80)

    async def body() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readexactly(len(request))
            writer.write(b"\x05\x00\x05\x04")  # VER REP, then close: no address
            await writer.drain()
            writer.close()

        server, port = await _serve(handler)
        async with server:
            with pytest.raises(Socks5ReplyError) as info:
                await connect(ProxyEndpoint(LOCALHOST, port), LOCALHOST, 80, timeout=5)
            assert info.value.reply_code == ReplyCode.HOST_UNREACHABLE

    run_bounded(body())

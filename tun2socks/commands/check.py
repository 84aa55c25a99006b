"""``tun2socks check -c FILE``: validate the configuration, then probe each proxy step by step.

For the default proxy and every named one: TCP reachability, the SOCKS5 greeting, the
authentication (RFC 1929, when credentials are configured) and a CONNECT to ``--target``; for an
``http://`` proxy: TCP reachability, the answer to CONNECT, authentication, the tunnel
(``check_http.py``). Each
step prints ``pass``, ``FAIL`` with the precise cause, or ``skip``. Then one line says what UDP
will do (``outbound/udp_probe.py``: a UDP ASSOCIATE, and with ``--udp-target`` a datagram's
round trip through it). The exit status is 0 when everything passed (a proxy without UDP is
reported, not failed, unless ``--udp-target`` asked for UDP), 1 when a step failed, 2 for a
configuration error. The probe is a blocking
client written on our own sans-IO codec (``socks5_wire``), one message at a time, so that each
answer is attributed to its step. Passwords are never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tun2socks import logs
from tun2socks.commands import check_http
from tun2socks.config import ConfigError, load_settings
from tun2socks.host import uplink
from tun2socks.outbound.direct import protector
from tun2socks.outbound.socks5 import ProxyEndpoint, SocketHook, format_host_port
from tun2socks.outbound.socks5_wire import (
    AUTH_REPLY_SIZE,
    METHOD_SELECTION_SIZE,
    AuthMethod,
    Command,
    Socks5WireError,
    build_auth,
    build_greeting,
    build_request,
    describe_reply,
    parse_auth_reply,
    parse_method_selection,
    parse_reply,
    reply_bytes_missing,
)
from tun2socks.outbound.udp_probe import UdpVerdict, describe, probe_udp

if TYPE_CHECKING:
    from tun2socks.config import ProxyConfig, UdpConfig

DEFAULT_TARGET = "example.com:80"


def add_parser(commands: Any) -> None:
    check = commands.add_parser(
        "check",
        help="validate the config and probe each proxy (TCP and UDP)",
        description="Validate the configuration, then probe each proxy: TCP connect, SOCKS5 "
        "greeting, authentication, CONNECT to the target; then UDP ASSOCIATE, and one line "
        "says what UDP will do (with --udp-target, after a datagram's round trip). "
        "Exit 0 if all pass, 1 if not.",
    )
    check.add_argument("-c", "--config", metavar="FILE", required=True, help="YAML settings file")
    check.add_argument(
        "--target",
        metavar="HOST:PORT",
        default=DEFAULT_TARGET,
        help=f"what each proxy is asked to CONNECT to (default {DEFAULT_TARGET})",
    )
    check.add_argument(
        "--udp-target",
        metavar="HOST:PORT",
        help="a UDP echo server: one datagram goes there through each proxy's UDP relay and "
        "must come back (without it, UDP ASSOCIATE alone is tried)",
    )
    check.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="set one key, as for run",
    )


class StepFailed(Exception):
    """A probe step failed; str() is the cause."""


@dataclass
class Probe:
    """One proxy's probe: a blocking socket moved from step to step."""

    config: ProxyConfig
    timeout: float
    protect: SocketHook | None
    sock: socket.socket | None = None

    def connect(self) -> str:
        host, port = self.config.host, self.config.port
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise StepFailed(f"cannot resolve {host}: {exc}") from None
        error = "no address"
        for family, kind, proto, _, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            sock.settimeout(self.timeout)
            started = time.monotonic()
            try:
                if self.protect is not None:
                    self.protect(sock)
                sock.connect(sockaddr)
            except TimeoutError:
                error = f"timed out after {self.timeout:g} s"
            except OSError as exc:
                error = (exc.strerror or str(exc)).lower()
            else:
                self.sock = sock
                where = format_host_port(str(sockaddr[0]), port)
                return f"{where} in {(time.monotonic() - started) * 1000:.1f} ms"
            sock.close()
        raise StepFailed(error)

    def greet(self) -> str:
        with_auth = self.config.username is not None
        method = AuthMethod.USERNAME_PASSWORD if with_auth else AuthMethod.NO_AUTHENTICATION
        self._send(build_greeting([method]))
        chosen = parse_method_selection(self._recv(METHOD_SELECTION_SIZE, "method selection"))
        if chosen == AuthMethod.NO_ACCEPTABLE_METHODS:
            if method == AuthMethod.NO_AUTHENTICATION:
                raise StepFailed("the proxy requires authentication: put user:password in the URL")
            raise StepFailed("the proxy does not accept username/password authentication")
        if chosen != method:
            raise StepFailed(f"the proxy chose method {chosen:#04x}, which was not offered")
        return f"method {'username/password' if with_auth else 'no authentication'} accepted"

    def authenticate(self) -> str:
        username, password = self.config.username, self.config.password
        assert username is not None
        secret = password.get_secret_value() if password is not None else ""
        self._send(build_auth(username, secret))
        status = parse_auth_reply(self._recv(AUTH_REPLY_SIZE, "authentication reply"))
        if status != 0:
            raise StepFailed(f"username/password rejected for user {username!r} (status {status})")
        return f"user {username!r} accepted"

    def request(self, host: str, port: int) -> str:
        self._send(build_request(Command.CONNECT, host, port))
        data = bytearray()
        while (missing := reply_bytes_missing(data)) > 0:
            data += self._recv(missing, "CONNECT reply", partial=True)
        reply = parse_reply(data)
        assert reply is not None
        if reply.reply_code != 0:
            code = reply.reply_code
            raise StepFailed(f"refused by the proxy: {describe_reply(code)} (reply {code})")
        return f"bound {format_host_port(reply.bound_host, reply.bound_port)}"

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()

    def _send(self, data: bytes) -> None:
        assert self.sock is not None
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise StepFailed(f"send failed: {exc.strerror or exc}") from None

    def _recv(self, size: int, what: str, *, partial: bool = False) -> bytes:
        assert self.sock is not None
        data = b""
        while len(data) < size:
            try:
                chunk = self.sock.recv(size - len(data))
            except TimeoutError:
                raise StepFailed(f"no {what} within {self.timeout:g} s") from None
            except OSError as exc:
                raise StepFailed(
                    f"{(exc.strerror or str(exc)).lower()} before the {what}"
                ) from None
            if not chunk:
                raise StepFailed(f"the proxy closed the connection before the {what}")
            data += chunk
            if partial:
                break
        return data


def probe(
    name: str,
    config: ProxyConfig,
    target: tuple[str, int],
    protect: SocketHook | None,
    udp: UdpCheck,
) -> bool:
    """Probe one proxy, printing one line per step and the UDP line; True when every step
    passed (and, with a UDP target, the round trip)."""
    if config.scheme == "direct":  # the bypass mode: no proxy, so nothing can fail here
        print(f"skip  proxy {name}: direct:// has nothing to probe (TCP, UDP, DNS go out directly)")
        return True
    print(f"proxy {name}: {config.redacted_url}")
    attempt = Probe(config, config.connect_timeout, protect)
    target_text = format_host_port(*target)
    steps: list[tuple[str, Callable[[], str] | None]]
    if config.scheme == "http":
        password = config.password.get_secret_value() if config.password is not None else None
        http = check_http.HttpConnectProbe(config.username, password, config.connect_timeout)

        def answer() -> str:
            assert attempt.sock is not None
            return http.answer(attempt.sock, *target)

        steps = [
            ("TCP connect", attempt.connect),
            (f"HTTP CONNECT {target_text} sent, answer", answer),
            ("authentication", http.authenticate),
            (f"tunnel to {target_text}", http.tunnel),
        ]
    else:
        steps = [
            ("TCP connect", attempt.connect),
            ("SOCKS5 greeting", attempt.greet),
            ("authentication", attempt.authenticate if config.username else None),
            (f"CONNECT {target_text}", lambda: attempt.request(*target)),
        ]
    failed = False
    try:
        for title, step in steps:
            if failed:
                print(f"  skip  {title}: an earlier step failed")
            elif step is None:
                print(f"  skip  {title}: none configured")
            else:
                try:
                    print(f"  pass  {title}: {step()}")
                except (StepFailed, check_http.StepFailed, Socks5WireError) as exc:
                    failed = True
                    print(f"  FAIL  {title}: {exc}")
    finally:
        attempt.close()
    verdict = udp.verdict(config, protect, tcp_failed=failed)
    print(f"  {describe(verdict, udp.config.when_unsupported)}")
    udp.verdicts.append(verdict)
    return not failed and (udp.target is None or verdict.carried is True)


@dataclass
class UdpCheck:
    """The UDP part of the check: the settings, the optional echo target, the verdicts."""

    config: UdpConfig
    target: tuple[str, int] | None
    verdicts: list[UdpVerdict]

    def verdict(
        self, proxy: ProxyConfig, protect: SocketHook | None, *, tcp_failed: bool
    ) -> UdpVerdict:
        if not self.config.enabled:
            return UdpVerdict(False, "udp.enabled is false")
        if tcp_failed and proxy.scheme != "http":
            return UdpVerdict(None, "an earlier step failed")
        endpoint = ProxyEndpoint.from_config(proxy)
        timeout = proxy.connect_timeout
        return asyncio.run(
            probe_udp(endpoint, timeout=timeout, prepare_socket=protect, target=self.target)
        )


def parse_target(text: str, option: str = "--target") -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{option} {text}: must be HOST:PORT, like example.com:80 or [::1]:80")
    return host, int(port)


def run(args: argparse.Namespace) -> int:
    """Raises ConfigError for a bad configuration (exit 2); returns 1 if a probe failed."""
    target = parse_target(args.target)
    udp_target = parse_target(args.udp_target, "--udp-target") if args.udp_target else None
    settings = load_settings(args.config, args.overrides)
    proxies = [
        (name if len(config.urls) == 1 else f"{name} #{number + 1}", entry)
        for name, config in [("default", settings.proxy), *settings.proxies.items()]
        for number, entry in enumerate(config.entries())  # each failover URL on its own
    ]
    for _, config in proxies:
        if config.password is not None:
            logs.register_secret(config.password.get_secret_value())
    counts = f"{len(proxies)} proxies, {len(settings.rules)} rules"
    print(f"pass  configuration {args.config}: valid, {counts}")
    bind = settings.route.bind_interface
    default_interface = uplink.follower(bind)  # bind_interface: auto
    current = default_interface.name if default_interface is not None else None
    protect = protector(settings.route.mark, bind, current)
    udp = UdpCheck(settings.udp, udp_target, [])
    results = [probe(name, config, target, protect, udp) for name, config in proxies]
    if all(results):
        without_udp = sum(verdict.carried is not True for verdict in udp.verdicts)
        if without_udp:
            print(f"all checks passed; UDP is not carried by {without_udp} of {len(results)}")
        else:
            print("all checks passed")
        return 0
    print(f"{results.count(False)} of {len(results)} proxies failed")
    return 1

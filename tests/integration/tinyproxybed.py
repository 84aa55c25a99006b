"""tinyproxy (a real HTTP proxy from Debian) in the bed's server namespace, for HTTP CONNECT.

Two instances on SRV_VETH_IP: HTTP_PROXY_PORT without authentication, HTTP_PROXY_AUTH_PORT with
``BasicAuth`` (the bed's SOCKS user and password). No ``ConnectPort`` line: CONNECT to any port
is allowed (tinyproxy's rule when none is given). Their logs (one line per CONNECT, at level
Connect) are in the bed's workdir.
"""

from __future__ import annotations

from pathlib import Path

from tests.integration import bed as bedlib

HTTP_PROXY_PORT = 3128
HTTP_PROXY_AUTH_PORT = 3129


def config_text(port: int, log_file: Path, basic_auth: tuple[str, str] | None) -> str:
    lines = [
        f"Port {port}",
        f"Listen {bedlib.SRV_VETH_IP}",
        "Timeout 60",
        "MaxClients 200",
        f'LogFile "{log_file}"',
        "LogLevel Connect",
        "DisableViaHeader Yes",
        "Allow 198.18.0.0/15",
    ]
    if basic_auth is not None:
        lines.append(f"BasicAuth {basic_auth[0]} {basic_auth[1]}")
    return "\n".join(lines) + "\n"


def start(bed: bedlib.Bed) -> None:
    """Both instances (once per bed); waits until they listen."""
    for name, port, auth in (
        ("tinyproxy", HTTP_PROXY_PORT, None),
        ("tinyproxy-auth", HTTP_PROXY_AUTH_PORT, (bed.socks_user, bed.socks_password)),
    ):
        log_file = bed.workdir / f"{name}-connects.log"
        conf = bed.workdir / f"{name}.conf"
        conf.write_text(config_text(port, log_file, auth))
        binary = bedlib.which("tinyproxy") or "tinyproxy"
        bed.start_server(name, [binary, "-d", "-c", str(conf)], tcp_ports=[port])


def log_text(bed: bedlib.Bed, *, auth: bool = False) -> str:
    name = "tinyproxy-auth" if auth else "tinyproxy"
    try:
        return (bed.workdir / f"{name}-connects.log").read_text(errors="replace")
    except FileNotFoundError:
        return ""


def url(bed: bedlib.Bed, *, auth: bool = False) -> str:
    if auth:  # the password reaches tun2socks through the environment, as for SOCKS5
        user = f"{bed.socks_user}:${{{bedlib.PASSWORD_ENV}}}"
        return f"http://{user}@{bedlib.SRV_VETH_IP}:{HTTP_PROXY_AUTH_PORT}"
    return f"http://{bedlib.SRV_VETH_IP}:{HTTP_PROXY_PORT}"

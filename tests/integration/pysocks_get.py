"""An HTTP GET through a SOCKS5 proxy by PySocks, run as a script inside the bed's client namespace.

PySocks is a blocking SOCKS5 client written independently of ours: the tests use it to see that
the SOCKS5 servers of the bed answer a client that is not tun2socks before tun2socks relies on
them. The password, if any, comes from the environment (PYSOCKS_PASSWORD), never from argv.

    pysocks_get.py PROXY_HOST PROXY_PORT TARGET_HOST TARGET_PORT PATH [--user NAME]

Prints one JSON object: {"status": "HTTP/1.0 200 OK", "body": "..."} or {"error": "Class: text"}.
"""

from __future__ import annotations

import argparse
import json
import os
import socket

import socks

TIMEOUT_S = 10.0


def get(args: argparse.Namespace) -> dict[str, str]:
    sock = socks.socksocket(socket.AF_INET6 if ":" in args.proxy_host else socket.AF_INET)
    sock.set_proxy(
        socks.SOCKS5,
        args.proxy_host,
        args.proxy_port,
        rdns=False,
        username=args.user,
        password=os.environ.get("PYSOCKS_PASSWORD") if args.user else None,
    )
    sock.settimeout(TIMEOUT_S)
    try:
        sock.connect((args.target_host, args.target_port))
        sock.sendall(f"GET {args.path} HTTP/1.0\r\nHost: {args.target_host}\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (OSError, socks.ProxyError) as exc:
        # connect() wraps the SOCKS error in GeneralProxyError("Socket error", inner): report
        # the inner one, which names what the server said
        inner = getattr(exc, "socket_err", None)
        reported = inner if isinstance(inner, socks.ProxyError) else exc
        return {"error": f"{type(reported).__name__}: {reported}"}
    finally:
        sock.close()
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return {"status": head.split(b"\r\n")[0].decode(), "body": body.decode(errors="replace")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("proxy_host")
    parser.add_argument("proxy_port", type=int)
    parser.add_argument("target_host")
    parser.add_argument("target_port", type=int)
    parser.add_argument("path")
    parser.add_argument("--user")
    print(json.dumps(get(parser.parse_args())))


if __name__ == "__main__":
    main()

"""A small DNS-over-HTTPS server (RFC 8484, POST and GET) for the integration bed.

Runs in the server namespace: every query it gets is asked of the bed's dnsmasq over UDP, and
the answer returned as ``application/dns-message``. One line per query on stdout
("doh query <name> <type>"), so a test can tell that its query came this way.

    python3 dohserver.py --cert server.pem --key server.key --bind 198.19.0.10 --port 443 \
        --upstream 198.19.0.10:53
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import socket
import ssl
import sys

from aiohttp import web
from dnslib import QTYPE, DNSRecord

DNS_MESSAGE = "application/dns-message"


async def ask_upstream(upstream: tuple[str, int], query: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in upstream[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, upstream)
        await loop.sock_sendall(sock, query)
        async with asyncio.timeout(5.0):
            while True:
                answer = await loop.sock_recv(sock, 65535)
                if answer[:2] == query[:2]:
                    return answer


def make_app(upstream: tuple[str, int]) -> web.Application:
    async def dns_query(request: web.Request) -> web.Response:
        if request.method == "POST":
            if request.content_type != DNS_MESSAGE:
                return web.Response(status=415)
            query = await request.read()
        else:
            encoded = request.query.get("dns", "")
            query = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        try:
            record = DNSRecord.parse(query)
        except Exception:
            return web.Response(status=400)
        question = record.q
        print(f"doh query {str(question.qname).rstrip('.')} {QTYPE[question.qtype]}", flush=True)
        try:
            answer = await ask_upstream(upstream, query)
        except (TimeoutError, OSError):
            return web.Response(status=502)
        return web.Response(body=answer, content_type=DNS_MESSAGE)

    app = web.Application()
    app.router.add_route("POST", "/dns-query", dns_query)
    app.router.add_route("GET", "/dns-query", dns_query)
    return app


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--bind", action="append", required=True)
    parser.add_argument("--port", type=int, default=443)
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the DNS server")
    args = parser.parse_args()
    host, _, port = args.upstream.rpartition(":")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.cert, args.key)
    app = make_app((host.strip("[]"), int(port)))
    web.run_app(app, host=args.bind, port=args.port, ssl_context=context, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())

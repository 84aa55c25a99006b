"""The control API (aiohttp) on the engine's loop: stats, connections, metrics, capture, dashboard.

    GET    /healthz              {"status": "ok"}                             (no token needed)
    GET    /stats                totals: TUN, flows, relayed bytes, drops, upstream errors,
                                 components (dns, udp, ...), capture
    GET    /connections          open flows; ?sort=id|bytes|age&limit=N
    DELETE /connections/{id}     reset the flow: RST to the client, upstream closed
    GET    /config               the settings, secrets replaced by ***
    GET    /metrics              Prometheus text format
    GET    /events               server-sent events: {"stats", "connections"} every second
    GET    /pcap                 capture status
    POST   /pcap/start           start a capture, optional JSON body {"max_bytes": N}
    POST   /pcap/stop            stop it
    GET    /pcap/download        the capture (pcap file)
    GET    /                     the dashboard (static/dashboard.html; no token needed)

With `api.token` set, every other route wants ``Authorization: Bearer TOKEN``. Without one,
requests whose Host is a DNS name other than localhost are refused (DNS rebinding), and
cross-origin POST/DELETE always are: a web page in a local browser must not drive the API.
Handlers only read counters and call the engine's own methods; they run on the engine's loop,
so no locking is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from ipaddress import ip_address
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from tun2socks.config import api_listen_address
from tun2socks.observe import snapshot
from tun2socks.observe.pcap import Capture

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from tun2socks.config import Settings
    from tun2socks.engine import Engine

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
PUBLIC_PATHS = frozenset({"/", "/healthz"})
EVENT_INTERVAL = 1.0  # seconds between two server-sent events
EVENT_CONNECTIONS = 100  # the busiest flows sent with each event
SHUTDOWN_TIMEOUT = 2.0  # seconds for open requests at exit (event streams end at once)
PCAP_CONTENT_TYPE = "application/vnd.tcpdump.pcap"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Observer:
    """The packet capture and, when enabled, the HTTP server; `close()` stops both."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        pcap = settings.api.pcap
        self.capture = Capture(engine.device, file=pcap.file, max_bytes=pcap.max_bytes)
        self.started = engine.loop.time()
        # The registry (and prometheus_client, ~9 MB) is built at the first scrape: an idle
        # tun2socks that nobody scrapes does not pay for it.
        self._registry: CollectorRegistry | None = None
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        token = settings.api.token
        self._token = token.get_secret_value().encode() if token is not None else None

    def uptime(self) -> float:
        return self.engine.loop.time() - self.started

    async def serve(self, listen: str) -> None:
        host, port = api_listen_address(listen)
        app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024)
        app.router.add_get("/", self.dashboard)
        app.router.add_static("/static/", STATIC_DIR)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/stats", self.stats)
        app.router.add_get("/connections", self.connections)
        app.router.add_delete("/connections/{id}", self.close_connection)
        app.router.add_get("/config", self.config)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/events", self.events)
        app.router.add_get("/pcap", self.pcap_status)
        app.router.add_post("/pcap/start", self.pcap_start)
        app.router.add_post("/pcap/stop", self.pcap_stop)
        app.router.add_get("/pcap/download", self.pcap_download)
        # No access log: it would be one line per dashboard poll.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            await runner.cleanup()
            # The data path matters more than its dashboard: keep running without the API.
            log.error("control API: cannot listen on %s: %s", listen, exc.strerror or exc)
            return
        self._runner = runner
        log.info("control API on http://%s/%s", listen, " (token required)" * bool(self._token))

    async def close(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.capture.stop()

    # ---------------------------------------------------------------- access control

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._token is None and not _local_host(request.host):
            return _error(403, "Host must be an IP address or localhost")
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            origin = request.headers.get("Origin")
            if origin is not None and origin != f"{request.scheme}://{request.host}":
                return _error(403, "cross-origin requests are refused")
        public = request.path in PUBLIC_PATHS or request.path.startswith("/static/")
        if self._token is not None and not public:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), self._token
            ):
                response = _error(401, "a valid bearer token is required")
                response.headers["WWW-Authenticate"] = 'Bearer realm="tun2socks"'
                return response
        return await handler(request)

    # ---------------------------------------------------------------- handlers

    async def dashboard(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "dashboard.html")

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    def _stats(self) -> dict[str, Any]:
        return snapshot.stats(self.engine, uptime=self.uptime(), capture=self.capture)

    async def stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._stats())

    async def connections(self, request: web.Request) -> web.StreamResponse:
        sort = request.query.get("sort", "id")
        if sort not in ("id", "bytes", "age"):
            return _error(400, "sort must be id, bytes or age")
        limit = _int_query(request, "limit")
        found = snapshot.connections(self.engine, sort=sort, limit=limit)
        return web.json_response({"connections": found})

    async def close_connection(self, request: web.Request) -> web.StreamResponse:
        try:
            flow_id = int(request.match_info["id"])
        except ValueError:
            return _error(400, "the connection id is a number")
        if not self.engine.close_flow(flow_id):  # RST to the client, upstream aborted
            return _error(404, f"no open connection {flow_id}")
        return web.json_response({"closed": flow_id})

    async def config(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(snapshot.redacted_settings(self.settings))

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        from prometheus_client import CONTENT_TYPE_LATEST

        from tun2socks.observe import metrics

        if self._registry is None:
            self._registry = metrics.registry(self.engine, self.uptime, self.capture)
        body = metrics.exposition(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        try:
            while not self._closing.is_set():
                payload = {
                    "stats": self._stats(),
                    "connections": snapshot.connections(
                        self.engine, sort="bytes", limit=EVENT_CONNECTIONS
                    ),
                }
                await response.write(f"data: {json.dumps(payload)}\n\n".encode())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), EVENT_INTERVAL)
        except ConnectionResetError:
            pass  # the browser went away
        return response

    async def pcap_status(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.capture.status())

    async def pcap_start(self, request: web.Request) -> web.StreamResponse:
        max_bytes = None
        if request.can_read_body:
            try:
                body = await request.json()
            except ValueError:
                return _error(400, "the body must be JSON")
            max_bytes = body.get("max_bytes") if isinstance(body, dict) else None
            if max_bytes is not None and (type(max_bytes) is not int or max_bytes < 4096):
                return _error(400, "max_bytes must be a whole number of at least 4096")
        try:
            self.capture.start(max_bytes)
        except OSError as exc:
            return _error(500, f"cannot write the capture: {exc.strerror or exc}")
        return web.json_response(self.capture.status())

    async def pcap_stop(self, request: web.Request) -> web.StreamResponse:
        self.capture.stop()
        return web.json_response(self.capture.status())

    async def pcap_download(self, request: web.Request) -> web.StreamResponse:
        headers = {"Content-Disposition": 'attachment; filename="tun2socks.observe.pcap"'}
        if self.capture.file is not None:
            self.capture.flush()
            path = Path(self.capture.file)
            if not path.exists():
                return _error(404, "no capture taken yet")
            # Read now, not streamed: a running capture keeps growing under a file response.
            data = await asyncio.to_thread(path.read_bytes)
        else:
            found = self.capture.contents()
            if found is None:
                return _error(404, "no capture taken yet")
            data = found
        headers["Content-Type"] = PCAP_CONTENT_TYPE
        return web.Response(body=data, headers=headers)


async def start(engine: Engine, all_settings: Settings) -> Observer:
    """The capture (from the start when `api.pcap.file` is set) and, if enabled, the API."""
    observer = Observer(engine, all_settings)
    settings = all_settings.api
    if settings.pcap.file is not None:
        try:
            observer.capture.start()
        except OSError as exc:
            log.error("cannot write the capture %s: %s", settings.pcap.file, exc.strerror or exc)
    if settings.enabled:
        await observer.serve(settings.listen)
    return observer


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _int_query(request: web.Request, name: str) -> int | None:
    text = request.query.get(name)
    if text is None:
        return None
    try:
        return max(0, int(text))
    except ValueError:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": f"{name} must be a whole number"}),
            content_type="application/json",
        ) from None


def _local_host(host: str) -> bool:
    """The Host header names an IP address or localhost (no DNS rebinding through a name)."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]").lower()
    if name in ("localhost", ""):
        return True
    try:
        ip_address(name)
    except ValueError:
        return False
    return True

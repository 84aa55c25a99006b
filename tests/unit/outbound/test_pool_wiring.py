"""routing.proxy_dialer gives each SOCKS5 proxy its pipelining and session pool, registered for
/stats under stable names; HTTP proxies get neither. Construction only: no sockets, no loop."""

from __future__ import annotations

from tun2socks.config import load_settings
from tun2socks.outbound import routing
from tun2socks.outbound.failover import FailoverDialer
from tun2socks.outbound.session_pool import SessionPools


def test_each_proxy_of_a_failover_list_has_its_pool_and_the_stats_name_it() -> None:
    settings = load_settings(
        None,
        [
            'proxy.url=["socks5://10.0.0.1:1080", "socks5://10.0.0.2:1080"]',
            'proxies={"corp": {"url": "socks5://10.0.0.3:1080", "pipeline": false}}',
        ],
    )
    sessions = SessionPools()
    default = routing.proxy_dialer(settings.proxy, None, sessions)
    corp = routing.proxy_dialer(settings.proxies["corp"], None, sessions, "corp")
    assert isinstance(default, FailoverDialer)
    assert all(d.pool is not None for d in default.dialers)
    assert default.dialers[0].pool is not default.dialers[1].pool
    sources = sessions.stats_sources()
    assert set(sources) == {"pool", "pool_p1", "pool_corp"}
    idle = sources["pool"]()
    assert idle["size"] == idle["opened"] == idle["hits"] == 0
    assert idle["pipeline"] == -1  # auto, not probed: nothing was dialed
    assert sources["pool_corp"]()["pipeline"] == 0  # forced off
    assert corp.pool is not None


def test_an_http_proxy_gets_no_pool_and_a_zero_size_none_either() -> None:
    sessions = SessionPools()
    http = load_settings(None, ["proxy.url=http://10.0.0.1:3128"]).proxy
    assert routing.proxy_dialer(http, None, sessions).pool is None
    off = load_settings(None, ["proxy.url=socks5://10.0.0.1:1080", "proxy.pool.size=0"]).proxy
    dialer = routing.proxy_dialer(off, None, sessions)
    assert dialer.pool is None
    assert set(sessions.stats_sources()) == {"pool"}  # pipelining state only
    assert set(sessions.stats_sources()["pool"]()) == {"pipeline"}

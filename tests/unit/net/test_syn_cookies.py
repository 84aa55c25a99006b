"""SYN cookies (RFC 4987 section 3.6): what a cookie keeps of the SYN, and what it refuses."""

from __future__ import annotations

import pytest

from tun2socks.net.syn_cookies import PERIOD, SynCookies
from tun2socks.net.tcp import TcpOptions

KEY = (bytes((10, 0, 0, 1)), 40000, bytes((192, 0, 2, 80)), 443)
IRS = 0x12345678


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (TcpOptions(mss=1460, wscale=7, sack_permitted=True), TcpOptions(1460, 7, True)),
        (TcpOptions(mss=1400, wscale=0), TcpOptions(1360, 0, False)),  # MSS rounded down
        (TcpOptions(mss=9000, wscale=14), TcpOptions(8960, 14, False)),
        (TcpOptions(mss=20), TcpOptions(48, None, False)),  # Linux's floor
        (TcpOptions(), TcpOptions(536, None, False)),  # RFC 9293 3.7.1 default
    ],
)
def test_rfc4987_s3_6_cookie_keeps_mss_window_scale_and_sack_permitted(
    sent: TcpOptions, kept: TcpOptions
) -> None:
    cookies = SynCookies(b"k" * 16)
    cookie = cookies.make(KEY, IRS, sent, 4, 100.0)
    assert cookies.check(KEY, IRS, cookie, 100.0) == kept


def test_rfc4987_s3_6_cookie_is_bound_to_secret_flow_isn_and_time() -> None:
    cookies = SynCookies(b"k" * 16)
    cookie = cookies.make(KEY, IRS, TcpOptions(mss=1460), 4, 100.0)
    assert cookies.check(KEY, IRS, cookie, 100.0 + PERIOD) is not None  # one period later
    assert cookies.check(KEY, IRS, cookie, 100.0 + 2 * PERIOD) is None  # expired
    assert SynCookies(b"x" * 16).check(KEY, IRS, cookie, 100.0) is None
    assert cookies.check(KEY, IRS + 1, cookie, 100.0) is None
    assert cookies.check((*KEY[:3], 444), IRS, cookie, 100.0) is None
    assert cookies.check(KEY, IRS, cookie ^ 0x10, 100.0) is None  # options tampered
    v6 = SynCookies(b"k" * 16).make(KEY, IRS, TcpOptions(), 6, 0.0)
    assert cookies.check(KEY, IRS, v6, 0.0) == TcpOptions(1220, None, False)

"""`tun2socks --help` and `run --help` say what happens to TCP, UDP and DNS (issue 13 item 4),
and `check --help` offers the UDP round trip."""

from __future__ import annotations

import pytest

from tun2socks import cli


def help_text(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert cli.main([*argv, "--help"]) == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_top_level_help_describes_tcp_udp_and_dns(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(capsys)
    assert "TCP: a user-space stack ends each connection and carries it through" in text
    assert "UDP: through the proxy's UDP ASSOCIATE, else refused (udp.when_unsupported)" in text
    assert "DNS: a built-in forwarder answers, asking upstream through the proxy" in text
    assert "carry the TUN's TCP, UDP and DNS through the proxy" in text


def test_run_help_describes_tcp_udp_dns_and_the_start_up_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = help_text(capsys, "run")
    for part in (
        "TCP connections through the proxy",
        "UDP datagrams through its UDP ASSOCIATE",
        "DNS queries answered by the built-in forwarder",
        "one summary line",
    ):
        assert part in text, text


def test_check_help_offers_the_udp_round_trip(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(capsys, "check")
    assert "--udp-target HOST:PORT" in text and "UDP ASSOCIATE" in text

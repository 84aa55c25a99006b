"""Logging: text and JSON lines on stderr, quiet by default, registered secrets masked."""

import json
import logging
import re

import pytest

from tun2socks import logs
from tun2socks.config import LogConfig

TEXT_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (\w+) ([\w.]+): (.*)")
log = logging.getLogger("tun2socks.test_logs")


pytestmark = pytest.mark.usefixtures("restore_logging")  # tests/unit/conftest.py


def lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.splitlines()


def test_text_line_has_time_level_logger_message_and_fields(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.setup(LogConfig(level="info"))
    log.info("flow %s opened", 7, extra=logs.kv(dst="10.0.0.2:80", note="two words", empty=""))
    [line] = lines(capsys)
    match = TEXT_LINE.fullmatch(line)
    assert match is not None, line
    assert match.groups() == (
        "info",
        "tun2socks.test_logs",
        'flow 7 opened dst=10.0.0.2:80 note="two words" empty=""',
    )


def test_json_line_has_the_fields(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup(LogConfig(level="debug", format="json"))
    log.debug("flow opened", extra=logs.kv(flow=7, dst="10.0.0.2:80", level="clash"))
    [line] = lines(capsys)
    entry = json.loads(line)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry.pop("ts"))
    assert entry == {
        "level": "debug",
        "logger": "tun2socks.test_logs",
        "msg": "flow opened",
        "flow": 7,
        "dst": "10.0.0.2:80",
        "level_": "clash",
    }


def test_json_carries_the_exception(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup(LogConfig(format="json"))
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    [line] = lines(capsys)
    entry = json.loads(line)
    assert (entry["level"], entry["msg"]) == ("error", "failed")
    assert "RuntimeError: boom" in entry["exc"]


def test_quiet_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup(LogConfig())
    log.info("not shown")
    log.warning("shown")
    [line] = lines(capsys)
    assert line.endswith(" warning tun2socks.test_logs: shown")


def test_setup_again_replaces_the_handler(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup(LogConfig(level="info", format="json"))
    logs.setup(LogConfig(level="info"))
    log.info("once")
    [line] = lines(capsys)
    assert line.endswith("tun2socks.test_logs: once")


def test_registered_secret_is_masked_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    secret = 'lg-S3cr"t @x'
    logs.register_secret(secret)
    for log_format in ("text", "json"):
        logs.setup(LogConfig(format=log_format))
        log.warning("in the message %s and %r", secret, secret, extra=logs.kv(pw=secret))
        log.warning("in a url socks5://u:lg-S3cr%22t%20%40x@h:1")
        try:
            raise ValueError(secret)
        except ValueError:
            log.exception("in a traceback")
        err = capsys.readouterr().err
        assert "***" in err
        for spelling in (secret, "lg-S3cr%22t%20%40x", 'lg-S3cr\\"t @x'):
            assert spelling not in err, (log_format, err)


def test_redact_leaves_other_text_alone() -> None:
    logs.register_secret("lg-another-one")
    assert logs.redact("a lg-another-one b") == "a *** b"
    assert logs.redact("nothing to hide") == "nothing to hide"

"""proxy.pipeline auto|true|false (outbound/pipeline_probe.py: Pipelining), with a scripted probe
and a stepped clock: no sockets."""

from __future__ import annotations

import asyncio

import pytest

from tun2socks.outbound.pipeline_probe import RETRY_AFTER_S, Pipelining


class ScriptedProbe:
    def __init__(self, *answers: bool | None) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def __call__(self) -> bool | None:
        self.calls += 1
        return self.answers.pop(0)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.parametrize("setting", [True, False])
def test_forced_setting_never_probes(setting: bool) -> None:
    probe = ScriptedProbe()

    async def body() -> None:
        pipelining = Pipelining(setting, probe)
        assert pipelining.use_now() is setting
        await _settle()
        assert pipelining.state() == int(setting)

    asyncio.run(body())
    assert probe.calls == 0


def test_auto_is_sequential_until_the_probe_answers_then_probes_no_more() -> None:
    probe = ScriptedProbe(True)

    async def body() -> None:
        pipelining = Pipelining("auto", probe)
        assert pipelining.state() == -1
        assert pipelining.use_now() is False  # first use starts the probe
        assert pipelining.use_now() is False  # one probe at a time
        await _settle()
        assert pipelining.use_now() is True
        assert pipelining.state() == 1

    asyncio.run(body())
    assert probe.calls == 1


def test_auto_stays_sequential_for_a_server_that_loses_pipelined_messages() -> None:
    probe = ScriptedProbe(False)

    async def body() -> None:
        pipelining = Pipelining("auto", probe)
        pipelining.use_now()
        await _settle()
        assert pipelining.use_now() is False
        assert pipelining.state() == 0

    asyncio.run(body())
    assert probe.calls == 1


def test_an_undecided_probe_is_retried_later_not_on_every_flow() -> None:
    now = [0.0]
    probe = ScriptedProbe(None, True)

    async def body() -> None:
        pipelining = Pipelining("auto", probe, clock=lambda: now[0])
        pipelining.use_now()
        await _settle()
        assert pipelining.state() == -1
        now[0] = RETRY_AFTER_S / 2
        assert pipelining.use_now() is False
        await _settle()
        assert probe.calls == 1
        now[0] = RETRY_AFTER_S
        pipelining.use_now()
        await _settle()
        assert pipelining.use_now() is True

    asyncio.run(body())
    assert probe.calls == 2


def test_auto_needs_a_probe() -> None:
    with pytest.raises(ValueError):
        Pipelining("auto")

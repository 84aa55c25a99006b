"""The rule matcher (tun2socks.rules): first match wins, default proxy; pure, no I/O."""

from __future__ import annotations

import ast
import asyncio
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from pathlib import Path

import pytest

from tun2socks import rules as rules_module
from tun2socks.config import RuleConfig
from tun2socks.net.events import FlowRequested
from tun2socks.outbound.dialer import DialError, Socks5Dialer
from tun2socks.outbound.direct import DirectDialer
from tun2socks.outbound.routing import RuleDialer
from tun2socks.outbound.socks5 import ProxyEndpoint
from tun2socks.rules import Action, Decision, Rule, RuleSet

V4 = ip_address("198.19.0.10")
V6 = ip_address("fd00:c8:1::10")


def rule(number: int, action: str = "direct", **conditions: object) -> Rule:
    return Rule(number=number, action=Action(action), **conditions)  # type: ignore[arg-type]


def test_no_rules_means_the_default_proxy() -> None:
    decision = RuleSet([]).decide(V4, 80)
    assert decision == Decision(Action.PROXY, None, None)
    assert str(decision) == "proxy by default"


def test_first_matching_rule_wins() -> None:
    rules = RuleSet(
        [
            rule(0, "block", networks=(ip_network("10.0.0.0/8"),)),
            rule(1, "direct", networks=(ip_network("198.19.0.0/16"),)),
            rule(2, "block", networks=(ip_network("198.19.0.10/32"),)),
        ]
    )
    assert rules.decide(V4, 80) == Decision(Action.DIRECT, None, 1)
    assert rules.decide(ip_address("10.1.2.3"), 80).rule == 0
    assert rules.decide(ip_address("192.0.2.1"), 80) == rules.default


def test_prefixes_of_the_other_family_never_match() -> None:
    rules = RuleSet([rule(0, networks=(ip_network("::/0"),))])
    assert rules.decide(V6, 80).action is Action.DIRECT
    assert rules.decide(V4, 80).action is Action.PROXY


@pytest.mark.parametrize(
    ("port", "matches"), [(79, False), (80, True), (8000, True), (8101, False)]
)
def test_ports_and_port_ranges(port: int, matches: bool) -> None:
    rules = RuleSet([rule(0, "block", ports=((80, 80), (8000, 8100)))])
    assert (rules.decide(V4, port).action is Action.BLOCK) == matches


def test_protocol_condition() -> None:
    rules = RuleSet([rule(0, "block", protocol="udp")])
    assert rules.decide(V4, 53, "udp").action is Action.BLOCK
    assert rules.decide(V4, 53, "tcp").action is Action.PROXY


def test_all_conditions_of_a_rule_must_hold() -> None:
    rules = RuleSet([rule(0, networks=(ip_network("198.19.0.0/16"),), ports=((443, 443),))])
    assert rules.decide(V4, 443).action is Action.DIRECT
    assert rules.decide(V4, 80).action is Action.PROXY
    assert rules.decide(ip_address("10.0.0.1"), 443).action is Action.PROXY


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "badexample.com", False),
        ("*.example.com", "A.EXAMPLE.COM.", True),
        ("example.com", "example.com", True),
        ("example.com", "www.example.com", False),
        ("ads?.example", "ads1.example", True),
        ("ads?.example", "ads.example", False),
        ("*", "anything.at.all", True),
        ("a.b", "aXb", False),  # the dot is literal
    ],
)
def test_domain_patterns(pattern: str, name: str, matches: bool) -> None:
    rules = RuleSet([rule(0, "block", domains=(pattern,))])
    assert (rules.decide(V4, 80, domain=name).action is Action.BLOCK) == matches


def test_a_domain_rule_never_matches_an_unknown_domain() -> None:
    rules = RuleSet([rule(0, "block", domains=("*",))])
    assert rules.uses_domains
    assert rules.decide(V4, 80, domain=None).action is Action.PROXY


def test_a_rule_without_conditions_catches_everything() -> None:
    rules = RuleSet([rule(0, "block", ports=((22, 22),)), rule(1, "direct")])
    assert rules.decide(V6, 12345) == Decision(Action.DIRECT, None, 1)
    assert not rules.uses_domains


def test_a_named_proxy_only_with_action_proxy() -> None:
    assert str(rule(0, "proxy", proxy="corp").decision) == "proxy corp by rule 0"
    with pytest.raises(ValueError, match="needs action proxy"):
        rule(0, "direct", proxy="corp")


def test_rules_from_the_configuration() -> None:
    configs = [
        RuleConfig.model_validate({"dst": "10.0.0.0/8", "port": "1-1024", "action": "direct"}),
        RuleConfig.model_validate({"domain": "*.corp.example", "action": "proxy", "proxy": "c"}),
        RuleConfig.model_validate({"protocol": "tcp", "port": 25, "action": "block"}),
    ]
    rules = RuleSet.from_settings(configs)
    assert rules.decide(ip_address("10.9.9.9"), 22) == Decision(Action.DIRECT, None, 0)
    assert rules.decide(V4, 443, domain="git.corp.example") == Decision(Action.PROXY, "c", 1)
    assert rules.decide(V4, 25) == Decision(Action.BLOCK, None, 2)


def test_the_matcher_module_is_pure() -> None:
    tree = ast.parse(Path(rules_module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert not imported & {"asyncio", "socket", "os", "time", "select", "threading"}


# --- the rule dialer: decisions without any connection ---------------------------------------


def rule_dialer(rules: RuleSet, domains: dict[str, str]) -> RuleDialer:
    proxy = Socks5Dialer(ProxyEndpoint("192.0.2.1", 1080), timeout=1.0)
    return RuleDialer(
        rules,
        proxy,
        {},
        DirectDialer(timeout=1.0, protect=None),
        lambda address: domains.get(str(address)),
    )


def flow_to(dst: IPv4Address | IPv6Address, port: int) -> FlowRequested:
    return FlowRequested(7, ip_address("198.18.0.1"), 40000, dst, port)


def test_block_refuses_the_flow_naming_the_rule() -> None:
    dialer = rule_dialer(RuleSet([rule(0, "direct", ports=((22, 22),)), rule(1, "block")]), {})
    with pytest.raises(DialError, match=r"^blocked by rule 1$"):
        asyncio.run(dialer.dial(flow_to(V4, 80)))


def test_domain_rules_use_the_engines_domain_lookup() -> None:
    rules = RuleSet([rule(0, "block", domains=("*.ads.example",))])
    dialer = rule_dialer(rules, {str(V4): "x.ads.example"})
    assert dialer.decide(V4, 443).action is Action.BLOCK
    assert dialer.decide(V6, 443).action is Action.PROXY
    with pytest.raises(DialError, match="blocked by rule 0"):
        asyncio.run(dialer.dial_host("y.ads.example", 443))

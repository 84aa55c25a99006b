"""The command-line options from which ``run`` and ``exec`` make their settings: ``-c FILE``,
``--proxy URL``, ``--set KEY=VALUE`` and ``--log-level`` (and ``--device`` for ``run``). Each
command says in its own words what they mean for it; the precedence is in tun2socks/cli.py."""

from __future__ import annotations

import argparse

LOG_LEVELS = ("debug", "info", "warning", "error")


def add_settings_options(
    parser: argparse.ArgumentParser,
    *,
    proxy_help: str,
    set_help: str,
    log_level_help: str,
    device_help: str | None = None,
) -> None:
    """Add the options to `parser`, in the order --help lists them; --device only with its help."""
    parser.add_argument("-c", "--config", metavar="FILE", help="YAML settings file")
    if device_help is not None:
        parser.add_argument("--device", metavar="NAME", help=device_help)
    parser.add_argument("--proxy", metavar="URL", help=proxy_help)
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help=set_help,
    )
    parser.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, help=log_level_help)

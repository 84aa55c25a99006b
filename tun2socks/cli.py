"""Command line: ``tun2socks run``, ``exec``, ``status``, ``check``, ``down`` and ``version``.

Settings come from defaults < ``-c FILE`` < ``--set KEY=VALUE`` < explicit flags (``--device``,
``--proxy``, ``--log-level``). A configuration error prints ``tun2socks: error: ...`` and
exits 2; the other errors a user can act on (`tun2socks.errors.UserError`: a device that
cannot be opened, routes that cannot be set up, an API that cannot be asked, ...) print the
same way and exit 1; Ctrl-C exits 130 without a traceback.
"""

import argparse
import logging
import pwd
import sys
from collections.abc import Sequence

from tun2socks import __version__, logs
from tun2socks.commands import check, down, exec_command, status
from tun2socks.commands.settings_options import add_settings_options
from tun2socks.config import ConfigError, Settings, exposure, load_settings
from tun2socks.errors import UserError

EXIT_CONFIG_ERROR = ConfigError.exit_status
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tun2socks",
        description="A transparent proxy for a TUN device. TCP: a user-space stack ends each "
        "connection and carries it through the SOCKS5 or HTTP proxy. UDP: through the "
        "proxy's UDP ASSOCIATE, else refused (udp.when_unsupported). DNS: a built-in "
        "forwarder answers, asking upstream through the proxy.",
    )
    parser.add_argument("--version", action="version", version=f"tun2socks {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "run",
        help="carry the TUN's TCP, UDP and DNS through the proxy",
        description="Open (or attach to) the TUN device and relay what enters it until SIGINT "
        "or SIGTERM: TCP connections through the proxy, UDP datagrams through its UDP "
        "ASSOCIATE (or refused, as udp.when_unsupported says), DNS queries answered by the "
        "built-in forwarder through the proxy. With route.auto it also routes all traffic "
        "into the device, and undoes that on exit. At start it prints one summary line and "
        "warns at once when the proxy does not answer.",
        epilog="Precedence: defaults < -c FILE < --set < --device/--proxy/--log-level.",
    )
    add_settings_options(
        run,
        device_help="TUN device name, or fd://N from a parent (tun.name)",
        proxy_help="socks5:// or http://[user[:pass]@]host:port (proxy.url); "
        "${VAR} from the environment",
        set_help="set one key, e.g. --set tun.mtu=9000 (repeatable)",
        log_level_help="log.level",
    )
    run.add_argument(
        "--pcap", metavar="FILE", help="capture every TUN packet into FILE (api.pcap.file)"
    )
    run.add_argument("--user", metavar="NAME", help="run the data path as NAME after set-up")
    status.add_parser(commands)
    check.add_parser(commands)
    down.add_parser(commands)
    exec_command.add_parser(commands)
    commands.add_parser("version", help="print the version", description="Print the version.")
    return parser


def build_settings(args: argparse.Namespace) -> Settings:
    """The settings for ``run`` from its parsed arguments. Raises ConfigError."""
    sets_proxy = any(item.partition("=")[0].strip() == "proxy.url" for item in args.overrides)
    if args.config is None and args.proxy is None and not sets_proxy:
        raise ConfigError(
            "a proxy URL is needed: pass --proxy socks5://HOST:PORT (direct:// for none) or -c FILE"
        )
    flags = {"tun.name": args.device, "proxy.url": args.proxy, "log.level": args.log_level}
    flags["api.pcap.file"] = args.pcap
    return load_settings(args.config, args.overrides, flags)


def _run(args: argparse.Namespace) -> int:
    settings = build_settings(args)
    if args.user is not None:
        check_user(args.user)
    for entry in settings.proxy.entries():  # each failover URL
        if entry.password is not None:
            logs.register_secret(entry.password.get_secret_value())
    if settings.api.token is not None:
        logs.register_secret(settings.api.token.get_secret_value())
    for named in settings.proxies.values():
        for entry in named.entries():
            if entry.password is not None:
                logs.register_secret(entry.password.get_secret_value())
    logs.setup(settings.log)
    warnings = exposure.command_line_warnings([args.proxy or "", *args.overrides])
    if args.config is not None:
        warnings += exposure.config_file_warnings(args.config)
    for warning in warnings:
        logging.getLogger("tun2socks").warning("%s", warning)
    # Imported late: the app pulls in the whole data path, which `version` does not need.
    from tun2socks.app import run as run_app

    if args.user is not None:
        return run_app(settings, user=args.user)
    return run_app(settings)


def check_user(user: str) -> None:
    try:
        pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"--user {user}: no such user") from None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exit_:  # --help, --version and usage errors
            return exit_.code if isinstance(exit_.code, int) else EXIT_CONFIG_ERROR
        if args.command == "version":
            print(f"tun2socks {__version__}")
            return 0
        if args.command == "status":
            return status.run(args)
        if args.command == "check":
            return check.run(args)
        if args.command == "down":
            return down.run(args)
        if args.command == "exec":
            return exec_command.run(args)
        return _run(args)
    except UserError as err:
        print(f"tun2socks: error: {err}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED

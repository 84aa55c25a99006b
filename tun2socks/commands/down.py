"""``tun2socks down``: undo what a killed run left on the host, from its state file.

A run that exits normally undoes its own changes. One killed with SIGKILL (or by a crash of the
machine's OOM killer) leaves its routes, rules and resolver settings behind, recorded in
``route.state_dir``; this command undoes them, each step on its own, and removes the record.
It refuses while the run that owns a record is still alive. The next ``tun2socks run`` on the
same device does the same by itself before it starts.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tun2socks.config import RouteConfig, load_settings

DEFAULT_STATE_DIR = RouteConfig().state_dir


def add_parser(commands: Any) -> None:
    down = commands.add_parser(
        "down",
        help="undo the host changes a killed run left behind",
        description="Undo the routes, rules and resolver settings that a killed tun2socks left "
        "behind (recorded in route.state_dir). Without --device: every record of this "
        "network namespace.",
    )
    down.add_argument("-c", "--config", metavar="FILE", help="take tun.name and route.state_dir")
    down.add_argument("--device", metavar="NAME", help="only the record of this device")
    down.add_argument(
        "--state-dir", metavar="DIR", help=f"where the records are (default {DEFAULT_STATE_DIR})"
    )


def run(args: argparse.Namespace) -> int:
    """0 when nothing is left to undo; 1 when something could not be undone or is in use."""
    # Imported here: pyroute2 is not needed for the other commands.
    from tun2socks.host import routes
    from tun2socks.host.state import StateError, StateFile, devices_with_state

    state_dir, device = DEFAULT_STATE_DIR, args.device
    if args.config is not None:
        settings = load_settings(args.config)
        state_dir = settings.route.state_dir
        device = device or (settings.tun.name if settings.tun.fd is None else None)
    state_dir = args.state_dir or state_dir
    devices = [device] if device else devices_with_state(state_dir)
    if not devices:
        print(f"nothing to undo: no records in {state_dir}")
        return 0
    status = 0
    for name in devices:
        state = StateFile(state_dir, name)
        try:
            state.lock()
            record = state.leftover()
        except StateError as exc:
            print(f"tun2socks: error: {exc}", file=sys.stderr)
            state.unlock()
            status = 1
            continue
        try:
            if record is None:
                print(f"{name}: nothing to undo")
                continue
            changes = record["changes"]
            errors = routes.undo(changes)
            for error in errors:
                print(f"tun2socks: error: {name}: could not undo {error}", file=sys.stderr)
            if errors:
                status = 1
            else:
                state.remove()
                pid = record.get("pid", "?")
                print(f"{name}: undid {len(changes)} changes left by pid {pid}")
                for change in changes:
                    print(f"  {routes.describe(change)}")
        finally:
            state.unlock()
    return status

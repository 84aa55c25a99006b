"""`tun2socks check` as the tests run it: in the bed's client namespace, with the settings
written to a file and the proxy's password in the environment (bedlib.PASSWORD_ENV)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.integration import bed as bedlib

TARGET = f"{bedlib.TARGET_IP}:{bedlib.HTTP_PORT}"


def run_check(
    bed: bedlib.Bed,
    tmp_path: Path,
    config: dict[str, Any],
    *,
    password: str | None = None,
    target: str = TARGET,
    udp_target: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """`check -c FILE --target TARGET [--udp-target ...]`; `password` defaults to the bed's."""
    path = tmp_path / "check.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ)
    env[bedlib.PASSWORD_ENV] = bed.socks_password if password is None else password
    command = [*bedlib.tun2socks_command(), "check", "-c", str(path), "--target", target]
    if udp_target is not None:
        command += ["--udp-target", udp_target]
    return subprocess.run(
        [*bed.cli_prefix(), *command],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )

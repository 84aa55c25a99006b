"""Run a command as `nobody` with no capability, in a private mount namespace of the test.

Two things of this machine would stop an ordinary user, and neither may be changed for all:
- /dev/net/tun may be mode 0600 (some VMs ship it so; Debian and Ubuntu make it 0666): a
  private device node with the mode the test asks for is bind-mounted over it;
- the Python that has tun2socks's dependencies may live under /root (pyenv), which others may
  not enter: a tmpfs of mode 0755 goes over /root with only that tree bound back.
Both mounts exist only in the namespace of this one command; `unshare -m` made it private, so
nothing propagates to the machine, and it goes away with the command.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

SCRIPT = r"""
set -e
work=$1; mode=$2; shift 2
mkdir -p "$work/mnt"
mount -t tmpfs -o mode=0755 tmpfs "$work/mnt"
mknod -m "$mode" "$work/mnt/tun" c 10 200
mount --bind "$work/mnt/tun" /dev/net/tun
if [ -n "$PYTHON_TREE" ]; then
    mkdir "$work/mnt/python"
    mount --bind "$PYTHON_TREE" "$work/mnt/python"
    mount -t tmpfs -o mode=0755 tmpfs /root
    mkdir -p "$PYTHON_TREE"
    mount --bind "$work/mnt/python" "$PYTHON_TREE"
fi
exec setpriv --reuid=nobody --regid=nogroup --clear-groups --inh-caps=-all "$@"
"""


def python_tree() -> str:
    """The top directory under /root holding this interpreter, or "" when it is elsewhere."""
    parts = Path(sys.executable).resolve().parts
    return str(Path(*parts[:3])) if parts[:2] == ("/", "root") and len(parts) > 3 else ""


def as_nobody(workdir: Path, argv: Sequence[str], *, tun_mode: str = "0666") -> list[str]:
    """The command line that runs `argv` as nobody (see above); run it as root."""
    env = ["env", f"PYTHON_TREE={python_tree()}"]
    shell = ["unshare", "-m", "--propagation", "private", "sh", "-c", SCRIPT, "sh"]
    return [*env, *shell, str(workdir), tun_mode, *argv]

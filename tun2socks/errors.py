"""The errors a user can act on: one line each, printed as ``tun2socks: error: ...``.

Every error that ends a command with a message for the user (not a traceback) derives from
`UserError`, so the command line has one handler for them (``cli.main``). Each keeps its name
and module (``tun2socks.config.ConfigError``, ``tun2socks.device.DeviceError``, ...), where it
is raised.
"""

from __future__ import annotations


class UserError(Exception):
    """A failure the user can fix: ``str()`` is one line without secrets; `exit_status` is
    the status the command exits with."""

    exit_status = 1

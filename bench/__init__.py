"""Reproducible benchmark of tun2socks against the socks-danted ceiling: `sudo python3 -m bench`.

The bed (namespaces, danted, HTTP and iperf3 servers) is the integration tests' own
`tests/integration/bed.py`: one bed, one definition. It is put on the import path here, so that
every module of this package (and a unit test importing one) finds it as `bed`.
"""

from __future__ import annotations

import sys
from pathlib import Path

_INTEGRATION = str(Path(__file__).resolve().parent.parent / "tests" / "integration")
if _INTEGRATION not in sys.path:
    sys.path.insert(0, _INTEGRATION)

"""Reproducible benchmark of tun2socks against the socks-danted ceiling: `sudo python3 -m bench`.

The bed (namespaces, danted, HTTP and iperf3 servers) is the integration tests' own
`tests/integration/bed.py` (`from tests.integration import bed`): one bed, one definition. Run
from the repository root, so that `tests` and `tun2socks` are this checkout's.
"""

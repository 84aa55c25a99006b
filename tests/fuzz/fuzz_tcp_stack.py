"""atheris harness: the TCP state machine and the stack's caps, driven by decoded scenarios.

The input decodes into operations (`tests/support/tcp_fuzz_model.py`: client segments, good and
hostile, the layer above's calls, the clock); after each one the model checks its invariants
(no exception, sequence numbers within the window, buffers within their caps, caps held, no
busy timer) and at the end that every flow times out and leaves nothing behind.

Run from the repository root (see README.md):
    PYTHONPATH=.:dns python3 -m tests.fuzz.fuzz_tcp_stack -atheris_runs=200000
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["tun2socks"]):
    from tests.support.tcp_fuzz_model import Scenario, ops_from_bytes


def test_one_input(data: bytes) -> None:
    seed = data[0] if data else 0
    Scenario(seed).run(ops_from_bytes(data[1:]))


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

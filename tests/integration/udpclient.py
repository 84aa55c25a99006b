"""udptool.py's client subcommands as the tests run them: in the bed's client namespace, with
the one JSON object it prints as the answer."""

from __future__ import annotations

import json
import sys
from typing import Any

from tests.integration import bed as bedlib


def udptool(bed: bedlib.Bed, *args: str, timeout: float = 60.0) -> dict[str, Any]:
    proc = bed.run_cli([sys.executable, str(bedlib.UDP_TOOL_SCRIPT), *args], timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"udptool {args[0]}: rc {proc.returncode}: {proc.stderr[-800:]}"
    answer: dict[str, Any] = json.loads(lines[-1])
    return answer

"""atheris harness: the configuration loader (tun2socks/config.py).

Three kinds of input: raw bytes as the YAML file; a document assembled from the real section
and key names with fuzzed values; `--set KEY=VALUE` overrides. Checked: `load_settings` raises
nothing but ConfigError, its message is one line, and it never contains the proxy password
(every input carries one, in a proxy URL, whatever else is wrong with it).

Run from the repository root (see README.md):
    PYTHONPATH=.:dns python3 -m tests.fuzz.fuzz_config -atheris_runs=200000
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import atheris
import yaml

from tests.support.config_cases import model_keys, set_at

with atheris.instrument_imports(include=["tun2socks"]):
    from tun2socks.config import ConfigError, Settings, load_settings

PASSWORD = "pw-Zq8xK2mV"  # appears only inside proxy URLs
URLS = [
    f"socks5://alice:{PASSWORD}@127.0.0.1:1080",
    f"socks5h://alice:{PASSWORD}@[::1]:1080",
    f"socks5://alice:{PASSWORD}@proxy.example:70000",
    f"socks5://alice:{PASSWORD}@",
    f"http://alice:{PASSWORD}@host:1",
    f"socks5://alice:{PASSWORD}%zz@host:1080",
    f"socks5://alice:{PASSWORD}@host:1080/path",
]
os.environ["FUZZ_PROXY_PASSWORD"] = PASSWORD
URLS.append("socks5://bob:${FUZZ_PROXY_PASSWORD}@10.0.0.1:1080")


KEYS = model_keys(Settings, leaves_only=False)
FILE = Path(tempfile.mkdtemp(prefix="fuzz-config-")) / "config.yaml"


def _value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    kind = fdp.ConsumeIntInRange(0, 8 if depth < 2 else 5)
    if kind == 0:
        return fdp.ConsumeInt(4)
    if kind == 1:
        return fdp.ConsumeRegularFloat()
    if kind == 2:
        return fdp.ConsumeBool()
    if kind == 3:
        return None
    if kind in (4, 5):
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 40)).replace(PASSWORD, "")
    if kind == 6:
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if kind == 7:
        return fdp.PickValueInList(URLS)
    return {fdp.ConsumeUnicodeNoSurrogates(8): _value(fdp, depth + 1) for _ in range(2)}


def _document(fdp: atheris.FuzzedDataProvider) -> dict[str, Any]:
    doc: dict[str, Any] = {"proxy": {"url": fdp.PickValueInList(URLS)}}
    for _ in range(fdp.ConsumeIntInRange(0, 8)):
        set_at(doc, fdp.PickValueInList(KEYS), _value(fdp))
    return doc


def _check(path: str | None, overrides: list[str]) -> None:
    try:
        load_settings(path, overrides, {})
    except ConfigError as exc:
        message = str(exc)
        assert PASSWORD not in message, message
        assert "\n" not in message, message


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 2)
    overrides = [f"proxy.url={fdp.PickValueInList(URLS)}"]
    if mode == 0:
        raw = fdp.ConsumeBytes(fdp.remaining_bytes())
        if PASSWORD.encode() in raw:
            return
        FILE.write_bytes(raw)
        _check(str(FILE), overrides)
    elif mode == 1:
        FILE.write_text(yaml.safe_dump(_document(fdp)))
        _check(str(FILE), [])
    else:
        for _ in range(fdp.ConsumeIntInRange(0, 4)):
            key = ".".join(fdp.PickValueInList(KEYS)) if fdp.ConsumeBool() else "x.y"
            text = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 30))
            overrides.append(f"{key}={text.replace(PASSWORD, '')}")
        _check(None, overrides)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

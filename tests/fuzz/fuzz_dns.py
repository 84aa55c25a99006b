"""atheris harness: the DNS forwarder's message handling (dns/message.py, resolver, cache,
fake-IP pool), with dnslib's parser instrumented too, since hostile bytes go through it first.

Each input decodes into up to 24 steps against one resolver (forward or fake-IP mode, tiny
caps): a client query, either raw bytes or a template (dns_cases.QUERY_TEMPLATES) with bytes
changed, cut or extended; an upstream answer to a question asked earlier, from a template
(dns_cases.answer_templates) mutated the same way; or the clock moving on. The checks are
`dns_cases.DnsCheck`'s: no exception, refusals counted and answered as the RFCs say, every
reply packs within the client's limit, cache and pools within their caps.

Run from the repository root (see README.md):
    PYTHONPATH=.:dns python3 -m tests.fuzz.fuzz_dns -atheris_runs=200000
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["tun2socks_dns", "dnslib"]):
    from tests.support import dns_cases

MAX_STEPS = 24


def _mutated(fdp: atheris.FuzzedDataProvider, template: bytes) -> bytes:
    changes = [
        (fdp.ConsumeIntInRange(0, 4095), fdp.ConsumeIntInRange(0, 255))
        for _ in range(fdp.ConsumeIntInRange(0, 4))
    ]
    cut = fdp.ConsumeIntInRange(0, 4095) if fdp.ConsumeBool() else None
    return dns_cases.mutate(template, changes, cut, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 32)))


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    check = dns_cases.DnsCheck(fake=fdp.ConsumeBool())
    templates = dns_cases.QUERY_TEMPLATES
    for _ in range(MAX_STEPS):
        if not fdp.remaining_bytes():
            break
        step = fdp.ConsumeIntInRange(0, 3)
        if step == 0:
            check.query(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 600)))
        elif step == 1:
            template = templates[fdp.ConsumeIntInRange(0, len(templates) - 1)]
            check.query(_mutated(fdp, template))
        elif step == 2 and check.asked:
            query, asked_with = check.asked[fdp.ConsumeIntInRange(0, len(check.asked) - 1)]
            answers = dns_cases.answer_templates(query)
            answer = answers[fdp.ConsumeIntInRange(0, len(answers) - 1)]
            check.answer(query, _mutated(fdp, answer))
            check.query(asked_with)  # again: from the cache, or asked anew
        else:
            check.advance(fdp.ConsumeIntInRange(0, 900) / 10)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

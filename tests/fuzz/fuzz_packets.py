"""atheris harness: the IP, TCP, UDP and ICMP parsers, and the stack's packet input.

Each input is either raw bytes or a template packet (SYN with options, data, UDP, ICMP echo,
IPv6 with an extension header, UDP with bad lengths, first and last fragments) with a few
bytes changed, cut or extended, and optionally its checksums fixed, so that mutations get past
the checksums into the header and option parsers. The checks are `packet_cases.check_packet`.
Or a whole set of fragments, mutated, reordered, duplicated or cut short, into one stack
(`packet_cases.check_fragments`): reassembly and its timer.

Run from the repository root (see README.md):
    PYTHONPATH=.:dns python3 -m tests.fuzz.fuzz_packets -atheris_runs=1000000
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["tun2socks"]):
    from tests.support import packet_cases


def fragments(fdp: atheris.FuzzedDataProvider, trusted: bool) -> None:
    """One set of fragments, bytes changed, pieces dropped, duplicated or swapped."""
    sets = packet_cases.FRAGMENT_SETS
    pieces = [bytearray(p) for p in sets[fdp.ConsumeIntInRange(0, len(sets) - 1)]]
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        if not pieces:
            break
        i = fdp.ConsumeIntInRange(0, len(pieces) - 1)
        j = fdp.ConsumeIntInRange(0, len(pieces) - 1)
        move = fdp.ConsumeIntInRange(0, 3)
        if move == 0:
            pieces[i][fdp.ConsumeIntInRange(0, len(pieces[i]) - 1)] = fdp.ConsumeIntInRange(0, 255)
        elif move == 1:
            del pieces[i]
        elif move == 2:
            pieces.append(bytearray(pieces[i]))
        else:
            pieces[i], pieces[j] = pieces[j], pieces[i]
    packet_cases.check_fragments([bytes(p) for p in pieces], trusted)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    templates = packet_cases.TEMPLATES
    choice = fdp.ConsumeIntInRange(0, len(templates) + 1)
    trusted = fdp.ConsumeBool()
    if choice == len(templates) + 1:
        fragments(fdp, trusted)
        return
    if choice == len(templates):
        packet = bytearray(fdp.ConsumeBytes(fdp.remaining_bytes()))
    else:
        packet = bytearray(templates[choice])
        fix = fdp.ConsumeBool()
        for _ in range(fdp.ConsumeIntInRange(0, 6)):
            packet[fdp.ConsumeIntInRange(0, len(packet) - 1)] = fdp.ConsumeIntInRange(0, 255)
        cut = fdp.ConsumeIntInRange(0, len(packet))
        packet = packet[:cut] + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
        if fix:
            packet_cases.fix_checksums(packet)
    packet_cases.check_packet(bytes(packet), trusted)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

"""The DNS part of the namespace bed (``Bed(..., dns=True)``): a real dnsmasq zone, a DoH server,
a private CA, and helpers to run ``dig`` and read dnsmasq's query log.

dnsmasq serves the zone ``test`` on TARGET_IP / TARGET_IP6 port 53 in the server namespace, where
the client namespace can reach it only through the proxy (its only route there is the TUN), and
on SRV_VETH_IP:53, the one address the client reaches directly (for ``direct://`` upstreams). It
never forwards (``--no-resolv``); names outside the zone are refused. Its query log says which
address each query came from.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOH_SERVER_SCRIPT = HERE / "dohserver.py"

ZONE_NAME = "name.test"
DOH_NAME = "doh.test"
BIG_NAME = "big.test"  # TXT records too big for one 1232-byte UDP answer
TXT_TEXT = "hello from dnsmasq"
BIG_TXT_COUNT = 6
BIG_TXT_LENGTH = 250
CLIENT_RESOLVER = "192.0.2.53"  # the client's resolv.conf: an address that exists nowhere
DOH_PORT = 443


def big_txt(index: int) -> str:
    return f"{index:02d}" + chr(ord("a") + index) * (BIG_TXT_LENGTH - 2)


def dnsmasq_args(
    binary: str, log_file: Path, *, listen: list[str], target_ip: str, target_ip6: str
) -> list[str]:
    args = [
        binary,
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--bind-interfaces",
        "--port=53",
        "--user=root",
        "--pid-file=",
        "--cache-size=0",  # every query is visible in the log
        "--local-ttl=300",  # the zone's TTL (0 by default, which no cache would keep)
        "--log-queries=extra",
        f"--log-facility={log_file}",
        "--local=/test/",  # unknown names in the zone: NXDOMAIN, never forwarded
        # --address, not --host-record: no PTR records, so that danted cannot match its by-name
        # rule (to: .test) to a CONNECT by address through a reverse lookup
        f"--address=/{ZONE_NAME}/{target_ip}",
        f"--address=/{ZONE_NAME}/{target_ip6}",
        f"--address=/{DOH_NAME}/{target_ip}",
        f"--address=/{DOH_NAME}/{target_ip6}",
        f"--txt-record={ZONE_NAME},{TXT_TEXT}",
    ]
    args += [f"--txt-record={BIG_NAME},{big_txt(i)}" for i in range(BIG_TXT_COUNT)]
    args += [f"--listen-address={address}" for address in listen]
    return args


_QUERY_LINE = re.compile(r"query\[(\w+)\] (\S+) from (\S+)")


@dataclass(frozen=True)
class LoggedQuery:
    qtype: str
    name: str
    source: str


def logged_queries(log_text: str) -> list[LoggedQuery]:
    """The queries in dnsmasq's log (``--log-queries``), with the address each came from."""
    return [LoggedQuery(*m.groups()) for m in _QUERY_LINE.finditer(log_text)]


@dataclass(frozen=True)
class Certificates:
    ca_file: Path
    cert_file: Path
    key_file: Path


def make_certificates(directory: Path, *, names: list[str], addresses: list[str]) -> Certificates:
    """A private CA and a server certificate it signed, for ``names`` and ``addresses``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tun2socks test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    certificates = Certificates(
        directory / "ca.pem", directory / "server.pem", directory / "server.key"
    )
    pem = serialization.Encoding.PEM
    certificates.ca_file.write_bytes(ca_cert.public_bytes(pem))
    certificates.cert_file.write_bytes(cert.public_bytes(pem))
    certificates.key_file.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return certificates

"""A two-namespace test bed for tun2socks, used by the integration tests and by `python -m bench`.

    client ns (t2sc-PID)                            server ns (t2ss-PID)
     t2s0 (TUN, created by tun2socks)                lo: 198.19.0.10/32, fd00:c8:1::10/128
       198.18.254.1/24, fd00:c8:fe::1/64                 HTTP server :8080 (dual stack)
       default v4/v6 via the TUN (onlink)                iperf3 -s :5201 (bench only)
       198.18.0.2/32 via veth-cli (the proxy)         danted 198.18.0.2:1080 (no auth)
     veth-cli 198.18.0.1/24, fd00:c8::1/64 <=veth=>  danted 198.18.0.2:1081 (user/pass)
                                                     veth-srv 198.18.0.2/24, fd00:c8::2/64

Neither namespace has a route off the machine and name lookups are pinned to an address inside the
bed, so nothing leaks. The veth pair is created directly inside the namespaces: it never exists in
the host namespace, so concurrent beds cannot clash on interface names.

Everything the bed creates is undone by `down()`, which also runs at interpreter exit and on
SIGTERM/SIGHUP; namespaces and users left by a killed earlier run (its PID is gone) are removed by
the next `up()`.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.integration import dnsbed, helpers_danted
from tests.integration.bedprocs import (
    STOP_TIMEOUT_S,
    BedError,
    StartTun2socks,
    Tun2socks,
    deep_merge,
    delete_namespace,
    delete_user,
    exit_on_signal,
    in_main_thread,
    missing_requirements,
    process_cpu_seconds,
    process_rss_bytes,
    reap_stale_beds,
    run,
    stop_process,
    which,
)

# bedprocs' names that the tests and bench/ use as bed.X (one import for the whole bed)
__all__ = [
    "STOP_TIMEOUT_S",
    "BedError",
    "StartTun2socks",
    "Tun2socks",
    "missing_requirements",
    "process_cpu_seconds",
    "process_rss_bytes",
    "run",
    "stop_process",
    "which",
]

REPO = Path(__file__).resolve().parents[2]

HERE = Path(__file__).resolve().parent
HTTP_SERVER_SCRIPT = HERE / "httpserver.py"
NET_CLIENT_SCRIPT = HERE / "netclient.py"
UDP_TOOL_SCRIPT = HERE / "udptool.py"

CLI_VETH = "veth-cli"
SRV_VETH = "veth-srv"
CLI_VETH_IP = "198.18.0.1"
SRV_VETH_IP = "198.18.0.2"
CLI_VETH_IP6 = "fd00:c8::1"
SRV_VETH_IP6 = "fd00:c8::2"
TARGET_IP = "198.19.0.10"
TARGET_IP6 = "fd00:c8:1::10"
TUN_NAME = "t2s0"
TUN_IP = "198.18.254.1"
TUN_GW = "198.18.254.2"
TUN_IP6 = "fd00:c8:fe::1"
TUN_GW6 = "fd00:c8:fe::2"
TUN_NET = "198.18.254.0/24"
TUN_NET6 = "fd00:c8:fe::/64"
SOCKS_PORT = 1080
SOCKS_AUTH_PORT = 1081
HTTP_PORT = 8080
IPERF_PORT = 5201
UDP_ECHO_PORTS = (7000, 7001)  # udptool.py serve: the first port can also answer from the second
MICROSOCKS_PORT = 1082  # a SOCKS5 server without UDP ASSOCIATE
FAR_PROXY_IP = "198.19.0.20"  # start_far_proxy(): reachable only via the client's default route
FAR_PROXY_PORT = 1083

PASSWORD_ENV = "T2S_TEST_PROXY_PASSWORD"
READY_TIMEOUT_S = 15.0
_NS_SYSCTLS = (
    "net.ipv4.conf.all.rp_filter=0",
    "net.ipv4.conf.default.rp_filter=0",  # inherited by the TUN created later
    "net.core.somaxconn=8192",
    "net.ipv4.tcp_max_syn_backlog=8192",
    "net.ipv4.ip_local_port_range=10000 65000",
    "net.ipv6.conf.all.accept_dad=0",
    "net.ipv6.conf.default.accept_dad=0",
)


def python_command(tree: Path = REPO) -> list[str]:
    """Python with the working tree's packages (or another `tree` holding `tun2socks/` and
    `dns/`) first on its path, never an installed copy; ready to prefix with `ip netns exec` or
    setpriv: `env` passes the source paths through. `-P`: the current directory does not go
    first on the path (`-m` would put it there), so `tree` is what runs wherever we are."""
    pythonpath = f"{tree}:{tree / 'dns'}"
    return ["env", f"PYTHONPATH={pythonpath}", sys.executable, "-P"]


def tun2socks_command(tree: Path = REPO) -> list[str]:
    """The working tree's tun2socks (or that of `tree`: the bench's `--against` revision)."""
    return [*python_command(tree), "-m", "tun2socks"]


def helper_command(module: str) -> list[str]:
    """A helper program of this folder that imports its neighbours or tun2socks, run as a
    module of the `tests` package (`python3 -m tests.integration.MODULE`)."""
    return [*python_command(), "-m", f"tests.integration.{module}"]


class Bed:
    """The namespaces, servers and (on demand) tun2socks processes of one test or bench run."""

    def __init__(
        self, workdir: Path, *, mtu: int = 1500, iperf: bool = False, dns: bool = False
    ) -> None:
        """dns=True: dnsmasq serves a zone in the server namespace (see dnsbed.py), and the
        client namespace's resolv.conf points at dnsbed.CLIENT_RESOLVER, which exists nowhere."""
        global _instances
        suffix = f"-{_instances}" if _instances else ""
        _instances += 1
        self.cli_ns = f"t2sc-{os.getpid()}{suffix}"
        self.srv_ns = f"t2ss-{os.getpid()}{suffix}"
        self.socks_user = f"t2su-{os.getpid()}{suffix}"
        self.socks_password = secrets.token_urlsafe(18)
        self.workdir = workdir
        self.mtu = mtu
        self.iperf = iperf
        self.dns = dns
        self.tun2socks: Tun2socks | None = None
        self._servers: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._created: list[str] = []  # what down() has to undo: "ns:NAME", "etc:NAME", "user"
        self._old_handlers: dict[int, Any] = {}
        self._is_up = False

    # -- commands in the namespaces ---------------------------------------------------------

    def cli_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.cli_ns]

    def run_cli(
        self, args: Sequence[str], *, timeout: float, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        return run([*self.cli_prefix(), *args], timeout=timeout, check=check)

    def run_srv(
        self, args: Sequence[str], *, timeout: float, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", self.srv_ns, *args], timeout=timeout, check=check)

    def netclient(self, args: Sequence[str], *, timeout: float) -> dict[str, Any]:
        """Run tests/integration/netclient.py in the client namespace; its JSON answer."""
        proc = self.run_cli([sys.executable, str(NET_CLIENT_SCRIPT), *args], timeout=timeout)
        try:
            answer: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError) as exc:
            raise BedError(
                f"netclient {args[0]}: rc {proc.returncode}: {proc.stderr[-500:]}"
            ) from exc
        return answer

    # -- lifecycle ----------------------------------------------------------------------------

    def up(self) -> Bed:
        missing = missing_requirements(iperf=self.iperf, dns=self.dns)
        if missing:
            raise BedError("the bed needs: " + ", ".join(missing))
        reap_stale_beds()
        self._install_cleanup()
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._create_network()
            self._create_user()
            self._start_servers()
        except BaseException:
            self.down()
            raise
        self._is_up = True
        return self

    def __enter__(self) -> Bed:
        return self.up()

    def __exit__(self, *exc_info: object) -> None:
        self.down()

    def _ns_sh(self, ns: str, args: Sequence[str]) -> None:
        run(["ip", "-n", ns, *args], timeout=10)

    def _create_network(self) -> None:
        for ns in (self.cli_ns, self.srv_ns):
            run(["ip", "netns", "add", ns], timeout=10)
            self._created.append(f"ns:{ns}")
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            self._created.append(f"etc:{ns}")
            # `ip netns exec` bind-mounts this over /etc/resolv.conf: lookups stay in the bed
            resolver = dnsbed.CLIENT_RESOLVER if self.dns and ns == self.cli_ns else TARGET_IP
            (etc / "resolv.conf").write_text(f"nameserver {resolver}\n")
            self._ns_sh(ns, ["link", "set", "lo", "up"])
            run(["ip", "netns", "exec", ns, "sysctl", "-qw", *_NS_SYSCTLS], timeout=10)
        run(
            [
                *("ip", "link", "add", CLI_VETH, "netns", self.cli_ns, "type", "veth"),
                *("peer", "name", SRV_VETH, "netns", self.srv_ns),
            ],
            timeout=10,
        )
        cli, srv = self.cli_ns, self.srv_ns
        self._ns_sh(cli, ["addr", "add", f"{CLI_VETH_IP}/24", "dev", CLI_VETH])
        self._ns_sh(srv, ["addr", "add", f"{SRV_VETH_IP}/24", "dev", SRV_VETH])
        self._ns_sh(cli, ["-6", "addr", "add", f"{CLI_VETH_IP6}/64", "dev", CLI_VETH, "nodad"])
        self._ns_sh(srv, ["-6", "addr", "add", f"{SRV_VETH_IP6}/64", "dev", SRV_VETH, "nodad"])
        self._ns_sh(cli, ["link", "set", CLI_VETH, "up"])
        self._ns_sh(srv, ["link", "set", SRV_VETH, "up"])
        # the proxy stays reachable via the veth once the default route points into the TUN
        self._ns_sh(cli, ["route", "replace", f"{SRV_VETH_IP}/32", "dev", CLI_VETH])
        self._ns_sh(srv, ["addr", "add", f"{TARGET_IP}/32", "dev", "lo"])
        self._ns_sh(srv, ["-6", "addr", "add", f"{TARGET_IP6}/128", "dev", "lo", "nodad"])
        # return routes to the TUN's prefixes, for traffic sent to the target without the proxy
        self._ns_sh(srv, ["route", "replace", TUN_NET, "via", CLI_VETH_IP, "dev", SRV_VETH])
        self._ns_sh(srv, ["-6", "route", "replace", TUN_NET6, "via", CLI_VETH_IP6, "dev", SRV_VETH])

    def _create_user(self) -> None:
        """A system user for danted's username method (it checks passwd/shadow)."""
        nologin = which("nologin") or "/bin/false"
        run(
            ["useradd", "--system", "--no-create-home", "--shell", nologin, self.socks_user],
            timeout=20,
        )
        self._created.append("user")
        run(["chpasswd"], timeout=20, input=f"{self.socks_user}:{self.socks_password}\n".encode())

    def _danted_config(self, port: int, method: str, log_name: str) -> Path:
        path = self.workdir / f"danted-{port}.conf"
        log_path = self.workdir / log_name
        path.write_text(
            helpers_danted.bed_config(log_path, SRV_VETH_IP, port, method, by_name=self.dns)
        )
        return path

    def _start_server(self, name: str, args: Sequence[str]) -> None:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.srv_ns, *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        self._servers.append((name, proc))

    def _start_servers(self) -> None:
        danted = which("danted") or "danted"
        noauth = self._danted_config(SOCKS_PORT, "none", "danted-noauth.out")
        auth = self._danted_config(SOCKS_AUTH_PORT, "username", "danted-auth.out")
        for name, conf in (("danted-noauth", noauth), ("danted-auth", auth)):
            pid_file = self.workdir / f"{name}.pid"
            self._start_server(name, [danted, "-f", str(conf), "-p", str(pid_file), "-N", "2"])
        http_args = [sys.executable, str(HTTP_SERVER_SCRIPT), "--bind", "::"]
        self._start_server("httpd", [*http_args, "--port", str(HTTP_PORT)])
        ports = {SOCKS_PORT, SOCKS_AUTH_PORT, HTTP_PORT}
        if self.dns:
            self.start_dns_server()
            ports.add(53)
        if self.iperf:
            self._start_server("iperf3", ["iperf3", "-s", "-p", str(IPERF_PORT)])
            ports.add(IPERF_PORT)
        self.wait_listening(ports)

    def start_server(self, name: str, args: Sequence[str], *, tcp_ports: Sequence[int]) -> None:
        """Start one more server in the server namespace (unless it runs); wait for its ports."""
        if not any(n == name and proc.poll() is None for n, proc in self._servers):
            self._start_server(name, args)
            self.wait_listening(tcp_ports, watch=[s for s in self._servers if s[0] == name])

    def wait_listening(
        self,
        ports: Iterable[int],
        udp_ports: Iterable[int] = (),
        watch: Sequence[tuple[str, subprocess.Popen[bytes]]] | None = None,
    ) -> None:
        """Wait until the server namespace listens on the TCP `ports` and the `udp_ports`; fail at
        once when a process of `watch` (by default the bed's own servers) has exited."""
        waiting = {"-Hltn": set(ports), "-Hlun": set(udp_ports)}
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            for name, proc in self._servers if watch is None else watch:
                if proc.poll() is not None:
                    raise BedError(f"{name} exited with {proc.returncode}: {self._log_tail(name)}")
            for flags, left in waiting.items():
                left -= self.listening_ports(flags) if left else set()
            if not any(waiting.values()):
                return
            if time.monotonic() > deadline:
                raise BedError(f"servers not listening on {sorted(set().union(*waiting.values()))}")
            time.sleep(0.1)

    def listening_ports(self, ss_flags: str = "-Hltn") -> set[int]:
        """The ports anything listens on in the server namespace (TCP; "-Hlun": UDP)."""
        listening = self.run_srv(["ss", ss_flags], timeout=10).stdout
        return {int(m) for m in re.findall(r":(\d+)\s", listening)}

    def _log_tail(self, name: str) -> str:
        try:
            return (self.workdir / f"{name}.log").read_text(errors="replace")[-1000:]
        except FileNotFoundError:
            return ""

    def start_optional_servers(
        self, *, udp_echo: bool = False, microsocks: bool = False, iperf: bool = False
    ) -> None:
        """Start the optional servers asked for that are not running yet; wait until they listen.

        udp_echo: udptool.py serve on TARGET_IP / TARGET_IP6, ports UDP_ECHO_PORTS (dual stack);
        microsocks: a SOCKS5 server that refuses UDP ASSOCIATE, on SRV_VETH_IP:MICROSOCKS_PORT;
        iperf: iperf3 -s on IPERF_PORT (TCP control, TCP or UDP data)."""
        running = {name for name, proc in self._servers if proc.poll() is None}
        tcp_ports: set[int] = set()
        udp_ports: set[int] = set()
        if udp_echo and "udp-echo" not in running:
            args = [sys.executable, str(UDP_TOOL_SCRIPT), "serve", *map(str, UDP_ECHO_PORTS)]
            self._start_server("udp-echo", args)
            udp_ports.update(UDP_ECHO_PORTS)
        if microsocks and "microsocks" not in running:
            binary = which("microsocks") or "microsocks"
            args = [binary, "-i", SRV_VETH_IP, "-p", str(MICROSOCKS_PORT)]
            self._start_server("microsocks", args)
            tcp_ports.add(MICROSOCKS_PORT)
        if iperf and "iperf3" not in running:
            self._start_server("iperf3", ["iperf3", "-s", "-p", str(IPERF_PORT)])
            tcp_ports.add(IPERF_PORT)
        if tcp_ports or udp_ports:
            self.wait_listening(tcp_ports, udp_ports)

    # -- DNS (dns=True) ----------------------------------------------------------------------

    @property
    def dns_log_path(self) -> Path:
        return self.workdir / "dnsmasq-queries.log"

    def start_dns_server(self) -> None:
        """dnsmasq in the server namespace (see dnsbed.py); not waited for."""
        listen = [TARGET_IP, TARGET_IP6, SRV_VETH_IP]
        binary = which("dnsmasq") or "dnsmasq"
        args = dnsbed.dnsmasq_args(
            binary, self.dns_log_path, listen=listen, target_ip=TARGET_IP, target_ip6=TARGET_IP6
        )
        self._start_server("dnsmasq", args)

    def dns_server(self) -> subprocess.Popen[bytes]:
        return next(proc for name, proc in self._servers if name == "dnsmasq")

    def dns_log_text(self) -> str:
        try:
            return self.dns_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start_doh_server(self, cert_file: Path, key_file: Path) -> None:
        """dohserver.py on TARGET_IP and TARGET_IP6, port dnsbed.DOH_PORT, answering from
        dnsmasq; waits until it listens."""
        args = [sys.executable, str(dnsbed.DOH_SERVER_SCRIPT), "--cert", str(cert_file)]
        args += ["--key", str(key_file), "--bind", TARGET_IP, "--bind", TARGET_IP6]
        args += ["--port", str(dnsbed.DOH_PORT), "--upstream", f"{TARGET_IP}:53"]
        self.start_server("dohd", args, tcp_ports=[dnsbed.DOH_PORT])

    def doh_log_text(self) -> str:
        return self._log_tail("dohd")

    # -- tun2socks ----------------------------------------------------------------------------

    def proxy_url(self, *, auth: bool = False) -> str:
        if auth:
            # the password reaches tun2socks through the environment, never a file or argv
            return f"socks5://{self.socks_user}:${{{PASSWORD_ENV}}}@{SRV_VETH_IP}:{SOCKS_AUTH_PORT}"
        return f"socks5://{SRV_VETH_IP}:{SOCKS_PORT}"

    def tun2socks_config(
        self, *, auth: bool = False, extra: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        config: dict[str, Any] = {
            "tun": {
                "name": TUN_NAME,
                "addresses": [f"{TUN_IP}/24", f"{TUN_IP6}/64"],
                "mtu": self.mtu,
            },
            "proxy": {"url": self.proxy_url(auth=auth)},
            "log": {"level": "info"},
        }
        return deep_merge(config, extra or {})

    def start_tun2socks(
        self,
        log_path: Path,
        *,
        auth: bool = False,
        password: str | None = None,
        extra: Mapping[str, Any] | None = None,
        ready_timeout: float = READY_TIMEOUT_S,
        routes: bool = True,
        tree: Path = REPO,
    ) -> Tun2socks:
        """Start tun2socks in the client namespace (stopping any previous one), wait for its TUN,
        then route everything but the proxy into it. `password` defaults to the right one.
        With routes=False the bed adds no route: tun2socks sets its own (route.auto), and it is
        ready once it logs that it runs. `tree`: whose code runs (the bench compares two)."""
        self.stop_tun2socks()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        config_path = log_path.with_suffix(".yaml")
        config_path.write_text(yaml.safe_dump(self.tun2socks_config(auth=auth, extra=extra)))
        env = dict(os.environ)
        env[PASSWORD_ENV] = self.socks_password if password is None else password
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [*self.cli_prefix(), *tun2socks_command(tree), "run", "-c", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.tun2socks = Tun2socks(process, config_path, log_path)
        try:
            self._wait_for_tun(self.tun2socks, ready_timeout)
            if routes:
                self._ns_sh(self.cli_ns, ["route", "replace", "default", *_via(TUN_GW)])
                self._ns_sh(self.cli_ns, ["-6", "route", "replace", "default", *_via(TUN_GW6)])
            else:
                self.wait_for_log(self.tun2socks, "tun2socks running", ready_timeout)
        except BaseException:
            self.stop_tun2socks()
            raise
        return self.tun2socks

    def wait_for_log(self, t2s: Tun2socks, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in t2s.log_text():
            if t2s.process.poll() is not None:
                raise BedError(f"tun2socks exited with {t2s.process.returncode}:\n{t2s.log_tail()}")
            if time.monotonic() > deadline:
                raise BedError(f"no {text!r} in the tun2socks log within {timeout} s")
            time.sleep(0.1)

    def set_uplink(self, up: bool) -> None:
        """A default route (v4 and v6) from the client namespace via the server's veth, like
        the gateway of a real LAN; the server namespace forwards nothing beyond itself."""
        for family, gateway in (("-4", SRV_VETH_IP), ("-6", SRV_VETH_IP6)):
            if up:
                self._ns_sh(self.cli_ns, [family, "route", "replace", "default", "via", gateway])
            else:
                run(
                    ["ip", "-n", self.cli_ns, family, "route", "del", "default", "via", gateway],
                    timeout=10,
                    check=False,
                )

    def start_far_proxy(self) -> str:
        """danted on FAR_PROXY_IP:FAR_PROXY_PORT, an address of the server namespace that the
        client reaches only through its default route (see set_uplink); its URL. Its
        connections leave from that address, which the HTTP server's /peer then shows."""
        if not any(name == "far-proxy" and proc.poll() is None for name, proc in self._servers):
            self._ns_sh(self.srv_ns, ["addr", "replace", f"{FAR_PROXY_IP}/32", "dev", "lo"])
            conf = self.workdir / "danted-far.conf"
            log_path = self.workdir / "danted-far.out"
            conf.write_text(helpers_danted.far_proxy_config(log_path, FAR_PROXY_IP, FAR_PROXY_PORT))
            pid_file = str(self.workdir / "danted-far.pid")
            danted = which("danted") or "danted"
            args = [danted, "-f", str(conf), "-p", pid_file, "-N", "1"]
            self.start_server("far-proxy", args, tcp_ports=[FAR_PROXY_PORT])
        return f"socks5://{FAR_PROXY_IP}:{FAR_PROXY_PORT}"

    def _wait_for_tun(self, t2s: Tun2socks, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if t2s.process.poll() is not None:
                raise BedError(
                    f"tun2socks exited with {t2s.process.returncode} before its TUN was ready:\n"
                    + t2s.log_tail()
                )
            if self.tun_ready():
                return
            if time.monotonic() > deadline:
                raise BedError(
                    f"TUN {TUN_NAME} not up with {TUN_IP} within {timeout} s:\n" + t2s.log_tail()
                )
            time.sleep(0.1)

    def tun_exists(self) -> bool:
        proc = run(
            ["ip", "-n", self.cli_ns, "link", "show", "dev", TUN_NAME], timeout=10, check=False
        )
        return proc.returncode == 0

    def tun_ready(self) -> bool:
        proc = run(
            ["ip", "-n", self.cli_ns, "-j", "addr", "show", "dev", TUN_NAME],
            timeout=10,
            check=False,
        )
        if proc.returncode != 0 or not proc.stdout.strip():
            return False
        links = json.loads(proc.stdout)
        return bool(links) and any(
            "UP" in link.get("flags", [])
            and any(a.get("local") == TUN_IP for a in link.get("addr_info", []))
            for link in links
        )

    def stop_tun2socks(self) -> int | None:
        t2s, self.tun2socks = self.tun2socks, None
        return t2s.stop() if t2s is not None else None

    # -- teardown -----------------------------------------------------------------------------

    def _install_cleanup(self) -> None:
        atexit.register(self.down)
        if not in_main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(signum) in (signal.SIG_DFL, None):
                self._old_handlers[signum] = signal.signal(signum, exit_on_signal)

    def down(self) -> None:
        """Undo everything, each step on its own so one failure skips nothing. Idempotent."""
        errors: list[str] = []

        def attempt(what: str, action: Any, *args: Any) -> None:
            try:
                action(*args)
            except Exception as exc:
                errors.append(f"{what}: {exc}")

        attempt("stop tun2socks", self.stop_tun2socks)
        for name, proc in reversed(self._servers):
            attempt(f"stop {name}", stop_process, proc, 3.0)
        self._servers.clear()
        for item in reversed(self._created):
            kind, _, name = item.partition(":")
            if kind == "ns":
                attempt(f"delete namespace {name}", delete_namespace, name)
            elif kind == "etc":
                attempt(f"remove /etc/netns/{name}", shutil.rmtree, Path("/etc/netns") / name, True)
            elif kind == "user":
                attempt(f"delete user {self.socks_user}", delete_user, self.socks_user)
        self._created.clear()
        for signum, handler in self._old_handlers.items():
            if in_main_thread() and signal.getsignal(signum) is exit_on_signal:
                attempt("restore signal handler", signal.signal, signum, handler)
        self._old_handlers.clear()
        atexit.unregister(self.down)
        self._is_up = False
        if errors:
            print("bed cleanup problems:\n  " + "\n  ".join(errors), file=sys.stderr)


_instances = 0


def _via(gateway: str) -> list[str]:
    return ["via", gateway, "dev", TUN_NAME, "onlink"]

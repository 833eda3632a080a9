"""
A multi-host lab on one machine (L{Lab}): one Linux network namespace per
host, each with one address on a private /24, all joined by a bridge, and
the cuts a real network makes (a one-way or full partition between two
hosts, a link down and up).

Layout, for the lab of PID 12345 (names carry the PID, so two labs and the
leftovers of dead ones never clash):

- namespace C{dftx12345-br} holds the bridge C{br0} and the bridge ends of
  every veth pair; deleting it deletes every link of the lab at once;
- namespace C{dftx12345-NAME} per host, its veth end C{eth0} with the host's
  address, and C{lo} up (servers there also listen on their own 127.0.0.1);
- this process's namespace (the root one) is a host too (L{Lab.root}), on
  the veth C{dl12345}: the test process (an NB writer, the harness's HTTP
  checks) reaches every host through the bridge, like any other host.

The subnet is C{10.X.Y.0/24} with X.Y from the PID, moved on while this
namespace already has an address or route in it.  Only addresses inside
that subnet are ever assigned or routed.

Cuts are routes: C{ip route add blackhole B} on host A drops every packet
A sends to B at once (new connections from A fail; established ones go
silent, no FIN or RST): L{Lab.cut} one way, L{Lab.partition} both ways,
L{Lab.link} sets a host's bridge port down or up (a flap).  L{Lab.heal}
removes every cut.

The C{ip} commands take a few milliseconds each and run synchronously
(C{subprocess}): teardown must also work where no reactor runs, from
C{atexit} and from a SIGTERM handler.  L{Lab.close} kills every process in
the lab's namespaces (whoever started it) before deleting them;
L{sweep} deletes the namespaces of labs whose process is gone.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import signal
import subprocess
from typing import Any, Iterable

from dftx.harness.process import Host, find_binary

__all__ = ["Lab", "LabUnavailable", "PREFIX", "ROUTE_PROTO", "check_available", "sweep"]

PREFIX = "dftx"
"""Every lab namespace is named C{dftx<pid>-...}."""
ROUTE_PROTO = "211"
"""The routing protocol number of the blackhole routes a lab adds in this
namespace (the root host's cuts), by which L{sweep} finds those of dead labs."""


class LabUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no iproute2, ...)."""


def _ip(*args: str, check: bool = True) -> str:
    done = subprocess.run([find_binary("ip"), *args], capture_output=True, text=True,
                          timeout=20)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lab_pid(namespace: str) -> int | None:
    head = namespace.split("-", 1)[0]
    if not head.startswith(PREFIX) or not head[len(PREFIX):].isdigit():
        return None
    return int(head[len(PREFIX):])


def _kill_and_delete(namespaces: Iterable[str]) -> None:
    """kill -9 every process in each namespace, then delete it (its links go too)."""
    for ns in namespaces:
        for pid in _ip("netns", "pids", ns, check=False).split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        _ip("netns", "delete", ns, check=False)


def sweep() -> list[str]:
    """
    Delete the namespaces of labs whose process no longer runs (and kill
    what still runs in them), and their cuts in this namespace (blackhole
    routes of L{ROUTE_PROTO} outside every live lab's subnet).
    @return: the namespaces deleted.
    """
    stale = [ns for ns in _namespaces()
             if (pid := _lab_pid(ns)) is not None and pid != os.getpid() and not _pid_alive(pid)]
    _kill_and_delete(stale)
    for pid in {_lab_pid(ns) for ns in stale}:
        _ip("link", "del", f"dl{pid}", check=False)  # now, not when the kernel gets to it
    live = [ipaddress.ip_interface(word).network
            for line in _ip("-4", "-o", "addr", "show").splitlines()
            if (name := line.split()[1]).startswith("dl") and name[2:].isdigit()
            and _pid_alive(int(name[2:])) for word in line.split()[3:4]]
    for line in _ip("route", "show", "type", "blackhole", "proto", ROUTE_PROTO).splitlines():
        words = line.split()  # "blackhole 10.1.2.10 [proto 211]"
        if len(words) < 2 or words[0] != "blackhole":
            continue
        address = ipaddress.ip_network(words[1], strict=False)
        if not any(address.subnet_of(n) for n in live):
            _ip("route", "del", "blackhole", words[1], "proto", ROUTE_PROTO, check=False)
    return stale


def check_available() -> None:
    """@raise LabUnavailable: with a one-line reason, where no lab can be made."""
    if os.geteuid() != 0:
        raise LabUnavailable(f"the partition lab needs root for network namespaces "
                             f"(running as uid {os.geteuid()})")
    try:
        _ip("netns", "list")
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        raise LabUnavailable(f"the partition lab needs iproute2's ip netns: {e}") from None


def _pick_subnet() -> ipaddress.IPv4Network:
    """A /24 of 10/8 from the PID that no route or address here overlaps."""
    used = [ipaddress.ip_network(word, strict=False)
            for line in _ip("-4", "route", "show", "table", "all").splitlines()
            for word in line.split()[:1] if "/" in word or word[:1].isdigit()]
    n = os.getpid() % 65536
    for i in range(65536):
        x = (n + i) % 65536
        net = ipaddress.ip_network(f"10.{x >> 8}.{x & 255}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise LabUnavailable("no free /24 in 10.0.0.0/8")


class Lab:
    """
    The lab of this process (see the module docstring).  L{start} makes the
    bridge and the root host; L{host} adds a host.  The lab is closed (its
    processes killed, its namespaces deleted) by L{close}, at interpreter
    exit and on SIGTERM, whichever comes first.
    """

    def __init__(self) -> None:
        self.tag = f"{PREFIX}{os.getpid()}"
        self.bridge_ns = f"{self.tag}-br"
        self.subnet: ipaddress.IPv4Network | None = None
        self.hosts: dict[str, Host] = {}
        self.root: Host | None = None
        self._ports: dict[str, str] = {}  # host name -> its veth end on the bridge
        self._cuts: set[tuple[str, str]] = set()  # (from host, to address)
        self._down: set[str] = set()
        self._previous_sigterm: Any = None
        self._open = False

    def start(self) -> "Lab":
        """Sweep dead labs' namespaces, make the bridge and the root host.
        @raise LabUnavailable: where namespaces cannot be made."""
        check_available()
        sweep()
        self.subnet = _pick_subnet()
        self._open = True
        atexit.register(self.close)
        self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            _ip("netns", "add", self.bridge_ns)
            self._in(self.bridge_ns, "link", "add", "br0", "type", "bridge")
            self._in(self.bridge_ns, "link", "set", "br0", "up")
            # The root end of its veth lives in this namespace; deleting the
            # bridge namespace deletes its peer, and so the pair.
            self._in(self.bridge_ns, "link", "add", "root", "type", "veth", "peer", "name",
                     f"dl{os.getpid()}", "netns", str(os.getpid()))
            self._attach("root")
            address = self._address(1)
            _ip("addr", "add", f"{address}/24", "dev", f"dl{os.getpid()}")
            _ip("link", "set", f"dl{os.getpid()}", "up")
        except RuntimeError as e:  # root without the rights (a container without CAP_SYS_ADMIN)
            self.close()
            raise LabUnavailable(f"the partition lab cannot make its network: {e}") from None
        self.root = Host("root", self._address(1))
        return self

    def _address(self, n: int) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + n)

    def _in(self, ns: str, *args: str) -> str:
        return _ip("-n", ns, *args)

    def _attach(self, port: str) -> None:
        self._in(self.bridge_ns, "link", "set", port, "master", "br0")
        self._in(self.bridge_ns, "link", "set", port, "up")

    def namespace(self, host: Host) -> str | None:
        """The namespace of C{host}; None for the root host."""
        return None if host is self.root else f"{self.tag}-{host.name}"

    def host(self, name: str) -> Host:
        """Host C{name}, made on first use (its namespace, veth to the bridge
        and address), the same one afterwards (a test after another reuses
        the hosts: what ran there was stopped)."""
        if name in self.hosts:
            return self.hosts[name]
        if name in ("br", "root"):
            raise ValueError(f"{name} is a reserved host name")
        ns = f"{self.tag}-{name}"
        n = len(self.hosts) + 10
        _ip("netns", "add", ns)
        port = f"h{n}"
        self._in(self.bridge_ns, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                 "netns", ns)
        self._attach(port)
        address = self._address(n)
        self._in(ns, "addr", "add", f"{address}/24", "dev", "eth0")
        self._in(ns, "link", "set", "eth0", "up")
        self._in(ns, "link", "set", "lo", "up")
        host = Host(name, address, [find_binary("ip"), "netns", "exec", ns])
        self.hosts[name] = host
        self._ports[name] = port
        return host

    def _route(self, action: str, src: Host, dst: Host) -> None:
        ns = self.namespace(src)
        args = ("route", action, "blackhole", f"{dst.address}/32")
        _ip(*args, "proto", ROUTE_PROTO) if ns is None else self._in(ns, *args)

    def cut(self, src: Host, dst: Host) -> None:
        """One way: C{src} can no longer send to C{dst} (C{dst} still sends
        to C{src}, whose answers are dropped)."""
        if (src.name, dst.address) not in self._cuts:
            self._route("add", src, dst)
            self._cuts.add((src.name, dst.address))

    def partition(self, side: Iterable[Host], other: Iterable[Host]) -> None:
        """Both ways between every host of C{side} and every host of C{other}."""
        other = list(other)
        for a in side:
            for b in other:
                self.cut(a, b)
                self.cut(b, a)

    def link(self, host: Host, up: bool) -> None:
        """Set C{host}'s bridge port up or down (its own end sees no carrier)."""
        self._in(self.bridge_ns, "link", "set", self._ports[host.name], "up" if up else "down")
        (self._down.discard if up else self._down.add)(host.name)

    def heal(self) -> None:
        """Remove every cut and set every link up."""
        by_name = {**self.hosts, "root": self.root}
        for name, address in sorted(self._cuts):
            self._route("del", by_name[name], Host("", address))
        self._cuts.clear()
        for name in list(self._down):
            self.link(self.hosts[name], True)

    @property
    def cuts(self) -> set[tuple[str, str]]:
        """The cuts in place, as (from host, to address)."""
        return set(self._cuts)

    def close(self) -> None:
        """Kill every process in the lab's namespaces and delete them (and
        with them every link); remove the root host's cuts.  Idempotent."""
        if not self._open:
            return
        self._open = False
        for name, address in self._cuts:
            if name == "root":
                _ip("route", "del", "blackhole", f"{address}/32", "proto", ROUTE_PROTO,
                    check=False)
        self._cuts.clear()
        _kill_and_delete([self.namespace(h) for h in self.hosts.values()])
        _kill_and_delete([self.bridge_ns])
        # The kernel destroys a deleted namespace's links in the background:
        # the root end goes now, so its route does not outlive the lab.
        _ip("link", "del", f"dl{os.getpid()}", check=False)
        self.hosts.clear()
        atexit.unregister(self.close)
        if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            signal.signal(signal.SIGTERM, self._previous_sigterm or signal.SIG_DFL)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        previous = self._previous_sigterm
        self.close()
        if callable(previous):
            previous(signum, frame)
        else:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

"""
ZeroMQ CURVE for the ZeroMQ driver: key files, and the ZAP handler that
decides which clients may connect.

Every service has one key pair (C{[df] zmq_curve_secret_key_file}): its
PUB socket is the CURVE I{server} with it, and its SUB socket the CURVE
I{client} with the same pair.  A CURVE server only accepts a client whose
public key its ZAP handler allows (C{[df] zmq_curve_allowed_keys}); a
client only talks to a server whose public key it was given before
connecting (the key in the publisher's row of table C{publisher}, checked
against C{[df] zmq_curve_server_keys} when that is set).

Key files are those of C{zmq.auth.create_certificates} (and czmq's
C{zcert}): lines C{public-key = "<z85>"} and, in the secret file,
C{secret-key = "<z85>"}.  A file holding only a z85 key on a line of its
own is read too.  A directory of public keys means every C{*.key} file in
it (the C{*.key_secret} files next to them are never read as public keys).

The ZAP handler (RFC 27) is a ROUTER socket bound at
C{inproc://zeromq.zap.01} in a reactor's ZeroMQ context
(L{dftx.pubsub.zmq_socket.context}), read on the reactor like every other
socket (pyzmq's C{ThreadAuthenticator} would need a thread).  One handler
serves every CURVE server socket of that context: each socket has its own
ZAP domain, registered with its allowed keys.
A request for an unknown domain, a mechanism other than CURVE or a key not
allowed is answered 400; an allowed key 200.  The server sockets also set
C{ZMQ_ZAP_ENFORCE_DOMAIN}, so that a missing handler refuses everybody
instead of accepting everybody.

Secret keys are held in objects whose C{repr} leaves them out, and no error
message or log line here quotes the content of a secret key file.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import zmq
from twisted.logger import Logger
from zmq.utils import z85

from dftx.pubsub.zmq_socket import ZmqContext, ZmqSocket, context

__all__ = [
    "CurveSettings", "KeyPair", "ZapHandler", "apply_client", "apply_server",
    "load_key_pair", "load_public_keys", "write_key_pair", "zap_handler",
]

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_VERSION = b"1.0"
KEY_LENGTH = 40
"""Characters of a z85-encoded CURVE key (32 bytes)."""
DENIED_LOGGED = 1000
"""Distinct refused keys logged per domain (then only counted)."""

log = Logger()


def _key(text: bytes | str, what: str) -> bytes:
    """A z85 key as bytes; ValueError (without the key) when it is not one."""
    raw = text.encode("ascii", "replace") if isinstance(text, str) else text
    if len(raw) != KEY_LENGTH:
        raise ValueError(f"{what} is not a z85 CURVE key ({len(raw)} characters, not 40)")
    try:
        decoded = z85.decode(raw)
    except Exception:
        decoded = b""
    if len(decoded) != 32:
        raise ValueError(f"{what} is not a z85 CURVE key")
    return raw


def _read_keys(path: str) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """(public keys, secret keys, bare keys) in one key file; ValueError
    naming the file (never quoting a secret key) otherwise."""
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read key file {path!r}: {e.strerror or e}") from None
    public: list[bytes] = []
    secret: list[bytes] = []
    bare: list[bytes] = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if len(line) == KEY_LENGTH and _is_key(line):
            # A bare key (z85 has "#" and "=" too): its kind is told by the caller.
            bare.append(line)
            continue
        if not line or line.startswith(b"#"):
            continue
        name, sep, value = line.partition(b"=")
        name = name.strip()
        if sep and name in (b"public-key", b"secret-key"):
            found = public if name == b"public-key" else secret
            what = f"{path!r} line {number} ({name.decode()})"
            found.append(_key(value.strip(b" \t'\""), what))
    return public, secret, bare


def _is_key(text: bytes) -> bool:
    try:
        _key(text, "")
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair (z85); C{repr} never shows the secret key."""

    public: bytes
    secret: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"KeyPair(public={self.public.decode()!r}, secret=<hidden>)"


def load_key_pair(path: str) -> KeyPair:
    """
    The key pair of a secret key file (C{zmq.auth} format, or a file with
    only the z85 secret key).  When the file also has the public key, it
    must match the secret one.

    @raise ValueError: naming the file, not quoting any key.
    """
    public, secret, bare = _read_keys(path)
    if not secret and not public:
        secret = bare  # a bare key: in a secret key file, the secret one
    if len(secret) != 1:
        raise ValueError(f"{path!r} has no CURVE secret key (secret-key = \"...\")"
                         if not secret else f"{path!r} has {len(secret)} secret keys, not 1")
    derived = zmq.curve_public(secret[0])
    if public and public[0] != derived:
        raise ValueError(f"{path!r}: its public-key does not belong to its secret-key")
    return KeyPair(derived, secret[0])


def load_public_keys(path: str) -> frozenset[bytes]:
    """
    The public keys of a file (one or more C{public-key} lines or bare z85
    keys) or of a directory (every C{*.key} file in it).  A file's
    C{secret-key} lines are never taken as public keys.

    @raise ValueError: naming the file or directory, when nothing can be
        read or a key is malformed or there is no key at all.
    """
    if os.path.isdir(path):
        files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".key"))
    else:
        files = [path]
    keys: set[bytes] = set()
    for name in files:
        public, _, bare = _read_keys(name)
        keys.update(public + bare)
    if not keys:
        where = "no *.key file with a public key in directory" if os.path.isdir(path) else \
            "no public key in"
        raise ValueError(f"{where} {path!r}")
    return frozenset(keys)


def write_key_pair(directory: str, name: str) -> tuple[str, str]:
    """
    A new key pair as C{DIR/NAME.key} (public, mode 0644) and
    C{DIR/NAME.key_secret} (mode 0600), in C{zmq.auth}'s format.

    @return: (public file, secret file).
    @raise FileExistsError: when either exists (never overwritten).
    """
    public, secret = zmq.curve_keypair()
    os.makedirs(directory, exist_ok=True)
    public_file = os.path.join(directory, f"{name}.key")
    secret_file = os.path.join(directory, f"{name}.key_secret")
    for existing in (public_file, secret_file):
        if os.path.exists(existing):
            raise FileExistsError(f"{existing} exists (not overwritten)")
    body = f'metadata\n    name = "{name}"\ncurve\n    public-key = "{public.decode()}"\n'
    fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("#   ZeroMQ CURVE **Secret** Certificate (dftx curve-keygen)\n"
                "#   Keep it private: whoever has it can pose as this service.\n"
                + body + f'    secret-key = "{secret.decode()}"\n')
    fd = os.open(public_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write("#   ZeroMQ CURVE Public Certificate (dftx curve-keygen)\n" + body)
    return public_file, secret_file


@dataclass(frozen=True)
class CurveSettings:
    """
    What the ZeroMQ driver needs for CURVE: this service's key pair, the
    client keys its publishers accept, and (optionally) the only server
    keys its subscribers accept (None: whatever key the caller gives, i.e.
    the publisher's registry row).
    """

    keys: KeyPair
    allowed: frozenset[bytes]
    servers: frozenset[bytes] | None = None

    @classmethod
    def from_config(cls, config: Any) -> CurveSettings | None:
        """From [df] (None when C{zmq_curve} is off).  The files were
        checked when the configuration was loaded; a file changed since
        raises ValueError naming it."""
        df = config.df
        if not df.zmq_curve:
            return None
        servers = load_public_keys(df.zmq_curve_server_keys) \
            if df.zmq_curve_server_keys else None
        return cls(load_key_pair(df.zmq_curve_secret_key_file),
                   load_public_keys(df.zmq_curve_allowed_keys), servers)

    def trusted_server_key(self, server_key: str | bytes | None) -> bytes:
        """
        The publisher's server key a subscriber may connect with: C{server_key}
        (z85) when it is one of L{servers} (or L{servers} is None); the one
        key of L{servers} when C{server_key} is None.

        @raise ValueError: when the key is missing, malformed or untrusted.
        """
        if server_key is None:
            if self.servers is not None and len(self.servers) == 1:
                return next(iter(self.servers))
            raise ValueError("CURVE is on and the publisher's server key is unknown")
        key = _key(server_key, "the publisher's server key")
        if self.servers is not None and key not in self.servers:
            raise ValueError(f"server key {key.decode()} is not in zmq_curve_server_keys")
        return key


def apply_server(socket: zmq.Socket, keys: KeyPair, domain: str) -> None:
    """Make C{socket} a CURVE server with C{keys} in ZAP domain C{domain}
    (before it binds)."""
    socket.set(zmq.CURVE_SERVER, 1)
    socket.set(zmq.CURVE_SECRETKEY, keys.secret)
    socket.set(zmq.ZAP_DOMAIN, domain.encode())
    try:
        socket.set(zmq.ZAP_ENFORCE_DOMAIN, 1)
    except (AttributeError, zmq.ZMQError):  # libzmq without it: the handler is bound first
        pass


def apply_client(socket: zmq.Socket, keys: KeyPair) -> None:
    """Give C{socket} the client key pair (the server key is set per connect)."""
    socket.set(zmq.CURVE_PUBLICKEY, keys.public)
    socket.set(zmq.CURVE_SECRETKEY, keys.secret)


class ZapHandler:
    """
    The ZAP handler of a reactor's ZeroMQ context (see the module
    docstring); get it with L{zap_handler}.  C{counters[domain]} counts
    C{allowed} and C{denied} requests per domain.
    """

    def __init__(self, reactor: Any = None) -> None:
        self.domains: dict[str, frozenset[bytes]] = {}
        self.counters: dict[str, Counter[str]] = {}
        self._denied_logged: dict[str, set[bytes]] = {}
        self._names = itertools.count(1)
        self.socket = ZmqSocket(zmq.ROUTER, "ZAP handler", on_message=self._request,
                                reactor=reactor)
        self.socket.bind(ZAP_ENDPOINT)
        self.socket._wake()  # the fd is edge-triggered: look once anyway

    def register(self, allowed: Iterable[bytes], name: str = "dftx") -> str:
        """
        A new domain whose clients are those with a public key (z85) in
        C{allowed}.  @return: the domain, for L{apply_server}.
        """
        domain = f"{name}-{next(self._names)}"
        self.domains[domain] = frozenset(allowed)
        self.counters[domain] = Counter()
        self._denied_logged[domain] = set()
        return domain

    def unregister(self, domain: str) -> None:
        """Forget C{domain}: its later requests are refused."""
        self.domains.pop(domain, None)
        self._denied_logged.pop(domain, None)

    def _request(self, frames: list[bytes]) -> None:
        # ROUTER: [peer routing id, b"", version, request_id, domain,
        # address, identity, mechanism, credentials...]
        if len(frames) < 3 or frames[1] != b"":
            return  # no envelope to answer to
        peer, request = frames[0], frames[2:]
        if len(request) < 6:
            self._reply(peer, request[1] if len(request) > 1 else b"", b"400",
                        b"malformed ZAP request")
            return
        version, request_id, domain_b, address_b, _identity, mechanism = request[:6]
        credentials = request[6:]
        if version != ZAP_VERSION:
            self._reply(peer, request_id, b"400", b"unsupported ZAP version")
            return
        domain = domain_b.decode("utf-8", "replace")
        address = address_b.decode("utf-8", "replace")
        allowed = self.domains.get(domain)
        key = z85.encode(credentials[0]) if mechanism == b"CURVE" and credentials \
            and len(credentials[0]) == 32 else None
        if allowed is not None and key is not None and key in allowed:
            self.counters[domain]["allowed"] += 1
            self._reply(peer, request_id, b"200", b"OK", key)
            return
        if allowed is None:
            reason = b"unknown ZAP domain"
        elif key is None:
            reason = b"CURVE required"
        else:
            reason = b"client key not allowed"
        counters = self.counters.get(domain)
        if counters is not None:
            counters["denied"] += 1
        logged = self._denied_logged.get(domain)
        mark = key or mechanism
        if logged is not None and mark not in logged and len(logged) < DENIED_LOGGED:
            logged.add(mark)
            log.warn("ZeroMQ CURVE: refused {address} (client key {key}) in {domain}: {reason}",
                     address=address, key=(key or b"none").decode(), domain=domain,
                     reason=reason.decode())
        self._reply(peer, request_id, b"400", reason)

    def _reply(self, peer: bytes, request_id: bytes, code: bytes, text: bytes,
               user: bytes = b"") -> None:
        self.socket.send_frames([peer, b"", ZAP_VERSION, request_id, code, text, user, b""]) \
            .addErrback(lambda f: log.failure("ZAP reply failed", f))


_handlers: dict[ZmqContext, ZapHandler] = {}


def zap_handler(reactor: Any = None) -> ZapHandler:
    """The one ZAP handler of C{reactor}'s ZeroMQ context (default: the
    global reactor's), bound on first use; it stays bound until that
    context is terminated (at the reactor's shutdown)."""
    ctx = context(reactor)
    handler = _handlers.get(ctx)
    if handler is None or handler.socket.socket is None:
        for stale in [c for c, h in _handlers.items() if h.socket.socket is None]:
            del _handlers[stale]
        handler = _handlers[ctx] = ZapHandler(ctx.reactor)
    return handler

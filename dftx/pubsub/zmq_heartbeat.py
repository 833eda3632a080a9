"""
ZeroMQ heartbeats (ZMTP 3.1 PING/PONG) on a connection-oriented socket:
L{Heartbeat} and L{apply}.

TCP alone does not see a silent cut (no FIN, no RST: a route gone, a host
powered off): a SUB socket would wait for messages that never come, and a
PUB socket would keep queueing for a peer that is gone.  With heartbeats,
each side sends a PING every C{interval} seconds and closes a connection on
which nothing (a message, a PING or a PONG) arrived for C{timeout} seconds;
the C{ttl} sent with each PING tells the peer to do the same.  A closed
connection is an ordinary disconnection: ZeroMQ reconnects, and the
subscriber resyncs once it is back (L{dftx.pubsub.zmq_subscriber}).  A cut
is therefore noticed within C{interval + timeout} seconds of the last
traffic; see doc/reliability.md for the measured bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import zmq

__all__ = ["DEFAULT_HEARTBEAT", "Heartbeat", "apply"]


@dataclass(frozen=True)
class Heartbeat:
    """PING every C{interval} seconds; a connection silent for C{timeout}
    seconds is closed (by both sides: it is also the PING's TTL)."""

    interval: float
    timeout: float

    def __post_init__(self) -> None:
        if not 0 < self.interval <= self.timeout:
            raise ValueError(f"heartbeat interval {self.interval} s must be positive and "
                             f"at most the timeout {self.timeout} s")


DEFAULT_HEARTBEAT = Heartbeat(2.0, 6.0)
"""What the services use unless configured ([df] zmq_heartbeat_interval,
zmq_heartbeat_timeout): a silent cut is noticed within 8 s."""


def apply(socket: zmq.Socket, heartbeat: Heartbeat | None) -> None:
    """Set C{socket}'s heartbeat options (before it connects or binds);
    None leaves them off."""
    if heartbeat is None:
        return
    socket.set(zmq.HEARTBEAT_IVL, int(heartbeat.interval * 1000))
    socket.set(zmq.HEARTBEAT_TIMEOUT, int(heartbeat.timeout * 1000))
    # Sent in deciseconds, at most 6553.5 s.
    socket.set(zmq.HEARTBEAT_TTL, min(int(heartbeat.timeout * 1000), 6_553_500))

"""
Publish/subscribe: the API (L{dftx.pubsub.api}), the drivers
(L{dftx.pubsub.zmq}, L{dftx.pubsub.redis}); publisher registration, which
depends on the NB database, is L{dftx.registry}.
"""

from __future__ import annotations

from typing import Any

__all__ = ["from_config", "needs_discovery"]


def from_config(config: Any, bind: str | None = None, reactor: Any = None) -> Any:
    """
    The pub/sub manager that [df] pub_sub_driver names: C{zmq} gives a
    L{dftx.pubsub.zmq.ZmqPubSub} whose publishers bind C{bind} (None: it
    makes subscribers only), with the [df] CURVE settings; C{redis} and
    C{redis_sharded} give a L{dftx.pubsub.redis.RedisPubSub} on [df]
    remote_db_hosts ([df_redis] settings), for which C{bind} means nothing.
    Its sockets, connections and timers run on C{reactor} (None: the global
    reactor).
    """
    if config.df.pub_sub_driver == "zmq":
        from dftx.pubsub.zmq import ZmqPubSub

        return ZmqPubSub.from_config(config, bind=bind, reactor=reactor)
    from dftx.pubsub.redis import RedisPubSub

    return RedisPubSub.from_config(config, reactor=reactor)


def needs_discovery(config: Any) -> bool:
    """Whether subscribers find publishers through table C{publisher}
    (brokerless ZeroMQ) rather than through the broker."""
    return config.df.pub_sub_driver == "zmq"

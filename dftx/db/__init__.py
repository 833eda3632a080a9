"""
The NB database: the driver contract (L{dftx.db.api}) and its drivers,
Redis Cluster (L{dftx.db.redis}) and in-process memory (L{dftx.db.memory}).
"""

from __future__ import annotations

from typing import Any

__all__ = ["from_config"]


def from_config(config: Any, reactor: Any = None) -> Any:
    """
    The NB database driver a L{dftx.config.Config} names ([df]
    nb_db_driver): a L{dftx.db.memory.MemoryDbDriver} or a
    L{dftx.db.redis.RedisDbDriver} on [df] remote_db_hosts with the
    [df_redis] settings, its connections and timers on C{reactor} (None:
    the global reactor); not yet initialized.
    """
    if config.df.nb_db_driver == "memory":
        from dftx.db.memory import MemoryDbDriver

        return MemoryDbDriver()
    from dftx.db.redis import RedisDbDriver

    return RedisDbDriver.from_config(config, reactor=reactor)

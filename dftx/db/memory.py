"""
An NB database held in this process's memory: the full L{INbDbDriver}
contract, for a single process (tests, the sandbox's memory mode, embedding
applications that need no shared database).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Iterable

from zope.interface import implementer

from dftx.db.api import INbDbDriver, check_names, check_value
from dftx.deferreds import deferred
from dftx.errors import DBKeyAmbiguous, DBKeyNotFound

__all__ = ["MemoryDbDriver"]

# table -> key -> topic (None: no topic) -> value
_Rows = dict[str, dict[str, dict[str | None, str]]]


@implementer(INbDbDriver)
class MemoryDbDriver:
    """
    The L{INbDbDriver} contract over dicts.  Its constructor takes no
    arguments; L{initialize} is accepted for symmetry with server drivers.
    Every method runs at once: its Deferred has fired (or failed) when it
    returns.
    """

    def __init__(self) -> None:
        self._tables: _Rows = {}
        self._counters: defaultdict[str, int] = defaultdict(int)
        self._versions: Counter[tuple[str, str | None]] = Counter()

    @deferred
    async def initialize(self) -> None:
        pass

    @deferred
    async def close(self) -> None:
        pass

    @deferred
    async def create_key(self, table: str, key: str, value: str, topic: str | None = None) -> None:
        topic = check_names(table, key, topic)
        check_value(value)
        topics = self._tables.setdefault(table, {}).setdefault(key, {})
        self._put(table, topics, topic, value)

    @deferred
    async def get_key(self, table: str, key: str, topic: str | None = None) -> str:
        topics, topic = self._find(table, key, topic)
        return topics[topic]

    @deferred
    async def set_key(self, table: str, key: str, value: str, topic: str | None = None) -> None:
        check_value(value)
        topics, topic = self._find(table, key, topic)
        self._put(table, topics, topic, value)

    @deferred
    async def delete_key(self, table: str, key: str, topic: str | None = None) -> None:
        topics, topic = self._find(table, key, topic)
        del topics[topic]
        self._versions[table, topic] += 1
        if not topics:
            del self._tables[table][key]

    @deferred
    async def get_all_entries(self, table: str, topic: str | None = None) -> list[str]:
        return [value for _, _, value in self._rows(table, topic)]

    @deferred
    async def get_all_keys(self, table: str, topic: str | None = None) -> list[str]:
        return [key for _, key, _ in self._rows(table, topic)]

    @deferred
    async def get_all_rows(self, table: str, topic: str | None = None) -> list[tuple[str | None, str, str]]:
        return self._rows(table, topic)

    @deferred
    async def get_topic_rows(self, table: str, topic: str | None) -> list[tuple[str, str]]:
        topic = check_names(table, topic=topic)
        return [(key, topics[topic]) for key, topics in self._tables.get(table, {}).items()
                if topic in topics]

    @deferred
    async def get_topic_versions(
        self, pairs: Iterable[tuple[str, str | None]]
    ) -> dict[tuple[str, str | None], int]:
        return {(t, p): self._versions[t, check_names(t, topic=p)] for t, p in pairs}

    @deferred
    async def allocate_unique_key(self, table: str) -> int:
        check_names(table)
        self._counters[table] += 1
        return self._counters[table]

    @deferred
    async def create_table(self, table: str) -> None:
        check_names(table)
        self._tables.setdefault(table, {})

    @deferred
    async def delete_table(self, table: str) -> None:
        check_names(table)
        for topics in self._tables.pop(table, {}).values():
            self._versions.update((table, topic) for topic in topics)

    def _put(self, table: str, topics: dict[str | None, str], topic: str | None,
             value: str) -> None:
        """Store a row's value; its topic's version moves if it changed."""
        if topics.get(topic) != value:
            topics[topic] = value
            self._versions[table, topic] += 1

    def _find(
        self, table: str, key: str, topic: str | None
    ) -> tuple[dict[str | None, str], str | None]:
        """
        The topic->value dict of C{key} and the topic the row is under.
        """
        topic = check_names(table, key, topic)
        topics = self._tables.get(table, {}).get(key, {})
        if topic is not None:
            if topic not in topics:
                raise DBKeyNotFound(table, key, topic)
            return topics, topic
        if not topics:
            raise DBKeyNotFound(table, key)
        if len(topics) > 1:
            raise DBKeyAmbiguous(table, key, topics)
        return topics, next(iter(topics))

    def _rows(self, table: str, topic: str | None) -> list[tuple[str | None, str, str]]:
        topic = check_names(table, topic=topic)
        return [
            (t, key, value)
            for key, topics in self._tables.get(table, {}).items()
            for t, value in topics.items()
            if topic is None or t == topic
        ]

"""
The northbound database driver interface and its semantics.

A driver stores rows: a I{table} holds string I{values} by string I{key},
each row optionally under a I{topic} (the tenant whose subscribers get its
updates).  A key may exist under several topics of one table; a lookup that
gives no topic then finds it only when exactly one row has that key.

Every method returns a Deferred.  The errors a caller must expect are
L{dftx.errors.DBKeyNotFound}, L{dftx.errors.DBKeyAmbiguous},
L{dftx.errors.InvalidNameError} and, for drivers that talk to a server,
L{dftx.errors.DBConnectionError} (and its subclass
L{dftx.errors.ClusterDownError}).
"""

from __future__ import annotations

from zope.interface import Interface

from dftx.errors import InvalidNameError

__all__ = ["INbDbDriver", "check_names", "check_table", "check_topic", "check_value"]

# Characters a table name cannot hold: "." separates table from topic in
# the stored key, braces delimit the Redis Cluster hash tag.
_TABLE_RESERVED = frozenset(".{}")
_TOPIC_RESERVED = frozenset("{}")


def check_names(table: str, key: str | None = None, topic: str | None = None) -> str | None:
    """
    Check a table name, and a key and topic when given, against what every
    driver can store; return the topic normalised (C{""} means no topic).

    @raise InvalidNameError: for an empty or non-text name, a table with
        C{.}, C{{} or C{}}, or a topic with a brace.
    """
    check_table(table)
    if key is not None:
        _check_text("key", key, frozenset())
    if not topic:
        return None
    check_topic(topic)
    return topic


def check_table(table: str) -> None:
    """@raise InvalidNameError: for an empty or non-text table name, or one
    with C{.}, C{{} or C{}}."""
    _check_text("table", table, _TABLE_RESERVED)


def check_topic(topic: str) -> None:
    """@raise InvalidNameError: for an empty or non-text topic, or one with a
    brace."""
    _check_text("topic", topic, _TOPIC_RESERVED)


def check_value(value: str) -> None:
    """
    @raise TypeError: when C{value} is not text; values are stored as
        strings (JSON text, by Dragonflow's convention).
    """
    if not isinstance(value, str):
        raise TypeError(f"value must be str, not {type(value).__name__}")


def _check_text(kind: str, name: object, reserved: frozenset[str]) -> None:
    if not isinstance(name, str) or not name:
        raise InvalidNameError(kind, name, "must be a non-empty string")
    bad = reserved.intersection(name)
    if bad:
        raise InvalidNameError(kind, name, f"must not contain {''.join(sorted(bad))!r}")


class INbDbDriver(Interface):
    """
    A northbound database.  All methods return Deferreds.
    """

    def initialize():
        """
        Connect (for a server, learn its topology).

        @return: Deferred firing with None once the driver can serve requests.
        """

    def create_key(table, key, value, topic=None):
        """
        Store C{value} at C{key} of C{table} under C{topic} (None: no topic),
        creating the row or overwriting it.

        @return: Deferred firing with None once the write is acknowledged.
        """

    def get_key(table, key, topic=None):
        """
        @return: Deferred firing with the value (str).  Without C{topic}, the
            row is found under whichever topic holds it.  Errbacks with
            DBKeyNotFound when there is no such row, DBKeyAmbiguous when
            C{topic} is None and two topics hold the key.
        """

    def set_key(table, key, value, topic=None):
        """
        Overwrite an existing row; never creates one.

        @return: Deferred firing with None; errbacks as L{get_key} does.
        """

    def delete_key(table, key, topic=None):
        """
        Remove an existing row.

        @return: Deferred firing with None; errbacks as L{get_key} does.
        """

    def get_all_entries(table, topic=None):
        """
        @return: Deferred firing with a list of the values of C{table}
            (under C{topic} only, when given; of every topic otherwise), in no
            particular order; C{[]} for a missing table.
        """

    def get_all_keys(table, topic=None):
        """
        @return: Deferred firing with a list of the keys of C{table}, one per
            row (a key stored under two topics appears twice when C{topic}
            is None); C{[]} for a missing table.
        """

    def get_all_rows(table, topic=None):
        """
        Every row with its key and topic, for a caller that mirrors the
        table (the local controller's cache).

        @return: Deferred firing with a list of C{(topic, key, value)}
            tuples (topic None for a row without topic) of C{table} (under
            C{topic} only, when given), in no particular order; C{[]} for a
            missing table.
        """

    def get_topic_rows(table, topic):
        """
        The rows of exactly one topic: C{topic} None (or C{""}) means the
        rows without topic, not every topic as for L{get_all_rows}.  For a
        mirror that keeps some topics of a table: on Redis it costs what it
        returns, however large the database.

        @return: Deferred firing with a list of C{(key, value)} tuples, in
            no particular order; C{[]} when there are none.
        """

    def get_topic_versions(pairs):
        """
        A cheap check of which topics changed, for a periodic resync that
        reads only those: the version of each C{(table, topic)} pair of
        C{pairs} (topic None or C{""}: the rows without topic).  A pair's
        version changes with every write through a driver of this kind
        that changes one of its rows (create, set, delete, delete_table,
        an undo), and only then; writes by other clients of the database
        (Dragonflow's own driver) do not change it.  Read it before the
        rows it vouches for: rows read after it are at least that recent.

        @return: Deferred firing with a dict from each pair (as given) to
            an int; 0 for a pair never written.
        """

    def allocate_unique_key(table):
        """
        @return: Deferred firing with an int that no other call for C{table},
            from any client of the same database, has returned or will
            return; the first is 1.
        """

    def create_table(table):
        """
        Make C{table} exist (tables also come into being with their first row).

        @return: Deferred firing with None.
        """

    def delete_table(table):
        """
        Remove every row of C{table}, under every topic.

        @return: Deferred firing with None.
        """

    def close():
        """
        Release connections; the driver serves no more requests.

        @return: Deferred firing with None.
        """

"""
The NB DB driver contract (dftx.db.api, DESIGN.md), as tests any driver runs.

Subclass L{DbDriverContract} in a test module and give it a C{driver}
fixture that yields an initialized driver.  Every test works in tables of its
own (the C{unique} fixture), so drivers backed by a shared server need no
cleanup between tests.
"""

from __future__ import annotations

import inspect

import pytest
import pytest_twisted
from twisted.internet import defer
from zope.interface.verify import verifyObject

from dftx.db.api import INbDbDriver
from dftx.errors import DBKeyAmbiguous, DBKeyNotFound, InvalidNameError

aio = pytest_twisted.ensureDeferred


async def _raises(exc_type, d):
    with pytest.raises(exc_type) as info:
        await d
    return info.value


class DbDriverContract:
    """Tests of the INbDbDriver contract; needs a C{driver} fixture."""

    def test_provides_interface(self, driver):
        assert verifyObject(INbDbDriver, driver)

    def test_signatures_match_the_interface(self, driver):
        # verifyObject reads a decorated method's own (*args, **kwargs);
        # inspect follows __wrapped__ to the signature the caller meets.
        for name in INbDbDriver.names():
            info = INbDbDriver[name].getSignatureInfo()
            params = inspect.signature(getattr(driver, name)).parameters
            assert list(params) == list(info["positional"]), name
            defaults = {p: v.default for p, v in params.items() if v.default is not v.empty}
            assert defaults == info["optional"], name

    @aio
    async def test_create_get_set_delete(self, driver, unique):
        await driver.create_key(unique, "k1", "v1")
        assert await driver.get_key(unique, "k1") == "v1"
        await driver.set_key(unique, "k1", "v2")
        assert await driver.get_key(unique, "k1") == "v2"
        await driver.delete_key(unique, "k1")
        await _raises(DBKeyNotFound, driver.get_key(unique, "k1"))

    @aio
    async def test_create_overwrites(self, driver, unique):
        await driver.create_key(unique, "k", "a", topic="t")
        await driver.create_key(unique, "k", "b", topic="t")
        assert await driver.get_key(unique, "k", topic="t") == "b"
        assert await driver.get_all_entries(unique) == ["b"]

    @aio
    async def test_missing_key_errors_name_table_and_key(self, driver, unique):
        await driver.create_key(unique, "other", "x")
        for d in (
            driver.get_key(unique, "nope"),
            driver.set_key(unique, "nope", "v"),
            driver.delete_key(unique, "nope"),
        ):
            err = await _raises(DBKeyNotFound, d)
            assert (err.table, err.key) == (unique, "nope")
            assert unique in str(err) and "nope" in str(err)

    @aio
    async def test_missing_key_under_topic(self, driver, unique):
        await driver.create_key(unique, "k", "v", topic="t1")
        err = await _raises(DBKeyNotFound, driver.get_key(unique, "k", topic="t2"))
        assert err.topic == "t2"
        await _raises(DBKeyNotFound, driver.set_key(unique, "k", "v", topic="t2"))
        await _raises(DBKeyNotFound, driver.delete_key(unique, "k", topic="t2"))
        assert await driver.get_key(unique, "k", topic="t1") == "v"

    @aio
    async def test_set_never_creates(self, driver, unique):
        await _raises(DBKeyNotFound, driver.set_key(unique, "k", "v"))
        await _raises(DBKeyNotFound, driver.set_key(unique, "k", "v", topic="t"))
        assert await driver.get_all_keys(unique) == []
        await _raises(DBKeyNotFound, driver.get_key(unique, "k"))

    @aio
    async def test_missing_table_lists_nothing(self, driver, unique):
        assert await driver.get_all_entries(unique) == []
        assert await driver.get_all_keys(unique) == []
        assert await driver.get_all_entries(unique, topic="t") == []
        assert await driver.get_all_keys(unique, topic="t") == []

    @aio
    async def test_create_table_is_empty_and_delete_table(self, driver, unique):
        await driver.create_table(unique)
        assert await driver.get_all_entries(unique) == []
        await driver.create_key(unique, "a", "1")
        await driver.create_key(unique, "b", "2", topic="t1")
        await driver.create_key(unique, "c", "3", topic="t2")
        await driver.delete_table(unique)
        assert await driver.get_all_keys(unique) == []
        assert await driver.get_all_entries(unique, topic="t1") == []
        await _raises(DBKeyNotFound, driver.get_key(unique, "b", topic="t1"))
        await driver.delete_table(unique)  # deleting a missing table is fine

    @aio
    async def test_topic_filtering(self, driver, unique):
        await driver.create_key(unique, "a", "va", topic="t1")
        await driver.create_key(unique, "b", "vb", topic="t1")
        await driver.create_key(unique, "c", "vc", topic="t2")
        await driver.create_key(unique, "d", "vd")
        assert sorted(await driver.get_all_keys(unique, topic="t1")) == ["a", "b"]
        assert sorted(await driver.get_all_entries(unique, topic="t1")) == ["va", "vb"]
        assert await driver.get_all_keys(unique, topic="t2") == ["c"]
        assert sorted(await driver.get_all_keys(unique)) == ["a", "b", "c", "d"]
        assert sorted(await driver.get_all_entries(unique)) == ["va", "vb", "vc", "vd"]

    @aio
    async def test_get_all_rows_gives_topic_key_value(self, driver, unique):
        assert await driver.get_all_rows(unique) == []
        await driver.create_key(unique, "a", "va", topic="t1")
        await driver.create_key(unique, "a", "va2", topic="t2")
        await driver.create_key(unique, "b", "vb")
        await driver.delete_key(unique, "a", topic="t2")
        await driver.create_key(unique, "ü", "1")
        assert sorted(await driver.get_all_rows(unique), key=str) == [
            ("t1", "a", "va"), (None, "b", "vb"), (None, "ü", "1")]
        assert await driver.get_all_rows(unique, topic="t1") == [("t1", "a", "va")]
        assert await driver.get_all_rows(unique, topic="t2") == []
        many = {f"k{i}": f"v{i}" for i in range(1200)}
        await defer.gatherResults([driver.create_key(unique, k, v, topic="m")
                                   for k, v in many.items()])
        rows = await driver.get_all_rows(unique, topic="m")
        assert {k: v for _, k, v in rows} == many and len(rows) == len(many)

    @aio
    async def test_topic_less_lookup_finds_row_under_its_topic(self, driver, unique):
        await driver.create_key(unique, "k", "v", topic="tenant1")
        assert await driver.get_key(unique, "k") == "v"
        await driver.set_key(unique, "k", "v2")
        assert await driver.get_key(unique, "k", topic="tenant1") == "v2"
        await driver.delete_key(unique, "k")
        await _raises(DBKeyNotFound, driver.get_key(unique, "k", topic="tenant1"))

    @aio
    async def test_topic_less_lookup_of_key_under_two_topics_is_ambiguous(self, driver, unique):
        await driver.create_key(unique, "k", "v1", topic="t1")
        await driver.create_key(unique, "k", "v2", topic="t2")
        for d in (
            driver.get_key(unique, "k"),
            driver.set_key(unique, "k", "x"),
            driver.delete_key(unique, "k"),
        ):
            err = await _raises(DBKeyAmbiguous, d)
            assert err.topics == ["t1", "t2"] and err.key == "k"
        assert sorted(await driver.get_all_keys(unique)) == ["k", "k"]
        assert await driver.get_key(unique, "k", topic="t2") == "v2"

    @aio
    async def test_tables_do_not_leak_into_each_other(self, driver, unique):
        await driver.create_key(unique, "k", "mine")
        await driver.create_key(unique + "x", "k", "other")
        await driver.create_key("x" + unique, "k2", "other")
        assert await driver.get_all_entries(unique) == ["mine"]
        await driver.delete_table(unique)
        assert await driver.get_key(unique + "x", "k") == "other"

    @aio
    async def test_glob_and_brace_characters_are_literal(self, driver, unique):
        table = unique + "*?[a]\\"
        await driver.create_key(table, "k*", "1", topic="t?")
        await driver.create_key(table, "{k}[x]", "2")
        await driver.create_key(unique + "zz", "k*", "decoy", topic="tz")
        assert sorted(await driver.get_all_keys(table)) == ["k*", "{k}[x]"]
        assert await driver.get_all_keys(table, topic="t?") == ["k*"]
        assert await driver.get_key(table, "k*") == "1"
        assert await driver.get_key(table, "{k}[x]") == "2"

    @aio
    async def test_unicode_keys_values_topics(self, driver, unique):
        table = unique + "-tablé"
        await driver.create_key(table, "ключ-🔑", "värde ✓ 値", topic="租户")
        assert await driver.get_key(table, "ключ-🔑") == "värde ✓ 値"
        assert await driver.get_all_keys(table, topic="租户") == ["ключ-🔑"]
        assert await driver.get_all_entries(table) == ["värde ✓ 値"]

    @aio
    async def test_values_that_look_like_numbers_stay_text(self, driver, unique):
        await driver.create_key(unique, "n", "123")
        await driver.create_key(unique, "f", "1.50")
        await driver.create_key(unique, "e", "")
        assert await driver.get_key(unique, "n") == "123"
        assert await driver.get_key(unique, "f") == "1.50"
        assert await driver.get_key(unique, "e") == ""

    @aio
    async def test_one_mebibyte_value(self, driver, unique):
        value = ("0123456789abcdef" * 65536)[:-1] + "é"
        await driver.create_key(unique, "big", value)
        assert await driver.get_key(unique, "big") == value
        assert await driver.get_all_entries(unique) == [value]

    @aio
    async def test_allocate_unique_key_under_200_concurrent_calls(self, driver, unique):
        results = await defer.gatherResults(
            [driver.allocate_unique_key(unique) for _ in range(200)]
        )
        assert all(isinstance(r, int) for r in results)
        assert len(set(results)) == 200
        assert min(results) >= 1
        other = await driver.allocate_unique_key(unique + "b")
        assert other == 1

    @aio
    async def test_invalid_names_are_refused(self, driver, unique):
        for table in ("", "a.b", "a{b", "a}b"):
            err = await _raises(InvalidNameError, driver.create_key(table, "k", "v"))
            assert err.kind == "table"
        err = await _raises(InvalidNameError, driver.create_key(unique, "k", "v", topic="a}"))
        assert err.kind == "topic"
        err = await _raises(InvalidNameError, driver.get_key(unique, ""))
        assert err.kind == "key"
        await _raises(TypeError, driver.create_key(unique, "k", b"bytes"))
        assert await driver.get_all_keys(unique) == []

    @aio
    async def test_empty_topic_means_no_topic(self, driver, unique):
        await driver.create_key(unique, "k", "v", topic="")
        assert await driver.get_key(unique, "k", topic=None) == "v"
        assert await driver.get_all_keys(unique, topic="") == ["k"]

    @aio
    async def test_topic_rows_are_the_rows_of_exactly_one_topic(self, driver, unique):
        await driver.create_key(unique, "a", "va", topic="t1")
        await driver.create_key(unique, "b", "vb", topic="t1")
        await driver.create_key(unique, "a", "other", topic="t10")  # a topic t1 prefixes
        await driver.create_key(unique, "c", "vc", topic="t2")
        await driver.create_key(unique, "d", "vd")
        await driver.create_key(unique, "a", "no topic")
        await driver.create_key(unique + "x", "z", "other table", topic="t1")
        await driver.create_key("x" + unique, "z", "other table", topic="t1")
        assert sorted(await driver.get_topic_rows(unique, "t1")) == [("a", "va"), ("b", "vb")]
        assert sorted(await driver.get_topic_rows(unique, None)) == [("a", "no topic"), ("d", "vd")]
        assert sorted(await driver.get_topic_rows(unique, "")) == [("a", "no topic"), ("d", "vd")]
        assert await driver.get_topic_rows(unique, "t3") == []
        assert await driver.get_topic_rows(unique + "y", None) == []
        await driver.delete_key(unique, "a", topic="t1")
        assert await driver.get_topic_rows(unique, "t1") == [("b", "vb")]
        err = await _raises(InvalidNameError, driver.get_topic_rows(unique, "a}"))
        assert err.kind == "topic"
        await _raises(InvalidNameError, driver.get_topic_rows("a.b", None))

    @aio
    async def test_topic_rows_of_a_large_topic_with_odd_names(self, driver, unique):
        table = unique + "*?[a]\\-tablé"
        many = {f"k{i}": f"v{i}" for i in range(1200)}
        many.update({"{k}[x]": "braces", "ключ-🔑": "värde ✓ 値", "*": "star"})
        await defer.gatherResults([driver.create_key(table, k, v, topic="租户")
                                   for k, v in many.items()])
        await driver.create_key(table, "k1", "decoy", topic="租户x")
        rows = await driver.get_topic_rows(table, "租户")
        assert dict(rows) == many and len(rows) == len(many)
        assert sorted(await driver.get_all_rows(table, topic="租户")) == sorted(
            ("租户", k, v) for k, v in many.items())

    @aio
    async def test_topic_versions_move_with_every_change_of_their_rows(self, driver, unique):
        t1, none, t2 = (unique, "t1"), (unique, None), (unique, "t2")

        async def versions():
            return await driver.get_topic_versions([t1, none, t2])

        assert await versions() == {t1: 0, none: 0, t2: 0}
        await driver.create_key(unique, "a", "1", topic="t1")
        v = await versions()
        assert v[t1] != 0 and v[none] == v[t2] == 0

        async def moved(change, *pairs):
            before = await versions()
            await change()
            after = await versions()
            assert {p for p in after if after[p] != before[p]} == set(pairs)

        await moved(lambda: driver.create_key(unique, "a", "2", topic="t1"), t1)
        await moved(lambda: driver.create_key(unique, "a", "2", topic="t1"))  # the same value
        await moved(lambda: driver.set_key(unique, "a", "3"), t1)  # found under t1
        await moved(lambda: driver.set_key(unique, "a", "3", topic="t1"))
        await _raises(DBKeyNotFound, moved(lambda: driver.set_key(unique, "no", "x", topic="t2")))
        await moved(lambda: driver.create_key(unique + "x", "a", "1", topic="t1"))  # other table
        await moved(lambda: driver.create_key(unique, "d", "1"), none)
        await moved(lambda: driver.create_key(unique, "c", "1", topic="t2"), t2)
        await moved(lambda: driver.delete_key(unique, "a"), t1)
        await _raises(DBKeyNotFound, moved(lambda: driver.delete_key(unique, "a")))
        await moved(lambda: driver.delete_table(unique), none, t2)
        same = await driver.get_topic_versions([(unique, ""), (unique, None)])
        assert same[(unique, "")] == same[(unique, None)] != 0
        assert await driver.get_topic_versions([]) == {}
        await _raises(InvalidNameError, driver.get_topic_versions([(unique, "a{")]))

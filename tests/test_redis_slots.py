"""Key slots: CRC16-XMODEM and hash tags, against the Redis Cluster
specification's vectors and against a real cluster's CLUSTER KEYSLOT."""

from __future__ import annotations

import random

import pytest
import pytest_twisted

from dftx.redis.cluster import ClusterClient
from dftx.deferreds import gather
from dftx.redis.slots import SLOTS, crc16, hash_tag, key_slot


def test_crc16_specification_vector():
    # "Output for "123456789": 31C3" (cluster spec, CRC16 reference code).
    assert crc16(b"123456789") == 0x31C3
    assert crc16(b"") == 0
    assert key_slot("123456789") == 0x31C3 % SLOTS


@pytest.mark.parametrize(
    "key, tag",
    [
        # The specification's hash tag examples.
        (b"{user1000}.following", b"user1000"),
        (b"{user1000}.followers", b"user1000"),
        (b"foo{}{bar}", b"foo{}{bar}"),  # empty first tag: whole key
        (b"foo{{bar}}zap", b"{bar"),
        (b"foo{bar}{zap}", b"bar"),
        # And the edges around them.
        (b"{}", b"{}"),
        (b"foo{bar", b"foo{bar"),
        (b"foo}bar{", b"foo}bar{"),
        (b"}{x}", b"x"),
        (b"{table.topic}key", b"table.topic"),
        (b"{table.}key", b"table."),
    ],
)
def test_hash_tags(key, tag):
    assert hash_tag(key) == tag
    assert key_slot(key) == crc16(tag) % SLOTS


def test_known_slots_and_text_keys():
    assert key_slot("foo") == 12182
    assert key_slot("{foo}bar") == 12182
    assert key_slot("bar") == 5061
    assert key_slot("ключ") == key_slot("ключ".encode("utf-8"))
    assert key_slot("{user1000}.following") == key_slot("user1000")


@pytest_twisted.ensureDeferred
async def test_slots_agree_with_cluster_keyslot(redis_cluster):
    rng = random.Random(1234)
    alphabet = "ab{}.:*é🔑 \\"
    keys = [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        for _ in range(500)
    ] + [f"{{t{i}.x}}k" for i in range(100)]
    client = ClusterClient(redis_cluster.seeds)
    try:
        await client.start()
        node = client.topology.masters[0]
        answers = await gather(
            client.execute_on(node, "CLUSTER", "KEYSLOT", k) for k in keys
        )
    finally:
        await client.close()
    assert answers == [key_slot(k) for k in keys]

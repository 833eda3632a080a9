"""CLUSTER SLOTS parsing and topology comparison."""

from __future__ import annotations

import json

import pytest

from dftx.endpoints import format_address, split_address
from dftx.errors import ProtocolError
from dftx.redis.slots import SLOTS
from dftx.redis.topology import Shard, Topology, parse_cluster_slots

A, B, C = "127.0.0.1:7000", "127.0.0.1:7001", "127.0.0.1:7002"


def node(port, node_id=b"", extra=None):
    entry = [b"127.0.0.1", port]
    if node_id:
        entry.append(node_id)
    if extra is not None:
        entry.append(extra)
    return entry


def test_redis7_reply_with_ids_extra_fields_and_non_contiguous_ranges():
    # Redis 7 sends the node id and a map of extra fields (RESP2: a flat
    # array); after a migration one master owns several ranges.
    reply = [
        [5461, 10922, node(7001, b"id-b", [b"hostname", b"b.example"]), node(7004, b"id-e", [])],
        [0, 99, node(7000, b"id-a", []), node(7003, b"id-d", [])],
        [100, 100, node(7001, b"id-b", [b"hostname", b"b.example"])],
        [101, 5460, node(7000, b"id-a", []), node(7003, b"id-d", [])],
        [10923, 16383, node(7002), node(7005)],
    ]
    t = parse_cluster_slots(reply, A)
    assert t.cluster
    assert t.owner(0) == t.owner(99) == A
    assert t.owner(100) == B
    assert t.owner(101) == t.owner(5460) == A
    assert t.owner(5461) == t.owner(10922) == B
    assert t.owner(16383) == C
    assert t.masters == [A, B, C]
    assert t.replicas_of(A) == ["127.0.0.1:7003"]
    assert t.replicas_of(B) == ["127.0.0.1:7004"]
    assert t.covered == SLOTS
    assert t.nodes == [A, B, C, "127.0.0.1:7003", "127.0.0.1:7004", "127.0.0.1:7005"]
    assert t.as_dict()["masters"][A]["slots"] == [[0, 99], [101, 5460]]


def test_unknown_host_means_the_host_asked():
    reply = [[0, SLOTS - 1, [b"", 7000, b"id"], [b"?", 7001, b"id2"], [None, 7002]]]
    t = parse_cluster_slots(reply, "10.1.2.3:7005")
    assert t.owner(5) == "10.1.2.3:7000"
    assert t.replicas_of("10.1.2.3:7000") == ["10.1.2.3:7001", "10.1.2.3:7002"]


def test_uncovered_slots_have_no_owner():
    t = parse_cluster_slots([[0, 10, node(7000)]], A)
    assert t.owner(10) == A and t.owner(11) is None
    assert t.covered == 11


@pytest.mark.parametrize(
    "reply",
    [
        b"garbage",
        None,
        [b"x"],
        [[0, 10]],
        [[0, b"10", node(7000)]],
        [[10, 5, node(7000)]],
        [[0, SLOTS, node(7000)]],
        [[0, 10, [b"127.0.0.1"]]],
        [[0, 10, [b"127.0.0.1", 0]]],
        [[0, 10, [b"127.0.0.1", b"7000"]]],
        [[0, 10, [7000, 7000]]],
    ],
)
def test_malformed_replies_are_protocol_errors_naming_the_peer(reply):
    with pytest.raises(ProtocolError) as info:
        parse_cluster_slots(reply, A)
    assert info.value.peer == A


def test_single_node_owns_everything():
    t = Topology.single("unix:/run/redis.sock")
    assert not t.cluster
    assert t.owner(0) == t.owner(SLOTS - 1) == "unix:/run/redis.sock"
    assert t.masters == t.nodes == ["unix:/run/redis.sock"]


def test_equality_and_moved_slots():
    one = Topology([Shard(0, 8000, A, (C,)), Shard(8001, SLOTS - 1, B)])
    same = Topology([Shard(8001, SLOTS - 1, B), Shard(0, 8000, A, (C,))])
    assert one == same and hash(one) == hash(same)
    assert one.moved_slots(same) == []
    moved = Topology([Shard(0, 7999, A, (C,)), Shard(8000, SLOTS - 1, B)])
    assert one != moved
    assert one.moved_slots(moved) == [8000]
    failed_over = Topology([Shard(0, 8000, C, (A,)), Shard(8001, SLOTS - 1, B)])
    assert one.moved_slots(failed_over) == list(range(8001))
    assert one != Topology([Shard(0, 8000, A), Shard(8001, SLOTS - 1, B)])  # replica gone
    assert Topology.single(A) != Topology([Shard(0, SLOTS - 1, A)])  # cluster flag


def test_addresses():
    assert format_address("::1", 7000) == "[::1]:7000"
    assert split_address("[::1]:7000") == ("::1", 7000)
    assert split_address("redis.example:6379") == ("redis.example", 6379)
    for bad in ("nohost", ":7000", "h:0", "h:99999", "h:x"):
        with pytest.raises(ValueError):
            split_address(bad)


def test_as_dict_round_trips_through_json():
    reply = [
        [101, 5460, node(7000), node(7003)],
        [0, 99, node(7000), node(7003)],
        [5461, 16383, node(7001)],
    ]
    t = parse_cluster_slots(reply, "127.0.0.1:7000")
    again = Topology.from_dict(json.loads(json.dumps(t.as_dict())))
    assert again == t and again.owners() == t.owners()
    single = Topology.single("127.0.0.1:6379")
    assert Topology.from_dict(single.as_dict()) == single


@pytest.mark.parametrize("data", [
    None, [], {}, {"cluster": True}, {"cluster": True, "masters": {}},
    {"cluster": "yes", "masters": {"a:1": {"slots": [[0, 1]], "replicas": []}}},
    {"cluster": True, "masters": {"a:1": {"slots": [[0, 99999]], "replicas": []}}},
    {"cluster": True, "masters": {"a:1": {"slots": [[5, 1]], "replicas": []}}},
    {"cluster": True, "masters": {"a:1": {"slots": [["x", 1]], "replicas": []}}},
    {"cluster": True, "masters": {"a:1": {"slots": [[0, 10]]}}},
    {"cluster": True, "masters": {"a:1": {"slots": [[0, 10]], "replicas": []},
                                  "b:1": {"slots": [[5, 20]], "replicas": []}}},
])
def test_from_dict_refuses_what_as_dict_cannot_make(data):
    with pytest.raises(ProtocolError, match="not a topology"):
        Topology.from_dict(data)

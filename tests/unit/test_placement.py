"""The placement core (`listenerd.placement.place`), exhaustively over small clusters: every group on
a live node, the load even to within one group, nothing moved without cause, the same answer twice."""

import itertools

from listenerd.placement import loads, moves, place


def balanced(placed, weights, nodes):
    """No single move of a group to the least loaded node would narrow the gap between the two."""
    load = loads(placed, weights, nodes)
    light = min(load.values())
    return not any(0 < max(1, weights[g]) < load[n] - light for g, n in placed.items())


def cases():
    """Up to 4 groups weighing 1-3 listeners, up to 3 nodes, every owner (none, a live or a dead node)."""
    for count in range(0, 5):
        groups = [f"g{i}" for i in range(count)]
        for weights in itertools.product((1, 2, 3), repeat=count):
            for nodes in (["a"], ["a", "b"], ["a", "b", "c"]):
                for owners in itertools.product([None, *nodes, "dead"], repeat=count):
                    yield (dict(zip(groups, weights, strict=True)), nodes,
                           {g: o for g, o in zip(groups, owners, strict=True) if o is not None})


def test_every_case_is_complete_balanced_deterministic_and_stable():
    checked = 0
    for weights, nodes, owners in cases():
        placed = place(weights, nodes, owners)
        assert set(placed) == set(weights) and set(placed.values()) <= set(nodes)
        assert balanced(placed, weights, nodes), (weights, nodes, owners, placed)
        assert place(weights, list(reversed(nodes)), owners) == placed  # the order nodes are read in is no input
        assert place(weights, nodes, placed) == placed  # a placement that is in force stays: no churn
        checked += 1
    assert checked > 10_000


def test_a_group_moves_only_when_its_node_is_over_its_share():
    for weights, nodes, owners in cases():
        placed = place(weights, nodes, owners)
        load = loads(placed, weights, nodes)
        for group, owner in owners.items():
            if owner in nodes and placed[group] != owner:
                # it left a node that ended at least as loaded as the one it went to, less its own weight
                assert load[owner] >= load[placed[group]] - max(1, weights[group]), (weights, owners, placed)


def test_a_joining_node_takes_its_share_in_the_fewest_moves():
    weights = {f"g{i}": 10 for i in range(30)}  # 300 listeners in 30 groups, as the chaos scenario
    two = place(weights, ["a", "b"], {})
    three = place(weights, ["a", "b", "c"], two)
    assert loads(three, weights, ["a", "b", "c"]) == {"a": 100, "b": 100, "c": 100}
    assert moves(two, three) == 10  # exactly the new node's share, nothing shuffled between a and b


def test_a_dead_nodes_groups_are_spread_over_the_survivors_and_nothing_else_moves():
    weights = {f"g{i}": 10 for i in range(30)}
    three = place(weights, ["a", "b", "c"], {})
    survivors = place(weights, ["a", "b"], {g: n for g, n in three.items() if n != "c"})
    assert loads(survivors, weights, ["a", "b"]) == {"a": 150, "b": 150}
    assert all(survivors[g] == n for g, n in three.items() if n != "c")


def test_a_draining_node_is_simply_not_among_the_nodes():
    weights = {"g1": 3, "g2": 1, "g3": 2}
    assert set(place(weights, ["b"], {"g1": "a", "g2": "b"}).values()) == {"b"}
    assert place(weights, [], {"g1": "a"}) == {}

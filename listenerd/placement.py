"""Which node runs which connection group: a pure decision, no I/O, the same on every node.

Every node computes `place` from the same facts read from the store (the groups and their listener
counts, the live nodes, the live leases), so the nodes agree without talking to each other; leases
settle the moments they do not (a group is taken only once its lease is free). The rules:

- a group whose owner is live stays where it is, unless moving it evens the load (fewest moves);
- a group without a live owner goes to the least loaded node;
- then, while some node carries more than the least loaded one by more than one of its groups
  weighs, the move that most reduces the sum of squared loads is made (it only falls, so this ends;
  a joining node takes its share in as few moves as the gap needs).

Load is counted in listeners (a group's weight), ties broken by names, so the answer is deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def place(weights: Mapping[str, int], nodes: Sequence[str], owners: Mapping[str, str]) -> dict[str, str]:
    """Each group's node. `weights`: group -> listeners (>= 1 counts; 0 counts as 1); `nodes`: the live
    nodes that take work; `owners`: group -> its current live owner (others are ignored)."""
    if not nodes:
        return {}
    live = sorted(set(nodes))
    load = dict.fromkeys(live, 0)
    placed: dict[str, str] = {}
    weight = {g: max(1, w) for g, w in weights.items()}
    for group in sorted(weight):
        owner = owners.get(group)
        if owner in load:
            placed[group] = owner
            load[owner] += weight[group]
    for group in sorted((g for g in weight if g not in placed), key=lambda g: (-weight[g], g)):
        target = min(live, key=lambda n: (load[n], n))
        placed[group] = target
        load[target] += weight[group]
    while True:
        light = min(live, key=lambda n: (load[n], n))
        # a move of w from a node `gap` above the lightest leaves them |gap - 2w| apart: it helps when
        # 0 < w < gap, and the sum of squared loads falls by 2w(gap - w): take the move that cuts it most
        best: tuple[int, str, str] | None = None
        for group, node in placed.items():
            gap = load[node] - load[light]
            if 0 < weight[group] < gap:
                cut = 2 * weight[group] * (gap - weight[group])
                if best is None or (-cut, group) < (-best[0], best[1]):
                    best = (cut, group, node)
        if best is None:
            return placed
        _, group, node = best
        placed[group] = light
        load[node] -= weight[group]
        load[light] += weight[group]


def moves(before: Mapping[str, str], after: Mapping[str, str]) -> int:
    """How many groups change node between two placements (a new or orphaned group is not a move)."""
    return sum(1 for g, n in after.items() if g in before and before[g] != n)


def loads(placed: Mapping[str, str], weights: Mapping[str, int], nodes: Sequence[str]) -> dict[str, int]:
    out = dict.fromkeys(nodes, 0)
    for group, node in placed.items():
        out[node] = out.get(node, 0) + max(1, weights[group])
    return out

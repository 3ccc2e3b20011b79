"""Which process trains which client: a round's clients spread over the ranks by their work.

Pure functions of their inputs (every rank computes the same answer without talking to the others):
:func:`balanced_assignment` for training, :func:`modulo_assignment` for the fixed ``k % world_size`` rule,
:func:`rank_loads` and :func:`imbalance` to measure either.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def modulo_assignment(client_ids: Iterable[int], world_size: int) -> dict[int, int]:
    """Client ``k`` on rank ``k % world_size``, whatever its work.

    >>> modulo_assignment([0, 3, 4, 9], 2)
    {0: 0, 3: 1, 4: 0, 9: 1}
    """
    return {k: k % world_size for k in client_ids}


def balanced_assignment(
    work: Mapping[int, float], world_size: int, holders: Mapping[int, int] | None = None
) -> dict[int, int]:
    """``client -> rank`` with the ranks' summed ``work`` close to equal, clients kept where their state is.

    Clients are taken from the most work to the least (ties: the lower client id first). Each goes to the rank
    that holds its state (``holders``, ``client -> rank``) if that rank stays within the mean work, otherwise to
    the rank with the least work so far (ties: the lower rank): longest processing time first, which alone
    would keep the busiest rank within 4/3 of the best possible maximum. Either way no rank ends more than
    one client's work above the mean, and few states move. Deterministic in its inputs, so every process
    computes the same assignment.

    >>> work = {0: 5.0, 1: 4.0, 2: 3.0, 3: 3.0, 4: 3.0}
    >>> a = balanced_assignment(work, 2)
    >>> a, rank_loads(a, work, 2)
    ({0: 0, 1: 1, 2: 1, 3: 0, 4: 1}, [8.0, 10.0])
    >>> b = balanced_assignment(work, 2, holders={0: 1, 2: 1, 3: 1, 4: 1})  # 3 and 4 would pass the mean (9)
    >>> b, rank_loads(b, work, 2)
    ({0: 1, 1: 0, 2: 1, 3: 0, 4: 0}, [10.0, 8.0])
    """
    if world_size < 1:
        raise ValueError(f"`balanced_assignment(world_size={world_size})` must be >= 1.")
    holders = holders or {}
    mean = sum(work.values()) / world_size
    loads = [0.0] * world_size
    out: dict[int, int] = {}
    for k in sorted(work, key=lambda k: (-work[k], k)):
        r = holders.get(k)
        if r is None or not 0 <= r < world_size or loads[r] + work[k] > mean:
            r = min(range(world_size), key=lambda r: (loads[r], r))
        out[k] = r
        loads[r] += work[k]
    return out


def rank_loads(assignment: Mapping[int, int], work: Mapping[int, float], world_size: int) -> list[float]:
    """Each rank's summed work under ``assignment`` (clients not in ``work`` count 0).

    >>> rank_loads({0: 0, 1: 1, 2: 1}, {0: 2.0, 1: 1.0, 2: 1.5}, 3)
    [2.0, 2.5, 0.0]
    """
    loads = [0.0] * world_size
    for k, r in assignment.items():
        loads[r] += work.get(k, 0.0)
    return loads


def imbalance(loads: list[float]) -> float:
    """The busiest rank's work over the mean (1.0: perfectly balanced; 1.0 when there is no work).

    >>> imbalance([8.0, 10.0]), imbalance([0.0, 0.0])
    (1.1111111111111112, 1.0)
    """
    total = sum(loads)
    return max(loads) * len(loads) / total if total > 0 else 1.0

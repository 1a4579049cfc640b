"""Evening out vision tokens across data-parallel ranks within one step.

Packs are balanced on text tokens by construction (every row is seq_length
long), but not on vision tokens: one rank may draw packs full of images while
another draws documents. The vision encoder's time grows with its tokens, and
every rank waits for the slowest at the gradient all-reduce, so a step costs
what its most image-heavy rank costs. Within a step the packs can be moved
between ranks freely: the loss is normalised over the whole step on all ranks
(see DESIGN.md), so which rank computes which microbatch does not change the
gradient.

The pieces:

* ``balance_assignment``: which packs every rank should take, from the
  per-rank lists of per-pack vision-token counts. Pure and deterministic, so
  every rank computes the same answer from the same counts and no rank has to
  broadcast it.
* ``exchange_packs``: moves the pack objects between ranks to match an
  assignment (point-to-point sends of pickled bytes).
* ``balance_step``: all-gathers the counts, assigns, exchanges; the identity
  on one rank.

A pack is any picklable object; the loader passes collated microbatch dicts,
whose vision tokens ``microbatch_vision_tokens`` counts.
"""

from __future__ import annotations

import bisect
import collections
import heapq
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megavl.platform.distributed import collective_device

# assignment[destination rank] = the (source rank, source index) of every pack it takes.
Assignment = list[list[tuple[int, int]]]


# -- measures ------------------------------------------------------------------


def imbalance(loads: Sequence[int]) -> float:
    """max / mean of per-rank loads: 1.0 is perfect balance, and also what no load at all reads as."""
    if not loads:
        raise ValueError("imbalance needs the load of at least one rank; got an empty list")
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean else 1.0


def assigned_loads(counts: Sequence[Sequence[int]], assignment: Assignment) -> list[int]:
    """Per-rank sums of the vision tokens each destination rank takes under ``assignment``."""
    return [sum(counts[src][idx] for src, idx in packs) for packs in assignment]


def packs_moved(assignment: Assignment) -> int:
    """Packs that leave the rank they were drawn on."""
    return sum(1 for dest, packs in enumerate(assignment) for src, _ in packs if src != dest)


def microbatch_vision_tokens(batch: dict, spatial_merge_size: int) -> int:
    """Vision tokens of a collated microbatch (``collate_rows``), from its image grids."""
    grids = batch.get("image_grid_thw")
    if grids is None:
        return 0
    return int((grids.prod(dim=-1) // (spatial_merge_size * spatial_merge_size)).sum())


# -- the assignment --------------------------------------------------------------


def balance_assignment(counts: Sequence[Sequence[int]]) -> Assignment:
    """Which packs each rank takes so that the largest per-rank vision-token sum is small.

    ``counts[r][i]`` is the vision-token count of pack i of rank r; every
    rank has the same number m of packs. Returns, for every destination rank,
    m (source rank, source index) pairs sorted by source; together they use
    every pack exactly once.

    Method: longest-processing-time first under the m-packs-per-rank limit,
    then pairwise swaps out of the most loaded rank while they lower it (and
    until it is within 1/1024 of the lower bound: the mean load, or the
    heaviest pack). The resulting groups of packs go to the ranks that already hold most of them,
    and a last pass sends moved packs home by swaps that keep every rank
    within the maximum reached. The result is never worse than not
    balancing: when the search cannot lower the maximum, nothing moves.
    Ties are broken by rank and index, so equal counts give equal
    assignments on every rank.
    """
    m = _check_counts(counts)
    ranks = len(counts)
    identity = [[(r, i) for i in range(m)] for r in range(ranks)]
    if ranks < 2 or m == 0:
        return identity
    weight = lambda pack: counts[pack[0]][pack[1]]  # noqa: E731
    groups = _longest_first(counts, m)
    _swap_down_the_maximum(groups, weight)
    limit = max(_loads(groups, weight))
    if limit >= max(_loads(identity, weight)):
        return identity
    assignment = _place_groups(groups)
    _send_packs_home(assignment, weight, limit)
    return [sorted(packs) for packs in assignment]


def _check_counts(counts: Sequence[Sequence[int]]) -> int:
    if not counts:
        raise ValueError("balance_assignment needs the counts of at least one rank; got none")
    m = len(counts[0])
    for rank, row in enumerate(counts):
        if len(row) != m:
            raise ValueError(
                f"every rank must have the same number of packs; rank 0 has {m}, rank {rank} has {len(row)}"
            )
        for index, count in enumerate(row):
            if count < 0:
                raise ValueError(f"vision-token count of pack {index} of rank {rank} is {count}; must be >= 0")
    return m


def _loads(groups: Assignment, weight: Callable) -> list[int]:
    return [sum(weight(p) for p in packs) for packs in groups]


def _longest_first(counts: Sequence[Sequence[int]], m: int) -> Assignment:
    """Heaviest pack first, each into the least loaded group that has fewer than m packs.

    Group g starts out as rank g's, and packs prefer their own rank's group
    when it is no worse, so that fewer of them have to move.
    """
    ranks = len(counts)
    order = sorted(((r, i) for r in range(ranks) for i in range(m)), key=lambda p: (-counts[p[0]][p[1]], p))
    groups: Assignment = [[] for _ in range(ranks)]
    loads = [0] * ranks
    # Entries are (load, group); one goes stale when its group's load or
    # fullness changes, and is skipped when it reaches the top.
    heap = [(0, g) for g in range(ranks)]
    weightless = [p for p in order if counts[p[0]][p[1]] == 0]
    for src, idx in order[: len(order) - len(weightless)]:
        while loads[heap[0][1]] != heap[0][0] or len(groups[heap[0][1]]) == m:
            heapq.heappop(heap)
        least, dest = heap[0]
        # Among equally loaded groups the pack's own rank's, so packs that
        # need not move stay (zero-count packs, above all).
        if loads[src] == least and len(groups[src]) < m:
            dest = src
        groups[dest].append((src, idx))
        loads[dest] += counts[src][idx]
        heapq.heappush(heap, (loads[dest], dest))
    # Packs without vision tokens (text-only microbatches) change no load, so
    # they only fill the places left, their own rank's group first.
    for src, idx in weightless:
        dest = src if len(groups[src]) < m else next(g for g in range(ranks) if len(groups[g]) < m)
        groups[dest].append((src, idx))
    return groups


def _swap_down_the_maximum(groups: Assignment, weight: Callable) -> None:
    """Swaps pairs of packs between the most loaded group and another while that lowers the former.

    Every accepted swap leaves both groups below the old maximum, so the
    sorted loads fall lexicographically and the loop ends.
    """
    loads = _loads(groups, weight)
    ranked = [_ranked(packs, weight) for packs in groups]
    # No assignment goes below the mean load or the heaviest pack. Within
    # 1/1024 of that bound the search stops: the last fractions of a percent
    # are noise beside the encoder's own step-time jitter, and on hundreds of
    # ranks they take hundreds of swaps.
    floor = max(-(-sum(loads) // len(groups)), max(w for packs in ranked for w, _ in packs[-1:]))
    while True:
        top = max(range(len(groups)), key=lambda g: (loads[g], -g))
        if loads[top] * 1024 <= floor * 1025:
            return
        swap = _best_swap(groups, loads, ranked, weight, top)
        if swap is None:
            return
        other, a, b = swap
        delta = weight(groups[top][a]) - weight(groups[other][b])
        groups[top][a], groups[other][b] = groups[other][b], groups[top][a]
        loads[top] -= delta
        loads[other] += delta
        ranked[top] = _ranked(groups[top], weight)
        ranked[other] = _ranked(groups[other], weight)


def _ranked(packs: list, weight: Callable) -> list[tuple[int, int]]:
    """(weight, position) of a group's packs, lightest first."""
    return sorted((weight(p), pos) for pos, p in enumerate(packs))


def _best_swap(groups: Assignment, loads: list[int], ranked: list, weight: Callable,
               top: int) -> Optional[tuple[int, int, int]]:
    """(other group, position in top, position in other) of the swap that best evens top with another group.

    Moving delta = w(a) - w(b) tokens from top to other leaves the larger of
    the two at max(load_top - delta, load_other + delta), lowest at delta =
    gap / 2; for each pack a of top only the packs b of other whose weights
    bracket w(a) - gap / 2 can be best. No swap with other can beat the mean
    of the two loads, so the others are tried lightest first and the search
    stops once that mean exceeds the best found.
    """
    best = None
    for other in sorted(range(len(groups)), key=lambda g: (loads[g], g)):
        gap = loads[top] - loads[other]
        if gap < 2:  # an integer delta strictly inside (0, gap) needs gap >= 2
            break
        if best and (loads[top] + loads[other]) / 2 > best[0]:
            break
        weights = [w for w, _ in ranked[other]]
        for a, pack in enumerate(groups[top]):
            wa = weight(pack)
            cut = bisect.bisect_left(weights, wa - gap / 2)
            for k in (cut - 1, cut):
                if not 0 <= k < len(weights):
                    continue
                wb, b = ranked[other][k]
                delta = wa - wb
                if 0 < delta < gap:
                    candidate = (max(loads[top] - delta, loads[other] + delta), other, a, b)
                    best = min(best, candidate) if best else candidate
    return best[1:] if best else None


def _place_groups(groups: Assignment) -> Assignment:
    """Gives each group to a rank, preferring the rank that already holds most of its packs.

    Which rank takes which group does not change any load, only how many
    packs travel; greedy matching on the overlap is close to the fewest.
    """
    ranks = len(groups)
    overlap = collections.Counter((g, src) for g, packs in enumerate(groups) for src, _ in packs)
    rank_of: dict[int, int] = {}
    taken: set[int] = set()
    for (group, rank), _ in sorted(overlap.items(), key=lambda item: (-item[1], item[0])):
        if group not in rank_of and rank not in taken:
            rank_of[group] = rank
            taken.add(rank)
    free = iter(sorted(set(range(ranks)) - taken))
    placed: Assignment = [[] for _ in range(ranks)]
    for group in range(ranks):
        placed[rank_of[group] if group in rank_of else next(free)] = groups[group]
    return placed


def _send_packs_home(assignment: Assignment, weight: Callable, limit: int) -> None:
    """Swaps a moved pack back to its source rank for a moved pack there, while no rank exceeds limit.

    Every swap returns at least one pack home and moves none away that was
    home, so the number of moved packs falls and the loop ends.
    """
    loads = _loads(assignment, weight)
    changed = True
    while changed:
        changed = False
        for dest, packs in enumerate(assignment):
            for a, pack in enumerate(packs):
                home = pack[0]
                if home == dest:
                    continue
                b = _partner(assignment[home], home, dest, weight(pack), loads, limit, weight)
                if b is None:
                    continue
                partner = assignment[home][b]
                delta = weight(pack) - weight(partner)
                packs[a], assignment[home][b] = partner, pack
                loads[dest] -= delta
                loads[home] += delta
                changed = True


def _partner(candidates: list, home: int, dest: int, w: int, loads: list[int], limit: int,
             weight: Callable) -> Optional[int]:
    """Position of a moved pack on rank home that can trade places with a pack of weight w on dest.

    One that comes from dest is preferred: then both packs go home.
    """
    best = None
    for b, pack in enumerate(candidates):
        if pack[0] == home:
            continue
        delta = w - weight(pack)
        if loads[dest] - delta <= limit and loads[home] + delta <= limit:
            key = (pack[0] != dest, b)
            best = min(best, key) if best else key
    return best[1] if best else None


# -- moving the packs ------------------------------------------------------------


def exchange_packs(local_packs: list, assignment: Assignment, rank: int,
                   group: Optional[dist.ProcessGroup] = None) -> list:
    """Sends and receives packs so that this rank ends with ``assignment[rank]``, in that order.

    ``rank`` is this process's rank in ``group`` (None: the default group)
    and ``local_packs`` its packs, indexed as the assignment's source
    indices. Every rank of the group must call this with the same assignment.
    All sends and receives of a rank are posted together and then waited on,
    so no order of ranks can deadlock. Packs that stay are returned as the
    same objects; moved ones arrive as unpickled copies.
    """
    size = _group_size(group)
    _check_assignment(assignment, size, len(local_packs))
    actual = dist.get_rank(group) if size > 1 else 0
    if rank != actual:
        raise ValueError(f"exchange_packs got rank {rank}, but this process is rank {actual} of its group of {size}")
    if size == 1:
        return [local_packs[idx] for _, idx in assignment[0]]
    outgoing = {
        dest: [local_packs[idx] for src, idx in packs if src == rank]
        for dest, packs in enumerate(assignment)
        if dest != rank
    }
    outgoing = {dest: objects for dest, objects in outgoing.items() if objects}
    sources = sorted({src for src, _ in assignment[rank] if src != rank})
    received = {src: iter(objects) for src, objects in _transfer(outgoing, sources, group).items()}
    # A source sends its packs in the order this rank's list names them, so
    # taking them in list order pairs each entry with its object.
    return [local_packs[idx] if src == rank else next(received[src]) for src, idx in assignment[rank]]


def _check_assignment(assignment: Assignment, size: int, m: int) -> None:
    if len(assignment) != size:
        raise ValueError(f"assignment has {len(assignment)} destination ranks but the group has {size}")
    for dest, packs in enumerate(assignment):
        if len(packs) != m:
            raise ValueError(f"assignment gives rank {dest} {len(packs)} packs; every rank has and takes {m}")
    used = collections.Counter(p for packs in assignment for p in packs)
    for r in range(size):
        for i in range(m):
            if used[(r, i)] != 1:
                raise ValueError(
                    f"assignment uses pack {i} of rank {r} {used[(r, i)]} times; every pack must be used once"
                )


def _group_size(group: Optional[dist.ProcessGroup]) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _transfer(outgoing: dict[int, list], sources: list[int], group: Optional[dist.ProcessGroup]) -> dict[int, list]:
    """Point-to-point exchange of object lists: sizes first, so receivers can allocate, then the bytes."""
    device = collective_device(group)
    peer = lambda r: dist.get_global_rank(group or dist.group.WORLD, r)  # noqa: E731
    payloads = {
        dest: torch.frombuffer(bytearray(pickle.dumps(objects, protocol=pickle.HIGHEST_PROTOCOL)),
                               dtype=torch.uint8).to(device)
        for dest, objects in outgoing.items()
    }
    sizes = {src: torch.zeros(1, dtype=torch.long, device=device) for src in sources}
    _run_p2p(
        [dist.P2POp(dist.isend, torch.tensor([p.numel()], dtype=torch.long, device=device), peer(d), group)
         for d, p in payloads.items()]
        + [dist.P2POp(dist.irecv, sizes[s], peer(s), group) for s in sources]
    )
    buffers = {src: torch.empty(int(sizes[src]), dtype=torch.uint8, device=device) for src in sources}
    _run_p2p(
        [dist.P2POp(dist.isend, p, peer(d), group) for d, p in payloads.items()]
        + [dist.P2POp(dist.irecv, buffers[s], peer(s), group) for s in sources]
    )
    return {src: pickle.loads(buffers[src].cpu().numpy().tobytes()) for src in sources}


def _run_p2p(ops: list) -> None:
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()


# -- one step --------------------------------------------------------------------


@dataclass
class BalanceStats:
    imbalance_before: float  # max / mean of per-rank vision tokens as drawn
    imbalance_after: float  # ... after the exchange
    packs_moved: int  # over all ranks
    packs: int  # over all ranks

    @classmethod
    def of(cls, counts: Sequence[Sequence[int]], assignment: Assignment) -> "BalanceStats":
        """The stats of carrying out assignment on packs with these per-rank counts."""
        return cls(
            imbalance_before=imbalance([sum(row) for row in counts]),
            imbalance_after=imbalance(assigned_loads(counts, assignment)),
            packs_moved=packs_moved(assignment),
            packs=sum(len(row) for row in counts),
        )

    @property
    def moved_fraction(self) -> float:
        return self.packs_moved / self.packs if self.packs else 0.0


def balance_step(local_packs: list, vision_tokens_of: Callable[[Any], int],
                 group: Optional[dist.ProcessGroup] = None) -> tuple[list, BalanceStats]:
    """Evens out vision tokens across the ranks of ``group`` for one step's packs.

    Every rank of the group must call this with the same number of packs
    (the counts are all-gathered as one tensor per rank). Returns this
    rank's packs after the exchange and stats that are the same on every
    rank. On a group of one (or without torch.distributed) the packs come
    back unchanged.
    """
    local_counts = [int(vision_tokens_of(pack)) for pack in local_packs]
    if _group_size(group) == 1 or not local_packs:
        stats = BalanceStats(imbalance([sum(local_counts)]), imbalance([sum(local_counts)]), 0, len(local_packs))
        return list(local_packs), stats
    counts = _all_gather_counts(local_counts, group)
    assignment = balance_assignment(counts)
    packs = exchange_packs(local_packs, assignment, dist.get_rank(group), group)
    return packs, BalanceStats.of(counts, assignment)


def _all_gather_counts(local_counts: list[int], group: Optional[dist.ProcessGroup]) -> list[list[int]]:
    device = collective_device(group)
    mine = torch.tensor(local_counts, dtype=torch.long, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    return [row.tolist() for row in gathered]

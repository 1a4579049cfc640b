"""Vision-token balancing across data-parallel ranks: the assignment, its measures, and the exchange."""

from __future__ import annotations

import os
import random
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megavl.data.balance import (
    BalanceStats,
    assigned_loads,
    balance_assignment,
    balance_step,
    exchange_packs,
    imbalance,
    microbatch_vision_tokens,
    packs_moved,
)


def random_counts(rng: random.Random, ranks: int, m: int) -> list[list[int]]:
    """Per-pack vision tokens with the skew of real packs: many without images, a few image-heavy."""
    def count() -> int:
        kind = rng.random()
        if kind < 0.3:
            return 0
        if kind < 0.8:
            return rng.randint(50, 600)
        return rng.randint(1000, 4000)

    return [[count() for _ in range(m)] for _ in range(ranks)]


def optimum(counts: list[list[int]]) -> int:
    """Smallest achievable maximum load with m packs per rank, by exhaustive search (tiny inputs only)."""
    ranks, m = len(counts), len(counts[0])
    weights = sorted((w for row in counts for w in row), reverse=True)
    best = sum(weights)
    loads, sizes = [0] * ranks, [0] * ranks

    def place(k: int) -> None:
        nonlocal best
        if k == len(weights):
            best = min(best, max(loads))
            return
        tried = set()
        for r in range(ranks):
            state = (loads[r], sizes[r])
            if sizes[r] == m or state in tried or loads[r] + weights[k] >= best:
                continue
            tried.add(state)
            loads[r] += weights[k]
            sizes[r] += 1
            place(k + 1)
            loads[r] -= weights[k]
            sizes[r] -= 1

    place(0)
    return best


def check_is_assignment(counts: list[list[int]], assignment) -> None:
    ranks, m = len(counts), len(counts[0]) if counts else 0
    assert len(assignment) == ranks
    assert all(len(packs) == m for packs in assignment)
    assert sorted(p for packs in assignment for p in packs) == [(r, i) for r in range(ranks) for i in range(m)]


# -- the assignment ------------------------------------------------------------


@pytest.mark.parametrize("ranks,m", [(1, 4), (2, 1), (2, 3), (3, 5), (8, 8), (16, 2), (5, 0)])
def test_assignment_is_a_permutation_that_never_raises_the_maximum(ranks, m):
    rng = random.Random(ranks * 100 + m)
    for _ in range(30):
        counts = random_counts(rng, ranks, m)
        assignment = balance_assignment(counts)
        check_is_assignment(counts, assignment)
        before = [sum(row) for row in counts]
        after = assigned_loads(counts, assignment)
        assert max(after, default=0) <= max(before, default=0)
        if packs_moved(assignment):
            assert max(after) < max(before)  # moving packs must buy something


@pytest.mark.parametrize("ranks,m", [(2, 2), (3, 3), (4, 2), (4, 4)])
def test_ties_between_loads_still_give_every_rank_m_packs(ranks, m):
    """Small counts from a few values make equal loads common: the tie-breaks must never
    give a group more than m packs (exchange_packs would refuse it in training)."""
    rng = random.Random(ranks * 10 + m)
    for _ in range(300):
        counts = [[rng.choice((0, 1, 2, 3, 5)) for _ in range(m)] for _ in range(ranks)]
        assignment = balance_assignment(counts)
        check_is_assignment(counts, assignment)
        assert max(assigned_loads(counts, assignment)) <= max(sum(row) for row in counts)
    counts = [[1, 1], [1, 3], [2, 5], [5, 1]]
    check_is_assignment(counts, balance_assignment(counts))


def test_assignment_is_deterministic():
    rng = random.Random(11)
    for _ in range(20):
        counts = random_counts(rng, 6, 4)
        first = balance_assignment(counts)
        assert balance_assignment([list(row) for row in counts]) == first
        assert balance_assignment(tuple(tuple(row) for row in counts)) == first
    # Equal counts everywhere: ties alone decide, and nothing needs to move.
    assert balance_assignment([[7, 7], [7, 7], [7, 7]]) == [[(0, 0), (0, 1)], [(1, 0), (1, 1)], [(2, 0), (2, 1)]]


def test_skewed_cases_reach_the_optimum():
    # Longest-first alone gives {3, 2, 2} = 7 against {3, 2, 0} = 5; one swap reaches 6.
    counts = [[3, 3, 2], [2, 2, 0]]
    assignment = balance_assignment(counts)
    assert max(assigned_loads(counts, assignment)) == optimum(counts) == 6

    counts = [[900, 800, 700, 600], [0, 0, 0, 10], [50, 0, 0, 0], [0, 0, 0, 0]]
    assignment = balance_assignment(counts)
    assert max(assigned_loads(counts, assignment)) == optimum(counts) == 900
    check_is_assignment(counts, assignment)


def test_small_random_cases_are_near_the_optimum():
    rng = random.Random(12)
    ratios = []
    for _ in range(150):
        ranks, m = rng.choice([(2, 2), (2, 4), (3, 2), (3, 3), (4, 2)])
        counts = random_counts(rng, ranks, m)
        best = optimum(counts)
        got = max(assigned_loads(counts, balance_assignment(counts)))
        ratios.append(got / best if best else 1.0)
    assert max(ratios) <= 1.1
    assert sum(r == 1.0 for r in ratios) >= 0.9 * len(ratios)


def test_packs_stay_home_unless_moving_them_lowers_the_maximum():
    # Already balanced: nothing moves.
    assert packs_moved(balance_assignment([[10, 0], [0, 10]])) == 0
    # Balancing could only reach the same maximum (5846): nothing moves for nothing.
    assert packs_moved(balance_assignment([[2109, 1036, 1110, 1591], [2664, 555, 703, 1702]])) == 0
    assert packs_moved(balance_assignment([[0, 0], [0, 0]])) == 0
    # Two heavy packs on one rank: one crosses over and one light pack comes back.
    assignment = balance_assignment([[10, 10], [0, 0]])
    assert packs_moved(assignment) == 2
    assert assigned_loads([[10, 10], [0, 0]], assignment) == [10, 10]
    # Rank 0 is already at the optimum (its one pack of 100) and keeps all it
    # has; rank 1 trades two of its packs for two of rank 2's.
    counts = [[100, 0, 0, 0], [40, 40, 40, 40], [0, 0, 0, 0]]
    assignment = balance_assignment(counts)
    assert assignment[0] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert packs_moved(assignment) == 4
    assert assigned_loads(counts, assignment) == [100, 80, 80]


def test_invalid_counts_are_named():
    with pytest.raises(ValueError, match="rank 0 has 2, rank 1 has 1"):
        balance_assignment([[1, 2], [3]])
    with pytest.raises(ValueError, match="pack 1 of rank 0 is -5"):
        balance_assignment([[1, -5]])
    with pytest.raises(ValueError, match="at least one rank"):
        balance_assignment([])


# -- measures --------------------------------------------------------------------


def test_imbalance_is_max_over_mean():
    assert imbalance([4, 4]) == 1.0
    assert imbalance([6, 2]) == 1.5
    assert imbalance([9, 0, 0]) == 3.0
    assert imbalance([0, 0]) == 1.0
    with pytest.raises(ValueError, match="empty"):
        imbalance([])


def test_microbatch_vision_tokens_reads_the_image_grids():
    assert microbatch_vision_tokens({"image_grid_thw": None}, 2) == 0
    grids = torch.tensor([[1, 4, 6], [2, 2, 2]])
    assert microbatch_vision_tokens({"image_grid_thw": grids}, 2) == 6 + 2
    assert microbatch_vision_tokens({"image_grid_thw": grids}, 1) == 24 + 8


def test_balance_step_on_one_rank_is_the_identity():
    packs = [{"n": n} for n in (5, 0, 9)]
    out, stats = balance_step(packs, lambda p: p["n"])
    assert out == packs and all(a is b for a, b in zip(out, packs))
    assert stats == BalanceStats(imbalance_before=1.0, imbalance_after=1.0, packs_moved=0, packs=3)
    assert stats.moved_fraction == 0.0


def test_exchange_on_one_rank_reorders_to_the_assignment():
    packs = ["a", "b", "c"]
    assert exchange_packs(packs, [[(0, 2), (0, 0), (0, 1)]], rank=0) == ["c", "a", "b"]
    with pytest.raises(ValueError, match="pack 0 of rank 0 2 times"):
        exchange_packs(packs, [[(0, 0), (0, 0), (0, 2)]], rank=0)
    with pytest.raises(ValueError, match="rank 0 2 packs"):
        exchange_packs(packs, [[(0, 0), (0, 1)]], rank=0)


# -- several processes -----------------------------------------------------------


def make_packs(rank: int, m: int = 4) -> list[dict]:
    """Microbatch-like packs whose contents say where they came from and whose image load is skewed."""
    packs = []
    for i in range(m):
        generator = torch.Generator().manual_seed(1000 * rank + i)
        images = (rank + 1) * (i % 3)  # rank 1 draws twice the images of rank 0
        grids = torch.tensor([[1, 4, 8]] * images, dtype=torch.long).reshape(-1, 3)
        packs.append({
            "tokens": torch.full((2, 16), 100 * rank + i, dtype=torch.long),
            "pixel_values": torch.randn(images * 32, 12, generator=generator),
            "image_grid_thw": grids if images else None,
            "source": (rank, i),
        })
    return packs


def assert_same_pack(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


def _balance_step_worker(rank: int, world: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        vision_tokens = lambda pack: microbatch_vision_tokens(pack, 2)  # noqa: E731
        packs, stats = balance_step(make_packs(rank), vision_tokens)
        everyone = [make_packs(r) for r in range(world)]
        counts = [[vision_tokens(p) for p in row] for row in everyone]
        assignment = balance_assignment(counts)
        assert packs_moved(assignment) > 0  # the data must make the exchange do something
        assert len(packs) == len(assignment[rank])
        for got, (src, idx) in zip(packs, assignment[rank]):
            assert_same_pack(got, everyone[src][idx])
        assert stats == BalanceStats(
            imbalance([sum(row) for row in counts]),
            imbalance(assigned_loads(counts, assignment)),
            packs_moved(assignment),
            world * 4,
        )
        assert stats.imbalance_after < stats.imbalance_before
    finally:
        dist.destroy_process_group()


def _exchange_worker(rank: int, world: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        # Rank 0 keeps one pack and takes one from each other rank; rank 1
        # takes two from rank 2; rank 2 takes only rank 0's and rank 1's.
        assignment = [
            [(1, 2), (0, 1), (2, 0)],
            [(2, 2), (1, 0), (2, 1)],
            [(0, 0), (1, 1), (0, 2)],
        ]
        everyone = [make_packs(r, m=3) for r in range(world)]
        mine = make_packs(rank, m=3)
        received = exchange_packs(mine, assignment, rank)
        for got, (src, idx) in zip(received, assignment[rank]):
            assert_same_pack(got, everyone[src][idx])
            if src == rank:
                assert got is mine[idx]  # what stays is not copied
    finally:
        dist.destroy_process_group()


def run_ranks(worker, world: int, tmp_path, timeout: float = 120.0) -> None:
    """Runs worker(rank, world, store) in `world` spawned processes; fails on any error or hang."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    context = mp.start_processes(worker, args=(world, str(tmp_path / "store")), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            pytest.fail(f"{worker.__name__} on {world} processes did not finish within {timeout} s")


@pytest.mark.slow
def test_balance_step_moves_packs_intact_between_two_gloo_ranks(tmp_path):
    run_ranks(_balance_step_worker, 2, tmp_path)


@pytest.mark.slow
def test_exchange_routes_packs_among_three_gloo_ranks(tmp_path):
    run_ranks(_exchange_worker, 3, tmp_path)

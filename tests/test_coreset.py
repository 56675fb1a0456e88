"""Geometric coresets: k-center greedy and herding against brute-force loops."""

from __future__ import annotations

import math

import pytest
import torch

from baselines.coreset import herding, kcenter_greedy


def brute_force_kcenter(points: list[list[float]], k: int, first: int) -> list[int]:
    chosen = [first]
    while len(chosen) < k:
        best, best_dist = None, -1.0
        for i, p in enumerate(points):
            if i in chosen:
                continue
            dist = min(math.dist(p, points[c]) for c in chosen)
            if dist > best_dist:
                best, best_dist = i, dist
        chosen.append(best)
    return chosen


def brute_force_herding(points: list[list[float]], k: int) -> list[int]:
    d = len(points[0])
    mean = [sum(p[j] for p in points) / len(points) for j in range(d)]
    chosen: list[int] = []
    for _ in range(k):
        best, best_gap = None, math.inf
        for i in range(len(points)):
            if i in chosen:
                continue
            members = chosen + [i]
            selected_mean = [sum(points[m][j] for m in members) / len(members) for j in range(d)]
            gap = math.dist(selected_mean, mean)
            if gap < best_gap:
                best, best_gap = i, gap
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kcenter_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(60, 5, generator=g, dtype=torch.float64) * torch.rand(5, generator=g, dtype=torch.float64)
    first = seed * 7
    assert kcenter_greedy(x, 15, first).tolist() == brute_force_kcenter(x.tolist(), 15, first)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_herding_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(50, 4, generator=g, dtype=torch.float64) + torch.randn(4, generator=g, dtype=torch.float64)
    assert herding(x, 12).tolist() == brute_force_herding(x.tolist(), 12)


def test_greedy_picks_are_distinct_even_with_duplicate_points():
    x = torch.cat([torch.zeros(5, 3), torch.ones(5, 3)])  # many exact ties
    for picks in (kcenter_greedy(x, 10, 0), herding(x, 10)):
        assert sorted(picks.tolist()) == list(range(10))

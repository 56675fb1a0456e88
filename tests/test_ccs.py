"""CCS as its paper runs it: the official bin edges and counts against hand-made examples, the int() cut,
the per-rate beta, AUM's orientation, and the wiring from the method's parameters to the selection."""

from __future__ import annotations

import pytest
import torch
from test_scores import smoke_ctx

import benchmarks.kit.scoring as scoring
from benchmarks.core.registry import create_method
from benchmarks.kit.scoring import (
    CCS_PAPER_BETA,
    ccs_drop_count,
    ccs_paper_beta,
    ccs_sample,
    ccs_strata,
    select_by_scores,
)
from benchmarks.kit.subsets import class_quotas


def two_of_each_value() -> torch.Tensor:
    """The integers 0..50, two examples each (102 examples)."""
    return torch.arange(51, dtype=torch.float64).repeat_interleave(2)


def test_official_bin_edges_put_each_value_where_the_official_code_does():
    # min 0, top edge 1.0001 x 50 = 50.005, step 1.0001: bin b = [1.0001 b, 1.0001 (b+1)).
    # By hand: 0 and 1 share bin 0 (1 < 1.0001); value v >= 2 lies in bin v - 1; 50 in bin 49.
    # (Equal-width bins from min to max without the 1.0001 would give each value 0..48 its own bin
    # and put 49 and 50 together.)
    which = ccs_strata(two_of_each_value())
    values = two_of_each_value().long()
    expected = torch.where(values <= 1, 0, values - 1)
    assert torch.equal(which, expected)
    assert torch.bincount(which).tolist() == [4] + [2] * 49


@pytest.mark.parametrize("k, expected", [
    # k = 50: every bin takes floor(50 / 50) = 1, so values {0, 1} together give 1 and 49, 50 give 1 each.
    (50, {(0, 1): 1, **{(v,): 1 for v in range(2, 51)}}),
    # k = 60, bins visited smallest first (bins 1..49 of size 2 in bin order, then bin 0 of size 4):
    # while j bins are done, each takes floor((60 - j) / (50 - j)) = 1 until j = 40, where 20 / 10 = 2;
    # so bins 1..40 (values 2..41) take 1, bins 41..49 (values 42..50) take 2, and bin 0 the last 2.
    (60, {(0, 1): 2, **{(v,): 1 for v in range(2, 42)}, **{(v,): 2 for v in range(42, 51)}}),
])
def test_per_stratum_counts_match_a_hand_count(k, expected):
    scores = two_of_each_value()
    for seed in (0, 1):
        chosen = ccs_sample(scores, k, torch.Generator().manual_seed(seed))
        assert len(chosen) == len(chosen.unique()) == k
        kept = scores[chosen].long().tolist()
        assert {values: sum(kept.count(v) for v in values) for values in expected} == expected


def test_cut_is_int_beta_n_and_the_hardest_are_never_kept():
    assert ccs_drop_count(0.095, 112) == 10  # int(10.64), the official mis_num; round() would drop 11
    assert ccs_drop_count(0.3, 50_000) == 15_000 and ccs_drop_count(0.0, 7) == 0
    hard = torch.arange(10, dtype=torch.float64) + 1000  # ten far above the rest
    scores = torch.cat([two_of_each_value(), hard])
    chosen = select_by_scores(scores, 50 / 112, mode="ccs", ccs_beta=0.095, generator=torch.Generator())
    assert len(chosen) == 50 and (chosen < 102).all()
    kept = scores[chosen].long().tolist()
    assert sum(kept.count(v) for v in (0, 1)) == 1 and all(kept.count(v) == 1 for v in range(2, 51))


def test_a_low_score_is_hard_for_aum_and_bins_stay_on_the_raw_scale():
    # AUM: the hardest are the LOWEST; the strata are the official bins of the raw AUM values.
    hard = -1000 - torch.arange(10, dtype=torch.float64)
    scores = torch.cat([two_of_each_value(), hard])
    chosen = select_by_scores(scores, 50 / 112, mode="ccs", ccs_beta=0.095, generator=torch.Generator(),
                              higher_is_harder=False)
    assert (chosen < 102).all()
    kept = scores[chosen].long().tolist()
    assert sum(kept.count(v) for v in (0, 1)) == 1 and all(kept.count(v) == 1 for v in range(2, 51))


def test_pool_with_a_non_positive_maximum_keeps_every_example_in_a_bin():
    scores = -two_of_each_value() - 1  # -51 .. -1: 1.0001 x max would lie below the maximum
    assert (ccs_strata(scores) >= 0).all()
    assert len(ccs_sample(scores, 100, torch.Generator())) == 100
    assert (ccs_strata(torch.zeros(5)) == 0).all() and (ccs_strata(torch.full((5,), 2.0)) == 0).all()


@pytest.mark.parametrize("fraction, beta", [(0.1, 0.3), (0.2, 0.1), (0.3, 0.1), (0.5, 0.0), (0.7, 0.0),
                                            (0.05, 0.3), (0.25, 0.1), (0.9, 0.0)])
def test_beta_follows_the_pruning_rate(fraction, beta):
    assert ccs_paper_beta(fraction) == beta
    assert CCS_PAPER_BETA[0.9] == 0.3  # the official README's 90% setting
    method = create_method("ccs", fraction=fraction)
    assert method.hparams["ccs_beta"] == -1.0 and method.hparams["score"] == "aum"


def _crafted_aum(labels: torch.Tensor) -> torch.Tensor:
    """AUM-like scores where class 0 is the hard (low) end: class * 10 + a spread inside each class."""
    spread = torch.rand(len(labels), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return (labels.double() * 10 + spread * 9).float()


@pytest.fixture
def prepared(monkeypatch):
    """Run a method's prepare on the smoke data with crafted scores in place of proxy runs."""

    def run(name: str, **params):
        ctx = smoke_ctx()
        labels = ctx.data.train.labels
        scores = _crafted_aum(labels)
        calls = []

        def fake_compute_scores(ctx, kind, runs, epoch):
            calls.append(kind)
            return scores, {"per_run": scores[None], "cached": [True], "extra": [{}]}

        monkeypatch.setattr(scoring, "compute_scores", fake_compute_scores)
        method = create_method(name, score_runs=1, **params)
        method.ctx = ctx
        method.prepare(ctx)
        return method, scores, labels, calls

    return run


def test_ccs_method_passes_mode_and_beta_to_the_selection(prepared):
    method, scores, labels, calls = prepared("ccs", fraction=0.5, ccs_beta=0.2)
    n = len(scores)
    assert calls == ["aum"]
    lowest = torch.argsort(scores)[:ccs_drop_count(0.2, n)]  # the hardest by AUM
    kept = set(method.subset.tolist())
    assert len(kept) == n // 2 and not kept & set(lowest.tolist())  # mode ccs with beta 0.2: all dropped
    next_ones = torch.argsort(scores)[ccs_drop_count(0.2, n):ccs_drop_count(0.3, n)]
    assert kept & set(next_ones.tolist())  # ... and not more than beta (0.3 would drop these too)
    assert method.stats["ccs_beta"] == 0.2 and method.stats["score"] == "aum"
    # The default beta at 50% kept is 0 (pure stratified sampling): the very hardest can be kept.
    default, *_ = prepared("ccs", fraction=0.5)
    assert default.stats["ccs_beta"] == 0.0 and set(default.subset.tolist()) & set(lowest.tolist())


def test_ccs_method_passes_class_balance_and_score_to_the_selection(prepared):
    free, scores, labels, _ = prepared("ccs", fraction=0.5, ccs_beta=0.2)
    assert free.stats["min_class_coverage"] < 0.5  # the cut took most of class 0, the hard class
    balanced, _, _, calls = prepared("ccs", fraction=0.5, ccs_beta=0.2, class_balanced=True, score="el2n")
    assert calls == ["el2n"]
    quotas = class_quotas(labels, len(labels) // 2)
    kept = labels[balanced.subset]
    assert {c: int((kept == c).sum()) for c in quotas} == quotas
    assert balanced.stats["min_class_coverage"] == pytest.approx(1.0, abs=0.01)
    # by EL2N a HIGH score is hard: within each class the top 20% are dropped
    for c in quotas:
        members = (labels == c).nonzero().flatten()
        top = members[torch.argsort(scores[members], descending=True)[:ccs_drop_count(0.2, len(members))]]
        assert not set(top.tolist()) & set(balanced.subset.tolist())

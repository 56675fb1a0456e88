"""Score methods (EL2N, GraNd, CCS): scores against brute force and hand computation, selection
against exhaustive sorts and hand-built CCS bins, the cache, the CLI, and one run per method."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.core.compute import ComputeMeter, flop_counter
from benchmarks.core.protocol import apply_overrides, load_protocol
from benchmarks.core.registry import create_method
from benchmarks.core.run import RunSpec, build_context, execute
from benchmarks.core.train import RunContext
from benchmarks.data import load_data
from benchmarks.errors import BenchError
from benchmarks.kit.pergrad import (
    _outer_sq_norms,
    hooked_layers,
    last_layer_grad_norms,
    per_example_grad_norms,
)
from benchmarks.kit.proxies import protocol_fingerprint
from benchmarks.kit.scoring import CCS_BINS, select_by_scores
from benchmarks.kit.subsets import class_quotas
from conftest import quiet
from methods.scores import el2n_pass

SCORE_METHODS = ["el2n", "grand", "grand-lastlayer", "ccs", "forgetting"]
CORESET_METHODS = ["kcenter", "herding"]


# -- per-example gradient norms -------------------------------------------------------------------


def brute_force_grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, params=None) -> torch.Tensor:
    """One example at a time: autograd's gradient of that example's loss, its norm over `params`."""
    model.eval()
    params = list(params if params is not None else (p for p in model.parameters() if p.requires_grad))
    norms = []
    for i in range(len(y)):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
        norms.append(torch.sqrt(sum(g.square().sum() for g in grads)))
    return torch.stack(norms)


def randomise_batchnorm(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Running statistics and affine parameters far from their defaults, so eval-mode BN matters."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=generator))
            m.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            m.weight.data.copy_(torch.randn(c, generator=generator))
            m.bias.data.copy_(torch.randn(c, generator=generator))
    return model


def conv_bn_net() -> nn.Module:
    """Convs with stride, dilation, non-square kernels, no bias; BN 2d and 1d; in-place ReLUs.

    On 8x8 inputs conv1 (T=64, d=18) and conv2 take the materialised form, conv3 (T=4, d=72) the ghost one.
    """
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(inplace=True),
        nn.Conv2d(3, 8, (3, 2), stride=2, padding=(1, 0), dilation=(1, 2), bias=False), nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.BatchNorm1d(64), nn.Linear(64, 5))


class SharedLayer(nn.Module):
    """One linear layer used twice: the per-layer hook arithmetic would be wrong, so vmap is used."""

    def __init__(self):
        super().__init__()
        self.shared, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x.flatten(1))))))


def _inputs(shape, classes, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(classes, (n,), generator=g)


@pytest.mark.parametrize("strategy", ["auto", "hooks", "vmap"])
def test_grand_equals_brute_force_on_a_conv_bn_net(strategy):
    torch.manual_seed(0)
    model = randomise_batchnorm(conv_bn_net().double(), torch.Generator().manual_seed(1))
    assert hooked_layers(model) is not None  # the hooks really cover this model
    x, y = _inputs((2, 8, 8), 5)
    model.train()  # the function must switch to eval mode itself (and restore the mode)
    got = per_example_grad_norms(model, x, y, strategy)
    assert model.training
    expected = brute_force_grad_norms(model, x, y)
    assert torch.allclose(got.double(), expected, rtol=0, atol=1e-5), (got, expected)
    assert expected.std() > 0.01  # the examples really differ


@pytest.mark.parametrize("name, shape", [("tiny-cnn", (3, 8, 8)), ("resnet18-cifar", (3, 8, 8))])
def test_grand_hooks_on_the_suite_models(name, shape):
    from benchmarks.core.models import create_model

    torch.manual_seed(0)
    model = randomise_batchnorm(create_model(name, in_chans=3, num_classes=4).double(),
                                torch.Generator().manual_seed(2))
    assert hooked_layers(model) is not None
    x, y = _inputs(shape, 4, n=2 if name.startswith("resnet") else 7)  # ResNet-18: in-place residual adds
    got = per_example_grad_norms(model, x, y, "hooks")
    assert torch.allclose(got.double(), brute_force_grad_norms(model, x, y), rtol=1e-7, atol=1e-5)


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)),
    SharedLayer()], ids=["layernorm", "shared-layer"])
def test_grand_falls_back_to_vmap_where_hooks_cannot_be_exact(model):
    torch.manual_seed(0)
    model = model.double()
    x, y = _inputs((1, 2, 3), 3)
    got = per_example_grad_norms(model, x, y, "auto")
    assert torch.allclose(got.double(), brute_force_grad_norms(model, x, y), rtol=0, atol=1e-5)


@pytest.mark.parametrize("p, d, t", [(4, 3, 50), (16, 72, 4)])  # materialised, then ghost
def test_outer_norm_forms_agree(p, d, t):
    g = torch.Generator().manual_seed(0)
    a, gr = torch.randn(5, d, t, generator=g, dtype=torch.float64), torch.randn(5, p, t, generator=g, dtype=torch.float64)
    expected = torch.stack([(gr[i] @ a[i].T).square().sum() for i in range(5)])
    assert torch.allclose(_outer_sq_norms(gr, a), expected, rtol=1e-10)


def test_grand_lastlayer_is_the_last_layer_part_of_the_gradient():
    from benchmarks.core.models import create_model

    torch.manual_seed(0)
    model = randomise_batchnorm(create_model("tiny-cnn", in_chans=3, num_classes=4).double(),
                                torch.Generator().manual_seed(3)).eval()
    x, y = _inputs((3, 8, 8), 4)
    features = model.forward_head(model.forward_features(x), pre_logits=True)
    got = last_layer_grad_norms(model.head(features), features, y)
    expected = brute_force_grad_norms(model, x, y, params=[model.head.weight, model.head.bias])
    assert torch.allclose(got.double(), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(expected, brute_force_grad_norms(model, x, y), atol=1e-3)  # it is a part only


# -- EL2N -----------------------------------------------------------------------------------------


def smoke_ctx(seed: int = 0, cache_dir=None, **overrides) -> RunContext:
    protocol = apply_overrides(load_protocol("smoke"), overrides)
    data = load_data(protocol.dataset, None, protocol.data_kwargs)
    return RunContext(protocol, data, torch.device("cpu"), ComputeMeter(), seed=seed, log=quiet, cache_dir=cache_dir)


def test_el2n_matches_a_hand_computation_in_eval_mode_without_augmentation():
    ctx = smoke_ctx(eval_batch_size=100)  # several batches
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(72, 4))
    randomise_batchnorm(model, torch.Generator().manual_seed(4))
    model.train()  # el2n_pass must use the running statistics, not the batch's
    scores = el2n_pass(model, ctx)
    model.eval()
    split = ctx.data.train
    for i in [0, 1, 17, 500, len(split) - 1]:
        with torch.no_grad():
            logits = model(split.normalize(split.images[i:i + 1]))[0].tolist()  # the raw, un-flipped image
        exps = [math.exp(v) for v in logits]
        probs = [e / sum(exps) for e in exps]
        label = int(split.labels[i])
        expected = math.sqrt(sum((p - (1.0 if c == label else 0.0)) ** 2 for c, p in enumerate(probs)))
        assert scores[i].item() == pytest.approx(expected, abs=1e-5)


# -- selection ------------------------------------------------------------------------------------


def _distinct_scores(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).double() / n + 0.25


@pytest.mark.parametrize("n", [7, 100, 1001])
@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.37, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("mode", ["hardest", "easiest", "ccs"])
def test_selection_keeps_exactly_round_fraction_n(n, fraction, mode):
    scores = _distinct_scores(n)
    labels = torch.arange(n) % 3
    beta = 0.3 if fraction <= 0.6 else 0.0
    k = max(1, round(fraction * n))
    for balanced in (False, True):
        chosen = select_by_scores(scores, fraction, mode=mode, ccs_beta=beta, labels=labels if balanced else None,
                                  generator=torch.Generator().manual_seed(1))
        assert len(chosen) == k and len(chosen.unique()) == k
        if balanced:
            quotas = class_quotas(labels, k)
            assert {c: int((labels[chosen] == c).sum()) for c in quotas} == quotas


@pytest.mark.parametrize("offset", [0.0, 0.1, 0.25])
def test_hardest_easiest_and_offset_pick_what_an_exhaustive_sort_picks(offset):
    n, fraction = 200, 0.3
    scores = _distinct_scores(n, seed=3)
    k, skip = round(fraction * n), round(offset * n)
    by_score = sorted(range(n), key=lambda i: -scores[i].item())
    hardest = select_by_scores(scores, fraction, mode="hardest", offset=offset, generator=torch.Generator())
    assert hardest.tolist() == sorted(by_score[skip:skip + k])
    easiest = select_by_scores(scores, fraction, mode="easiest", generator=torch.Generator())
    assert easiest.tolist() == sorted(by_score[-k:])
    labels = torch.arange(n) % 4  # class balanced: the same within each class
    balanced = select_by_scores(scores, fraction, mode="hardest", offset=offset, labels=labels,
                                generator=torch.Generator())
    for c, quota in class_quotas(labels, k).items():
        members = sorted((i for i in range(n) if labels[i] == c), key=lambda i: -scores[i].item())
        c_skip = round(offset * len(members))
        assert sorted(i for i in balanced.tolist() if labels[i] == c) == sorted(members[c_skip:c_skip + quota])


def test_ties_are_broken_at_random_not_by_index():
    scores = torch.zeros(1000)  # all tied: a stable sort by index would keep 0..99
    picks = [select_by_scores(scores, 0.1, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    assert not torch.equal(picks[0], picks[1]) and picks[0].tolist() != list(range(100))


def ccs_case():
    """50 bins of width 1 (scores b + 0.5, pool range [0.5, 49.5]), 10 bins of 2 and 40 bins of 30,
    plus 80 'hardest' examples far above. Returns (scores, bin of each pool example or -1 for hard)."""
    small, large, hard = 2, 30, 80
    scores, bins = [], []
    for b in range(CCS_BINS):
        count = small if b % 5 == 0 else large
        scores += [b + 0.5] * count
        bins += [b] * count
    scores += [1000.0 + i for i in range(hard)]
    bins += [-1] * hard
    return torch.tensor(scores, dtype=torch.float64), torch.tensor(bins)


@pytest.mark.parametrize("k, per_large", [(420, {10}), (425, {10, 11})])
def test_ccs_fills_small_bins_whole_spreads_the_rest_and_never_keeps_the_hardest(k, per_large):
    scores, bins = ccs_case()
    n = len(scores)
    counts = torch.bincount(bins[bins >= 0], minlength=CCS_BINS)
    picks_by_seed = []
    for seed in (0, 1):
        chosen = select_by_scores(scores, k / n, mode="ccs", ccs_beta=80 / n,
                                  generator=torch.Generator().manual_seed(seed))
        assert len(chosen) == k
        assert (bins[chosen] >= 0).all()  # the hardest beta share is never selected
        per_bin = torch.bincount(bins[chosen], minlength=CCS_BINS)
        assert (per_bin[counts == 2] == 2).all()  # the 10 smallest bins are taken whole
        # the remaining budget k - 20 is spread evenly over the 40 large bins
        assert set(per_bin[counts == 30].tolist()) == per_large
        picks_by_seed.append(chosen)
    assert not torch.equal(*picks_by_seed)  # uniform at random inside a bin


def test_bad_selection_settings_are_bench_errors():
    scores = _distinct_scores(100)
    with pytest.raises(BenchError, match="offset"):
        select_by_scores(scores, 0.8, offset=0.3, generator=torch.Generator())
    with pytest.raises(BenchError, match="ccs_beta"):
        select_by_scores(scores, 0.8, mode="ccs", ccs_beta=0.3, generator=torch.Generator())
    with pytest.raises(BenchError, match="offset applies"):
        select_by_scores(scores, 0.5, mode="easiest", offset=0.1, generator=torch.Generator())


@pytest.mark.parametrize("method, params, message", [
    ("ccs", {"fraction": 0.9, "ccs_beta": 0.3}, "ccs_beta=0.3 skips the hardest 30% and fraction=0.9 keeps 90%"),
    ("ccs", {"fraction": 0.5, "ccs_beta": -0.5}, "must be in \\[0, 1\\), or -1"),
    ("el2n", {"fraction": 0.8, "offset": 0.3}, "offset=0.3 skips the hardest 30% and fraction=0.8"),
    ("grand", {"mode": "easiest", "offset": 0.1}, "offset applies to mode 'hardest' only"),
])
def test_impossible_combinations_fail_when_parameters_are_resolved(method, params, message):
    with pytest.raises(BenchError, match=message):
        create_method(method, **params)  # before any data or proxy: a sweep fails when it is loaded


def test_combinations_at_the_edge_are_accepted():
    assert create_method("ccs", fraction=0.9, ccs_beta=0.1).hparams["ccs_beta"] == 0.1
    assert create_method("el2n", fraction=0.7, offset=0.3).hparams["offset"] == 0.3


# -- the cache, the runs, the CLI -----------------------------------------------------------------


def test_cached_scores_charge_the_same_flops_and_give_consistent_selections(tmp_path):
    params = {"score_runs": 2, "score_epoch": 1}
    overrides = {"epochs": 2}
    first = execute(RunSpec("smoke", "el2n", dict(params, fraction=0.3), 0, overrides), tmp_path, log=quiet)
    second = execute(RunSpec("smoke", "el2n", dict(params, fraction=0.6), 0, overrides), tmp_path, log=quiet)
    other_seed = execute(RunSpec("smoke", "el2n", dict(params, fraction=0.6), 1, overrides), tmp_path, log=quiet)
    a, b, c = first["method_stats"], second["method_stats"], other_seed["method_stats"]
    assert not a["scores_cached"] and b["scores_cached"] and b["cached_runs"] == 2 and not c["scores_cached"]
    assert first["compute"]["selection_flops"] == second["compute"]["selection_flops"] > 0
    assert b["score_mean"] == a["score_mean"] != c["score_mean"]
    # the second run's subset is what selection from the cached scores picks
    protocol = apply_overrides(load_protocol("smoke"), overrides)
    folder = tmp_path / "cache" / "scores" / f"smoke-{protocol_fingerprint(protocol)}"
    runs = [torch.load(folder / f"el2n-epoch1-run{r}-seed0.pt", weights_only=True)["scores"] for r in range(2)]
    scores = torch.stack(runs).double().mean(0).float()
    ctx = smoke_ctx(seed=0, **overrides)
    expected = select_by_scores(scores, 0.6, generator=ctx.generator("score-selection"))
    assert b["kept"] == len(expected) == round(0.6 * 1024)
    assert b["kept_score_mean"] == pytest.approx(scores[expected].mean().item(), rel=1e-6)


@pytest.mark.parametrize("name", SCORE_METHODS + CORESET_METHODS)
def test_each_method_runs_end_to_end_with_honest_compute(tmp_path, name):
    params = {"score_epoch": 1} if name in CORESET_METHODS else {"score_runs": 2, "score_epoch": 1}
    spec = RunSpec("smoke", name, params, 0, {"epochs": 2})
    record = execute(spec, tmp_path, log=quiet)
    compute, stats = record["compute"], record["method_stats"]
    assert record["status"] == "complete" and stats["kept"] == 512
    assert compute["selection_flops"] > 0 and compute["selection_flops"] == stats["selection_flops"]
    assert compute["train_flops"] == compute["full_flops"] // 2  # budget epochs: half the data, half the steps
    assert compute["fraction"] == pytest.approx((compute["train_flops"] + compute["selection_flops"])
                                                / compute["full_flops"], rel=1e-12)
    assert compute["fraction"] == pytest.approx(0.5 + compute["selection_flops"] / compute["full_flops"])
    # The same selection again, on a context without a cache, counted from outside as it runs.
    protocol = spec.resolve().protocol
    ctx = build_context(protocol, 0, log=quiet)
    method = create_method(name, **params)
    method.ctx = ctx
    with flop_counter() as counted:
        method.prepare(ctx)
    assert compute["selection_flops"] == ctx.meter.flops["selection"] == counted.get_total_flops()


def test_subset_survives_a_checkpoint_round_trip():
    ctx = smoke_ctx(epochs=2)
    method = create_method("grand-lastlayer", score_runs=1, class_balanced=True)
    method.ctx = ctx
    method.prepare(ctx)
    restored = create_method("grand-lastlayer", score_runs=1, class_balanced=True)
    restored.load_state_dict(method.state_dict())
    assert torch.equal(restored.plan_epoch(3).indices, method.plan_epoch(0).indices)
    assert restored.summary() == method.summary()


def test_scores_cli_writes_the_averaged_scores(tmp_path):
    from benchmarks.tools.scores import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "scores.csv"
    args = parser.parse_args(["scores", "--protocol", "smoke", "--score", "el2n", "--score-runs", "2",
                              "--score-epoch", "1", "--set", "train_subset=300", "--cache-dir",
                              str(tmp_path / "cache"), "--out", str(out)])
    assert args.func(args) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "index,label,score,score_run0,score_run1,dataset_index" and len(lines) == 301
    rows = [line.split(",") for line in lines[1:]]
    for row in rows[:20]:
        assert float(row[2]) == pytest.approx((float(row[3]) + float(row[4])) / 2, rel=1e-6)
    full = load_data("synthetic", None, load_protocol("smoke").data_kwargs).train.labels
    assert all(int(full[int(row[5])]) == int(row[1]) for row in rows)
    bad = parser.parse_args(["scores", "--protocol", "smoke", "--score", "aumm", "--out", str(out)])
    with pytest.raises(BenchError, match="unknown score 'aumm'"):
        bad.func(bad)

"""GREATS's fast product forms (`products = "last"`, `sketch = d`) against the exact whole-model form and
against single-example autograd; the fidelity measure; the meter on a fast-form run; the speed tool."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.api import Step
from benchmarks.core.compute import flop_counter
from benchmarks.core.models import create_model
from benchmarks.core.protocol import apply_overrides, load_protocol
from benchmarks.core.registry import create_method
from benchmarks.core.run import RunSpec, build_context, execute
from benchmarks.kit.ghost import capture, gram, last_block, restrict, sketch_flops, sketch_gradients
from benchmarks.kit.pergrad import hooked_layers
from conftest import quiet
from methods.greats import spearman

HOLDOUT = {"holdout": 64}


def per_example_gradients(model, x, y, params):
    """[n, P]: one example at a time, autograd's gradient of its loss over `params`."""
    rows = []
    for i in range(len(y)):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def small_cnn(seed=0):
    torch.manual_seed(seed)
    model = create_model("small-cnn", in_chans=1, num_classes=10, width=4).double().eval()
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():  # statistics far from their defaults, so eval-mode BatchNorm matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    x = torch.randn(5, 1, 28, 28, generator=g, dtype=torch.float64)
    return model, x, torch.randint(10, (5,), generator=g)


def test_last_block_is_the_classifier_and_the_module_holding_the_layer_before_it():
    for name, chans, expected in [("small-cnn", 1, ["features.4.0", "features.4.1", "head"]),
                                  ("resnet18-cifar", 3, ["layer4.1.conv1", "layer4.1.bn1", "layer4.1.conv2",
                                                         "layer4.1.bn2", "fc"])]:
        model = create_model(name, in_chans=chans, num_classes=10)
        names = {m: n for n, m in model.named_modules()}
        assert [names[m] for m in last_block(model)] == expected
    flat = nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, 4))
    assert last_block(flat) == hooked_layers(flat)  # no enclosing block: every layer


def test_subset_capture_with_every_layer_is_the_exact_form_and_last_block_is_autograd_over_its_parameters():
    model, x, y = small_cnn()
    exact, _ = gram(capture(model, x, y))
    every, _ = gram(capture(model, x, y, layers=hooked_layers(model)))
    assert torch.equal(every, exact)
    subset = last_block(model)
    short, _ = gram(capture(model, x, y, layers=subset))  # the backward stops at the last block
    restricted, _ = gram(restrict(capture(model, x, y), subset))
    params = [p for m in subset for p in m.parameters()]
    grads = per_example_gradients(model, x, y, params)
    assert torch.allclose(short, grads @ grads.T, rtol=1e-9, atol=1e-12)
    assert torch.allclose(restricted, short, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(short, exact, rtol=1e-3)  # the subset really drops parameters
    with pytest.raises(ValueError, match="trainable layers of the model"):
        capture(model, x, y, layers=[nn.Linear(2, 2)])


def test_sketch_is_exact_when_it_covers_every_side_and_its_error_shrinks_with_its_dimension():
    model, x, y = small_cnn()
    captured = capture(model, x, y)
    exact, _ = gram(captured)
    widest = max(max(a.shape[1] * 9, g.shape[1]) for _, a, g in captured.factors)
    sketched, weights = sketch_gradients(captured, widest, torch.Generator().manual_seed(0))
    assert weights == 4 and torch.allclose(sketched @ sketched.T, exact, rtol=1e-10, atol=1e-12)
    errors = []
    for dim in (2, 8, 32):
        trials = []
        for seed in range(6):
            s, _ = sketch_gradients(captured, dim, torch.Generator().manual_seed(seed))
            trials.append(((s @ s.T - exact).norm() / exact.norm()).item())
        errors.append(sum(trials) / len(trials))
    assert errors[0] > errors[1] > errors[2] > 0, errors
    assert errors[2] < 0.5 * errors[0]
    same, _ = sketch_gradients(captured, 8, torch.Generator().manual_seed(3))
    again, _ = sketch_gradients(captured, 8, torch.Generator().manual_seed(3))
    assert torch.equal(same, again)  # seeded: every rank and resume draws the same sketch


def test_sketch_is_unbiased_on_average_over_draws():
    g = torch.Generator().manual_seed(1)
    layer = nn.Linear(40, 30).double()
    x = torch.randn(3, 40, generator=g, dtype=torch.float64)
    captured = capture(layer, x, torch.randint(30, (3,), generator=g))
    exact, _ = gram(captured)

    def sketched_gram(seed):
        s, _ = sketch_gradients(captured, 4, torch.Generator().manual_seed(seed))
        return s @ s.T

    mean = sum(sketched_gram(seed) for seed in range(2000)) / 2000
    assert (mean - exact).norm() < 0.1 * (sketched_gram(0) - exact).norm()


def test_sketch_flops_are_what_the_counter_measures():
    model, x, y = small_cnn()
    conv = model.features[4][0]
    captured = capture(model, x, y, layers=[conv])
    _, a, g = captured.factors[0]
    n, p, t = g.shape[0], g.shape[1], g.flatten(2).shape[2]
    with flop_counter() as counter:
        sketch_gradients(captured, 8, torch.Generator().manual_seed(0))
    assert counter.get_total_flops() == 2 * sketch_flops(n, t, a.shape[1] * 9, p, 8)


# -- the method: fidelity, and a run on the meter ----------------------------------------------------


def smoke_context(**overrides):
    return build_context(apply_overrides(load_protocol("smoke"), dict(HOLDOUT, **overrides)), 0, log=quiet)


def candidates(ctx, n=128):
    order = torch.randperm(ctx.num_train, generator=torch.Generator().manual_seed(0))[:n]
    return next(iter(ctx.data.train.batches(order, n)))


def method(ctx, **params):
    m = create_method("greats", **params)
    m.setup(ctx)
    return m


STEP = Step(epoch=0, step=3, lr=0.05, progress=0.1, autocast=nullcontext)


def test_fast_form_covering_every_layer_chooses_exactly_as_the_exact_form():
    ctx = smoke_context()
    batch = candidates(ctx)
    flat = nn.Sequential(nn.Flatten(), nn.Linear(batch.x[0].numel(), 7), nn.Tanh(), nn.Linear(7, 4))  # last block: all
    report = method(ctx, products="last").fidelity(batch, flat, STEP)
    assert report["overlap"] == 1 and report["spearman"] == pytest.approx(1, abs=1e-12)
    assert report["gain_fast"] == report["gain_exact"]
    sketch = method(ctx, sketch=10_000).fidelity(batch, flat, STEP)  # wider than every side: exact products
    assert sketch["overlap"] == 1 and sketch["gain_fast"] == pytest.approx(sketch["gain_exact"], rel=1e-5)


def test_fidelity_of_a_narrow_form_is_measured_against_the_exact_gain():
    ctx = smoke_context()
    model = ctx.new_model("main")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch, greats = candidates(ctx), method(ctx, products="last", sketch=2)
    report = greats.fidelity(batch, model, STEP)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    kept_exact, kept_fast = report["kept_exact"], report["kept_fast"]
    assert len(kept_exact) == len(kept_fast) == report["k"] == 64
    assert report["overlap"] == len(set(kept_exact) & set(kept_fast)) / 64 < 1  # a narrow sketch differs
    # both gains by brute force: single-example autograd over every parameter, eval-mode BatchNorm
    model.eval()
    grads = per_example_gradients(model, batch.x, batch.y, list(model.parameters()))
    val_x, val_y = greats.validation_batch(STEP.step)
    g_val = per_example_gradients(model, val_x, val_y, list(model.parameters())).mean(0)
    model.train()
    values, pairs = (grads @ g_val).double(), (grads @ grads.T).double()
    for kept, gain in ((kept_exact, report["gain_exact"]), (kept_fast, report["gain_fast"])):
        s = torch.tensor(kept)
        by_hand = STEP.lr * values[s].sum() - STEP.lr ** 2 * (pairs[s][:, s].sum() - pairs[s, s].sum()) / 2
        assert gain == pytest.approx(float(by_hand), rel=1e-4)
    assert 0.5 < report["spearman"] < 1


def test_spearman_against_a_hand_computed_value():
    assert spearman(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 30.0, 20.0, 40.0])) == \
        pytest.approx(1 - 6 * (0 + 1 + 1 + 0) / (4 * 15))
    assert spearman(torch.arange(5.0), -torch.arange(5.0)) == pytest.approx(-1)


@pytest.mark.parametrize("params", [{"products": "last"}, {"sketch": 4}, {"products": "last", "sketch": 4}])
def test_meter_equals_a_flop_counter_count_of_a_fast_form_run(tmp_path, params):
    with flop_counter() as whole_run:
        record = execute(RunSpec("smoke", "greats", params, 0, dict(HOLDOUT, epochs=1)), tmp_path, log=quiet)
    compute = record["compute"]
    metered = compute["train_flops"] + compute["selection_flops"] + compute["eval_flops"]
    assert metered == pytest.approx(whole_run.get_total_flops(), rel=0.01)
    assert compute["selection_flops"] > 0


def test_speed_tool_runs_tiny(tmp_path):
    from benchmarks.tools import greats_speed

    out, perf = tmp_path / "speed.json", tmp_path / "perf.json"
    perf.write_text(json.dumps({"harness_step_over_bare": 1.01}))
    assert greats_speed.main(["--tiny", "--out", str(out), "--merge-into", str(perf)]) == 0
    result = json.loads(out.read_text())
    merged = json.loads(perf.read_text())  # perf.json keeps what it held and gains every form's step ratio
    assert merged == {"harness_step_over_bare": 1.01,
                      **{f"greats_step_over_plain/{name}/{form}": float(f"{row['step_over_plain']:.4g}")
                         for name, setup in result["setups"].items() for form, row in setup["forms"].items()}}
    for setup in result["setups"].values():
        assert set(setup["forms"]) >= {"all", "last", "sketch"}
        for form in setup["forms"].values():
            assert form["step_over_plain"] > 0 and form["flops_over_plain"] > 0
            assert 0 <= form["fidelity"]["overlap"] <= 1
        assert setup["forms"]["all"]["fidelity"]["overlap"] == 1
        breakdown = setup["breakdown"]
        assert breakdown["run_over_full"] == pytest.approx(2 * setup["forms"]["all"]["flops_over_plain"], rel=1e-6)

"""The harness contract every kind of method builds on: measured compute over the whole registry,
method-built models with an after-step hook, views, protocol-defined evaluation, the held-out split,
online selection's step and BatchNorm rules, saved models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from benchmarks.api import Method, Selection, Traits
from benchmarks.core import train
from benchmarks.core.compute import flop_counter
from benchmarks.core.evaluation import accuracy
from benchmarks.core.models import embed
from benchmarks.core.optim import lr_at
from benchmarks.core.protocol import apply_overrides, load_protocol
from benchmarks.core.registry import list_methods, register
from benchmarks.core.run import RunSpec, build_context, execute
from benchmarks.core.saved_models import load_saved_model
from benchmarks.errors import BenchError
from conftest import quiet

SMOKE_PROTOCOL = {"supervised": "smoke", "self-supervised": "smoke-ssl"}  # where each kind of method runs
GROUPS_PROTOCOL = "smoke-groups"  # where a method that reads training group labels (an oracle) runs
# Parameters that only make a smoke run long: JTT's paper default lambda_up = 100 repeats its error set
# (half of smoke's data after one epoch) 100 times per epoch, a 50x longer run for the same identity.
CHEAP_PARAMS = {"jtt": {"lambda_up": 3}}
MOMENTUM = 0.9


class TwoViewModel(torch.nn.Module):
    """An online classifier with a predictor head, and a moving-average copy of it that gets no gradient."""

    def __init__(self, online: torch.nn.Module):
        super().__init__()
        self.online = online
        self.predictor = torch.nn.Linear(online.num_features, online.num_features)
        self.target = copy.deepcopy(online).requires_grad_(False)


@register("test-two-view")
class TwoViewEMA(Method):
    """Test-only: cross-entropy on one view plus a consistency loss to an EMA target on a second view."""

    traits = Traits(augment_batches=False)  # it draws its own views from batch.raw

    def build_model(self, ctx):
        return TwoViewModel(ctx.new_model("main"))

    def backbone(self, model):
        return model.online

    def objective(self, model, batch):
        first, second = batch.view(), batch.view()
        logits = model.online(first)
        prediction = model.predictor(embed(model.online, first))
        with torch.no_grad():
            target = embed(model.target, second)
        consistency = 2 - 2 * F.cosine_similarity(prediction, target, dim=1)
        return F.cross_entropy(logits, batch.y, reduction="none") + consistency, logits

    @torch.no_grad()
    def after_step(self, model, step):  # the parameters move; BatchNorm statistics come from the target's forward
        for online, target in zip(model.online.parameters(), model.target.parameters()):
            target.mul_(MOMENTUM).add_(online, alpha=1 - MOMENTUM)


TWO_VIEW_SET = {"view_augment": [{"name": "random-resized-crop", "scale": [0.5, 1.0]}, "flip", "gaussian-blur"],
                "evaluation": "linear-probe", "probe_epochs": 3, "epochs": 2,
                "data_kwargs": {"n_train": 1536, "n_test": 512, "num_classes": 4, "size": 8}}


# -- measured compute over the whole registry ----------------------------------------------------


@pytest.mark.parametrize("name", sorted(n for n in list_methods() if not n.startswith("test-")) + ["test-two-view"])
def test_meter_equals_a_flop_counter_count_of_the_whole_run(tmp_path, name):
    kind = list_methods()[name].traits.kind
    assert kind in SMOKE_PROTOCOL, f"no smoke protocol for {kind} methods: add one to SMOKE_PROTOCOL"
    overrides = TWO_VIEW_SET if name == "test-two-view" else {}
    protocol = GROUPS_PROTOCOL if list_methods()[name].traits.reads_train_groups else SMOKE_PROTOCOL[kind]
    if list_methods()[name].traits.needs_holdout:
        overrides = dict(overrides, holdout=64)
    with flop_counter() as whole_run:
        record = execute(RunSpec(protocol, name, CHEAP_PARAMS.get(name, {}), 0, overrides), tmp_path, log=quiet)
    compute = record["compute"]
    metered = compute["train_flops"] + compute["selection_flops"] + compute["eval_flops"]
    assert metered == pytest.approx(whole_run.get_total_flops(), rel=0.01)
    assert compute["train_flops"] > 0 and compute["eval_flops"] > 0


# -- a method-built model, two views, an EMA target, a linear probe, resumed --------------------


def run_two_view(out, **kwargs):
    return execute(RunSpec("smoke", "test-two-view", {}, 3, TWO_VIEW_SET), out, log=quiet, **kwargs)


def same_run(a: dict, b: dict) -> None:
    assert a["metrics"] == b["metrics"] and a["compute"] == b["compute"]
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in a["curve"]]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in b["curve"]]


def same_weights(out_a, out_b, rid: str) -> None:
    a, b = load_saved_model(rid, out_a).model.state_dict(), load_saved_model(rid, out_b).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_view_method_trains_its_own_heads_and_an_ema_target_with_a_linear_probe(tmp_path):
    record = run_two_view(tmp_path, save=True)
    saved = load_saved_model(record["run_id"], tmp_path)
    model = saved.model
    assert {"online", "predictor", "target"} <= {name for name, _ in model.named_children()}
    assert saved.backbone is model.online  # the evaluation reads the online network
    assert all(not p.requires_grad for p in model.target.parameters())
    fresh = TwoViewModel(build_context(apply_overrides(load_protocol("smoke"), TWO_VIEW_SET), 3).new_model("main"))
    # The optimiser trained the predictor head; the target moved (EMA) without being trained.
    assert not torch.equal(model.predictor.weight, fresh.predictor.weight)
    assert not torch.equal(model.target.head.weight, fresh.target.head.weight)
    assert not torch.equal(model.target.head.weight, model.online.head.weight)
    metrics = record["metrics"]
    assert "probe_train_acc" in metrics and 0.25 < metrics["test_acc"] <= 1.0  # 4 classes: better than chance
    assert record["compute"]["eval_flops"] > 0


def test_ema_target_follows_the_online_network_and_gets_no_gradient():
    ctx = build_context(apply_overrides(load_protocol("smoke"), dict(TWO_VIEW_SET, epochs=1)), 0, log=quiet)
    method = TwoViewEMA()
    method.ctx = ctx
    model = method.build_model(ctx)
    trainer = train.Trainer(ctx, model, method, evaluate=False)
    batch = next(iter(ctx.data.train.batches(torch.arange(64), 64, views=_views(ctx))))
    before = {k: v.clone() for k, v in model.target.named_parameters()}
    trainer._step(batch, train.Step(0, 0, 0.1, 0.0, trainer.autocast))
    assert all(p.grad is None for p in model.target.parameters())
    online = dict(model.online.named_parameters())
    for key, value in model.target.named_parameters():
        assert torch.allclose(value, MOMENTUM * before[key] + (1 - MOMENTUM) * online[key], atol=1e-6)
    assert not torch.equal(before["head.weight"], model.target.head.weight)


def _views(ctx):
    from benchmarks.core.augment import Views

    return Views(ctx.data.train.normalize, torch.Generator().manual_seed(0), ctx.protocol.view_augment)


def test_two_view_run_stopped_mid_epoch_resumes_bit_identical(tmp_path, monkeypatch):
    reference = run_two_view(tmp_path / "ref", save=True)
    original = TwoViewEMA.after_step

    def stop_in_the_second_epoch(self, model, step):
        original(self, model, step)
        if step.step == 30:  # 24 steps per epoch: step 30 is inside epoch 2
            train.STOP.set()

    monkeypatch.setattr(TwoViewEMA, "after_step", stop_in_the_second_epoch)
    try:
        with pytest.raises(train.Preempted, match="in epoch 2 after step 6"):
            run_two_view(tmp_path / "cut", save=True)
    finally:
        train.STOP.clear()
    monkeypatch.setattr(TwoViewEMA, "after_step", original)
    resumed = run_two_view(tmp_path / "cut", save=True)
    same_run(resumed, reference)
    same_weights(tmp_path / "ref", tmp_path / "cut", reference["run_id"])


def test_two_view_run_killed_resumes_bit_identical(tmp_path, monkeypatch):
    reference = run_two_view(tmp_path / "ref", save=True)
    original = TwoViewEMA.objective

    def die_in_the_second_epoch(self, model, batch):
        if not hasattr(self, "calls"):
            self.calls = 0
        self.calls += 1
        if self.calls == 30:
            raise KeyboardInterrupt  # like SIGKILL: no failed record; the epoch-1 checkpoint stays
        return original(self, model, batch)

    monkeypatch.setattr(TwoViewEMA, "objective", die_in_the_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_two_view(tmp_path / "cut", save=True)
    monkeypatch.setattr(TwoViewEMA, "objective", original)
    resumed = run_two_view(tmp_path / "cut", save=True)
    same_run(resumed, reference)
    same_weights(tmp_path / "ref", tmp_path / "cut", reference["run_id"])


def test_a_method_as_reference_costs_exactly_one(tmp_path):
    record = execute(RunSpec("smoke", "test-two-view", {}, 0, dict(TWO_VIEW_SET, reference="test-two-view")),
                     tmp_path, log=quiet)
    assert record["compute"]["fraction"] == 1.0 and record["compute"]["reference"] == "test-two-view"
    full = execute(RunSpec("smoke", "full", {}, 0, {k: v for k, v in TWO_VIEW_SET.items()
                                                   if k not in ("view_augment",)}), tmp_path, log=quiet)
    # Two views, a predictor and a target forward cost more than one supervised step.
    assert full["compute"]["full_flops"] < record["compute"]["full_flops"]


def test_unknown_or_unfitting_reference_is_a_bench_error():
    with pytest.raises(BenchError, match="unknown method 'nope'"):
        RunSpec("smoke", "full", {}, 0, {"reference": "nope"}).resolve()
    with pytest.raises(BenchError, match="supervised"):
        RunSpec("smoke", "full", {}, 0, {"task": "self-supervised"}).resolve()


# -- the held-out split ----------------------------------------------------------------------------


def test_holdout_is_disjoint_seeded_and_recorded(tmp_path):
    protocol = apply_overrides(load_protocol("smoke"), {"holdout": 100})
    a, b, c = build_context(protocol, 0), build_context(protocol, 0), build_context(protocol, 1)
    assert len(a.data.holdout) == 100 and a.num_train == 1024 - 100
    assert torch.equal(a.data.holdout_origin, b.data.holdout_origin)  # stable for a seed
    assert not torch.equal(a.data.holdout_origin, c.data.holdout_origin)  # drawn from the seed
    both = torch.cat([a.data.holdout_origin, a.data.train_origin])
    assert len(both.unique()) == 1024  # disjoint, and together the whole training split
    full = load_protocol("smoke")
    from benchmarks.data import load_data

    images = load_data("synthetic", None, full.data_kwargs).train.images
    assert torch.equal(a.data.holdout.images, images[a.data.holdout_origin])
    assert torch.equal(a.data.train.images, images[a.data.train_origin])
    assert len(build_context(apply_overrides(full, {"holdout": 0.1}), 0).data.holdout) == round(0.1 * 1024)
    record = execute(RunSpec("smoke", "full", {}, 0, {"holdout": 100, "epochs": 1}), tmp_path, log=quiet)
    assert record["n_train"] == 924 and record["holdout"]["size"] == 100
    assert record["compute"]["train_examples"] == 924  # the held-out examples are never trained on


@pytest.mark.parametrize("value", [1.5, -1, 1024, float("nan")])
def test_bad_holdout_is_refused(value):
    with pytest.raises(BenchError, match="holdout"):
        build_context(apply_overrides(load_protocol("smoke"), {"holdout": value}), 0)


# -- online selection: the step, BatchNorm, the iterations budget ----------------------------------


@register("test-select-spy")
class SelectSpy(Method):
    """Test-only: keeps the lower-loss half of a 2B candidate batch after a train-mode forward."""

    traits = Traits(candidate_factor=2)

    def __init__(self, **params):
        super().__init__(**params)
        self.steps, self.bn_checks = [], []

    def select(self, batch, model, step):
        self.steps.append(step)
        bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        self.before = bn.running_mean.clone()
        with step.autocast(), torch.no_grad():
            loss = F.cross_entropy(model(batch.x), batch.y, reduction="none")  # train mode: batch statistics
        self.bn = bn
        return Selection(keep=loss.argsort()[: len(loss) // 2])

    def objective(self, model, batch):
        self.bn_checks.append(torch.equal(self.bn.running_mean, self.before))
        logits = model(batch.x)
        return F.cross_entropy(logits, batch.y, reduction="none"), logits


def test_select_gets_the_step_and_leaves_batchnorm_statistics_alone():
    ctx = build_context(apply_overrides(load_protocol("smoke"), {"epochs": 1}), 0, log=quiet)
    method = SelectSpy()
    method.ctx = ctx
    train.Trainer(ctx, ctx.new_model("main"), method, evaluate=False).fit()
    assert len(method.steps) == 8 and all(method.bn_checks)  # 1024 / (2 x 64) candidate batches
    assert [s.step for s in method.steps] == list(range(8))
    assert all(s.lr == pytest.approx(lr_at(ctx.protocol, i / 8, 1)) for i, s in enumerate(method.steps))
    assert ctx.meter.flops["selection"] > 0  # the candidate forward is charged as selection


@pytest.mark.parametrize("budget", ["epochs", "iterations"])
def test_online_method_steps_under_each_budget(tmp_path, budget):
    full = execute(RunSpec("smoke", "full", {}, 0, {"budget": budget, "epochs": 1}), tmp_path, log=quiet)
    online = execute(RunSpec("smoke", "test-select-spy", {}, 0, {"budget": budget, "epochs": 1}), tmp_path, log=quiet)
    steps_full, steps_online = full["curve"][-1]["step"], online["curve"][-1]["step"]
    assert steps_online == (steps_full if budget == "iterations" else steps_full // 2)
    # Each step trains on B = 64 of 2B candidates: under "iterations" the same training FLOPs as full.
    assert online["compute"]["train_flops"] == full["compute"]["train_flops"] * steps_online // steps_full
    assert online["compute"]["selection_flops"] > 0


# -- saved models ----------------------------------------------------------------------------------


def test_saved_model_reproduces_its_recorded_test_accuracy(tmp_path):
    record = execute(RunSpec("smoke", "full", {}, 2, {"epochs": 2}), tmp_path, log=quiet, save=True)
    saved = load_saved_model(record["run_id"], tmp_path)
    assert saved.info["run_id"] == record["run_id"] and record["model_path"].endswith(f"{record['run_id']}.pt")
    ctx = build_context(apply_overrides(load_protocol("smoke"), {"epochs": 2}), 2, log=quiet)
    assert accuracy(saved.model, ctx)["test_acc"] == record["metrics"]["test_acc"]
    with pytest.raises(BenchError, match="no saved model for run 'nope'"):
        load_saved_model("nope", tmp_path)


def test_a_complete_run_without_its_model_runs_again_when_asked_to_save(tmp_path):
    spec = RunSpec("smoke", "full", {}, 0, {"epochs": 1})
    first = execute(spec, tmp_path, log=quiet)
    messages = []
    again = execute(spec, tmp_path, log=messages.append, save=True)
    assert not any(m.startswith("skip") for m in messages) and "model_path" in again
    assert again["metrics"] == first["metrics"]


# -- augmentations ---------------------------------------------------------------------------------


def _images(b=8, c=3, h=12, w=10, seed=0):
    return torch.randint(0, 256, (b, c, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _apply(specs, images, seed=0):
    from benchmarks.core.augment import apply_pipeline, parse_pipeline

    return apply_pipeline(images, parse_pipeline(specs), torch.Generator().manual_seed(seed))


ALL_OPS = ["crop", "flip", "random-resized-crop", "color-jitter", "grayscale", "gaussian-blur", "solarize"]


@pytest.mark.parametrize("name", ALL_OPS)
def test_each_augmentation_is_seeded_shaped_and_in_range(name):
    images = _images()
    a, b, c = _apply([name], images, 1), _apply([name], images, 1), _apply([name], images, 2)
    assert torch.equal(a, b) and a.shape == images.shape
    assert float(a.min()) >= 0 and float(a.max()) <= 255
    if name != "grayscale":  # p = 0.2: eight images may all escape it under one seed
        assert not torch.equal(a, c)


@pytest.mark.parametrize("name", ["flip", "color-jitter", "grayscale", "gaussian-blur", "solarize"])
def test_probability_zero_is_the_identity(name):
    images = _images()
    assert torch.equal(_apply([{"name": name, "p": 0.0}], images).to(torch.uint8), images)


def test_augmentations_against_hand_computations():
    images = _images()
    x = images.float()
    assert torch.equal(_apply([{"name": "solarize", "p": 1.0, "threshold": 100}], images),
                       torch.where(x >= 100, 255 - x, x))
    gray = _apply([{"name": "grayscale", "p": 1.0}], images)
    assert torch.allclose(gray[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2], atol=1e-4)
    assert torch.equal(gray[:, 0], gray[:, 1])
    same = _apply([{"name": "random-resized-crop", "scale": [1.0, 1.0], "ratio": [1.0, 1.0]}], images)
    assert torch.allclose(same, x, atol=1e-3)  # the whole image resized to itself
    # brightness alone: x * b, b drawn as the op draws it (p, then the three factors, then hue)
    out = _apply([{"name": "color-jitter", "p": 1.0, "brightness": 0.4, "contrast": 0.0, "saturation": 0.0,
                   "hue": 0.0}], images, seed=5)
    replay = torch.Generator().manual_seed(5)
    torch.rand(8, generator=replay, dtype=torch.float64)  # p
    factor = (0.6 + 0.8 * torch.rand(8, generator=replay, dtype=torch.float64)).float()
    assert torch.allclose(out, (x * factor[:, None, None, None]).clamp(0, 255), atol=1e-3)


def test_blur_equals_a_per_example_convolution():
    images = _images(b=4, c=1, h=20, w=20)
    out = _apply([{"name": "gaussian-blur", "p": 1.0, "sigma": [0.5, 1.5]}], images, seed=3)
    replay = torch.Generator().manual_seed(3)
    torch.rand(4, generator=replay, dtype=torch.float64)
    sigmas = (0.5 + torch.rand(4, generator=replay, dtype=torch.float64)).float()
    offsets = torch.arange(-1, 2, dtype=torch.float32)  # radius 1: a tenth of 20 pixels, halved
    for i in range(4):
        k = torch.exp(-0.5 * (offsets / sigmas[i]) ** 2)
        k = k / k.sum()
        x = F.pad(images[i:i + 1].float(), (1, 1, 1, 1), mode="reflect")
        expected = F.conv2d(x, (k[:, None] * k[None, :])[None, None])
        assert torch.allclose(out[i:i + 1], expected, atol=1e-3)


@pytest.mark.parametrize("spec, message", [
    (["rotate"], "unknown augmentation 'rotate'"),
    ([{"name": "flip", "q": 1}], "has no parameter 'q'"),
    ([{"name": "flip", "p": 2}], "'p' must be in [0, 1]"),
    ([{"name": "random-resized-crop", "scale": [0.9, 0.1]}], "pair [low, high]"),
    ([3], "a name or a table"),
])
def test_bad_augmentation_specs_name_the_problem(spec, message):
    with pytest.raises(BenchError) as info:
        apply_overrides(load_protocol("smoke"), {"view_augment": spec})
    assert message in str(info.value) and "view_augment" in str(info.value)


def test_a_crop_padding_given_in_the_pipeline_wins_over_the_protocols():
    from benchmarks.core.augment import parse_pipeline

    protocol = apply_overrides(load_protocol("smoke"), {"augment": [{"name": "crop", "padding": 2}],
                                                        "crop_padding": 4})
    [(_, params)] = parse_pipeline(protocol.augment, "augment", protocol.augment_defaults())
    assert params == {"padding": 2}
    [(_, params)] = parse_pipeline(["crop"], "augment", protocol.augment_defaults())
    assert params == {"padding": 4}


def test_views_are_drawn_from_the_runs_generator():
    ctx = build_context(apply_overrides(load_protocol("smoke"), TWO_VIEW_SET), 0, log=quiet)
    batch = next(iter(ctx.data.train.batches(torch.arange(16), 16, views=_views(ctx))))
    first, second = batch.view(), batch.view()
    assert first.shape == batch.x.shape and not torch.equal(first, second)
    again = next(iter(ctx.data.train.batches(torch.arange(16), 16, views=_views(ctx))))
    assert torch.equal(again.view(), first)  # the same generator state gives the same views

"""The self-supervised side: BYOL (baselines/byol.py, benchmarks/kit/ssl.py), RELA (methods/rela.py), priors
(benchmarks/kit/priors.py), the linear probe, and the toy study (benchmarks/tools/toy.py)."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.core import train
from benchmarks.core.augment import Views
from benchmarks.core.compute import flop_counter
from benchmarks.core.evaluation import linear_probe
from benchmarks.core.models import embed
from benchmarks.core.protocol import apply_overrides, load_protocol
from benchmarks.core.registry import create_method
from benchmarks.core.run import RunSpec, build_context, execute
from benchmarks.core.saved_models import load_saved_model
from benchmarks.data import DataBundle
from benchmarks.data.splits import TensorSplit
from benchmarks.errors import BenchError
from benchmarks.kit.priors import load_prior
from benchmarks.kit.proxies import embedding_pass
from benchmarks.kit.ssl import byol_loss, ema_update, momentum_at
from benchmarks.tools.toy import ToyConfig, run_study
from conftest import quiet
from methods import rela as rela_module
from methods.rela import PlateauSwitch, pca_targets, rela_steps

STEPS_PER_EPOCH = 16  # smoke-ssl: 1024 examples, batch 64


def ssl_context(seed: int = 0, **overrides):
    return build_context(apply_overrides(load_protocol("smoke-ssl"), overrides), seed, log=quiet)


def first_batch(ctx, size: int = 64):
    views = Views(ctx.data.train.normalize, torch.Generator().manual_seed(0), ctx.protocol.view_augment)
    return next(iter(ctx.data.train.batches(torch.arange(size), size, views=views)))


def attach(name: str, ctx, **params):
    method = create_method(name, **params)
    method.ctx = ctx
    return method


def run(method: str, out, seed: int = 0, params: dict | None = None, **overrides) -> dict:
    return execute(RunSpec("smoke-ssl", method, params or {}, seed, overrides), out, log=quiet)


# -- RELA-D: PCA and z-score -----------------------------------------------------------------------


def numpy_pca_targets(x: np.ndarray, k: int) -> np.ndarray:
    """The reference: covariance eigenvectors, descending, largest loading positive, population z-score."""
    centered = x - x.mean(0)
    values, vectors = np.linalg.eigh(np.cov(x, rowvar=False))
    components = vectors[:, np.argsort(values)[::-1][:k]]
    components *= np.sign(components[np.abs(components).argmax(0), np.arange(k)])
    reduced = centered @ components
    return (reduced - reduced.mean(0)) / reduced.std(0)


def test_pca_targets_match_a_numpy_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 6)) @ rng.normal(size=(6, 6)) + rng.normal(size=6)
    ours = pca_targets(torch.tensor(x, dtype=torch.float32), 4).double().numpy()
    assert np.allclose(ours, numpy_pca_targets(x.astype(np.float32).astype(np.float64), 4), atol=1e-4)
    assert np.allclose(ours.mean(0), 0, atol=1e-5) and np.allclose(ours.std(0), 1, atol=1e-5)
    # Chunked products give the same targets (the PCA of a large dataset runs in chunks).
    old = rela_module.PCA_CHUNK
    try:
        rela_module.PCA_CHUNK = 7
        assert np.allclose(pca_targets(torch.tensor(x, dtype=torch.float32), 4).numpy(), ours, atol=1e-5)
    finally:
        rela_module.PCA_CHUNK = old


def test_a_component_without_variance_is_zero_not_nan():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    x[:, 3] = x[:, 0] * 2  # rank 3: the 4th component has no variance
    targets = pca_targets(x, 4)
    assert torch.isfinite(targets).all() and torch.allclose(targets[:, 3], torch.zeros(50))
    assert torch.allclose(targets[:, :3].std(0, unbiased=False), torch.ones(3), atol=1e-5)
    with pytest.raises(ValueError):
        pca_targets(x, 5)


# -- RELA-F: the lambda rule -----------------------------------------------------------------------


def test_plateau_rule_switches_at_the_analytic_step_for_a_constant_loss():
    # F stays 1 and S - F = 0.99^t after t updates; before step i the rule has seen S - F = 0.99^(i-1), so it
    # switches before the first i with exp(-0.99^(i-1)) >= 0.995.
    expected = 1 + math.ceil(math.log(-math.log(0.995)) / math.log(0.99))
    assert expected == 528
    assert rela_steps([1.0] * 2000) == expected
    assert rela_steps([1.0] * (expected - 1)) is None  # not yet switched when the sequence ends


def official_loop(losses) -> int | None:
    """The rule as the official code writes it: check rho at the start of a step, then update from old F, S."""
    fast, slow, rho = 1.0, 2.0, 0.0
    for step, loss in enumerate(losses):
        if not rho < 0.995:
            return step
        rho = math.exp(-max(slow - fast, 0) * 1)
        fast = fast * 0.999 + loss * 0.001
        slow = slow * 0.99 + fast * 0.01
    return None


def test_plateau_rule_matches_the_official_loop_on_a_falling_then_flat_loss():
    falling = [1.0 - 0.6 * min(t / 3000, 1.0) for t in range(6000)]  # falls for 3000 steps, then flat
    switch = rela_steps(falling)
    assert switch == official_loop(falling)
    assert switch > 3000  # while the loss falls, S lags F and the rule waits
    assert rela_steps([1.0] * 6000) < switch
    rule = PlateauSwitch()
    for loss in falling[:switch]:
        assert not rule.switched
        rule.update(loss)
    assert rule.switched


# -- BYOL ----------------------------------------------------------------------------------------------


def test_byol_target_is_an_ema_of_the_online_network_and_gets_no_gradient():
    ctx = ssl_context(epochs=1)
    method = attach("byol", ctx)
    model = method.build_model(ctx)
    targets = [model.target_backbone, model.target_projector]
    assert all(not p.requires_grad for t in targets for p in t.parameters())
    trainer = train.Trainer(ctx, model, method, evaluate=False)
    assert not {id(p) for t in targets for p in t.parameters()} & \
        {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer._step(first_batch(ctx), train.Step(0, 0, 1e-3, 0.0, trainer.autocast))
    assert all(p.grad is None for t in targets for p in t.parameters())
    for online_name, target_name in (("backbone", "target_backbone"), ("projector", "target_projector")):
        online = dict(getattr(model, online_name).named_parameters())
        for key, value in getattr(model, target_name).named_parameters():
            expected = 0.99 * before[f"{target_name}.{key}"] + 0.01 * online[key]
            assert torch.allclose(value, expected, atol=1e-6)
    assert not torch.equal(model.backbone.features[0][0].weight, before["backbone.features.0.0.weight"])
    assert not torch.equal(model.target_backbone.features[0][0].weight,
                           before["target_backbone.features.0.0.weight"])


def test_ema_update_and_the_cosine_momentum():
    online, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    old = target.weight.detach().clone()
    ema_update(online, target, 0.9)
    assert torch.allclose(target.weight, 0.9 * old + 0.1 * online.weight)
    assert momentum_at(0.99, "constant", 0.7) == 0.99
    assert momentum_at(0.996, "cosine", 0.0) == pytest.approx(0.996)
    assert momentum_at(0.996, "cosine", 0.5) == pytest.approx(0.998)
    assert momentum_at(0.996, "cosine", 1.0) == pytest.approx(1.0)


def test_byol_loss_is_the_symmetric_cosine_loss():
    ctx = ssl_context()
    model = attach("byol", ctx).build_model(ctx)
    batch = first_batch(ctx, 8)
    first, second = batch.view(), batch.view()
    loss = byol_loss(model, first, second)
    p = [model.predictor(model.projector(embed(model.backbone, v))) for v in (first, second)]
    z = [model.target_projector(embed(model.target_backbone, v)) for v in (first, second)]
    by_hand = [0.5 * ((1 - p[0][i] @ z[1][i] / (p[0][i].norm() * z[1][i].norm()))
                      + (1 - p[1][i] @ z[0][i] / (p[1][i].norm() * z[0][i].norm()))) for i in range(8)]
    assert torch.allclose(loss, torch.stack(by_hand), atol=1e-5)
    assert torch.allclose(byol_loss(model, second, first), loss, atol=1e-5)


def test_budget_trains_a_fresh_random_share_each_epoch(tmp_path):
    full = run("byol", tmp_path, epochs=2)
    half = run("byol", tmp_path, params={"budget": 0.5}, epochs=2)
    assert [row["examples"] for row in half["curve"]] == [512, 512]
    assert half["compute"]["fraction"] == pytest.approx(0.5) and full["compute"]["fraction"] == pytest.approx(1.0)
    # Tables and replication take full BYOL (budget 1.0) as "full data", not every BYOL row.
    from benchmarks.core.record import load_records
    from benchmarks.reporting.replicate import _is_reference_run
    from benchmarks.reporting.tables import build_sections

    records, _ = load_records(tmp_path / "runs")
    (section,) = build_sections(records)
    assert section.reference == "byol" and section.full_mean == full["metrics"]["test_acc"]
    assert [_is_reference_run(r) for r in sorted(records, key=lambda r: r["params"]["budget"])] == [False, True]
    method = attach("byol", ssl_context(), budget=0.25)
    plans = [method.plan_epoch(e).indices for e in range(2)]
    assert all(len(p) == 256 and len(p.unique()) == 256 for p in plans)
    assert not torch.equal(plans[0], plans[1])


# -- RELA ----------------------------------------------------------------------------------------------


def test_rela_trains_w_and_b():
    ctx = ssl_context(epochs=1)
    method = attach("rela", ctx)
    model = method.build_model(ctx)
    method.prepare(ctx)
    trainer = train.Trainer(ctx, model, method, evaluate=False)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert {id(model.transfer.weight), id(model.transfer.bias)} <= optimised
    before = model.transfer.weight.detach().clone(), model.transfer.bias.detach().clone()
    batch = first_batch(ctx)
    trainer.forward_backward(batch)
    assert model.transfer.weight.grad.abs().sum() > 0 and model.transfer.bias.grad.abs().sum() > 0
    trainer._step(batch, train.Step(0, 0, 1e-3, 0.0, trainer.autocast))
    assert not torch.equal(model.transfer.weight, before[0]) and not torch.equal(model.transfer.bias, before[1])


def test_random_prior_targets_are_the_pca_of_the_students_initial_features():
    ctx = ssl_context()
    method = attach("rela", ctx)
    method.build_model(ctx)
    method.prepare(ctx)
    student = ctx.new_model("main").eval()  # the student's initialisation, which the random prior copies
    with torch.no_grad():
        features = torch.cat([embed(student, b.x) for b in ctx.data.train.batches(torch.arange(1024), 256)])
    assert torch.allclose(method.targets, pca_targets(features, 16), atol=1e-4)
    assert ctx.meter.flops["selection"] > 0 and ctx.meter.flops["train"] == 0


def test_fixed_switch_epoch_charges_each_phase_its_own_measured_cost(tmp_path):
    with flop_counter() as whole_run:
        record = run("rela", tmp_path, params={"switch_epoch": 1}, epochs=2)
    compute = record["compute"]
    assert compute["train_flops"] + compute["selection_flops"] + compute["eval_flops"] == \
        pytest.approx(whole_run.get_total_flops(), rel=0.01)
    assert record["method_stats"]["switch_step"] == STEPS_PER_EPOCH
    assert record["method_stats"]["switch_epoch"] == 1
    assert [row["rela_lambda"] for row in record["curve"]] == [1.0, 0.0]
    byol = run("byol", tmp_path, epochs=2)
    byol_epoch = byol["compute"]["train_flops"] // 2
    rela_epoch = compute["train_flops"] - byol_epoch  # epoch 2 trained with BYOL's loss
    assert 0 < rela_epoch < byol_epoch  # RELA's step: two backbone passes and W; no target, no heads


def test_plateau_rule_in_a_run_switches_where_the_rule_says(tmp_path, monkeypatch):
    monkeypatch.setattr(rela_module, "SWITCH_AT", 0.5)  # switch within a smoke run (the rule itself is above)
    seen = []
    original = rela_module.RELA.objective

    def recording(self, model, batch):
        losses, logits = original(self, model, batch)
        if self.phase == "rela":
            seen.append(losses.detach().mean().item())
        return losses, logits

    monkeypatch.setattr(rela_module.RELA, "objective", recording)
    with flop_counter() as whole_run:
        record = run("rela", tmp_path, epochs=5)
    switch = record["method_stats"]["switch_step"]
    assert switch is not None and switch == len(seen) == rela_steps(seen) < 5 * STEPS_PER_EPOCH
    assert record["curve"][-1]["rela_lambda"] == 0.0
    compute = record["compute"]
    assert compute["train_flops"] + compute["selection_flops"] + compute["eval_flops"] == \
        pytest.approx(whole_run.get_total_flops(), rel=0.01)


@pytest.mark.parametrize("cache_kept", [True, False])
def test_rela_stopped_mid_run_resumes_bit_identical(tmp_path, monkeypatch, cache_kept):
    reference = run("rela", tmp_path / "ref", epochs=2)
    original = rela_module.RELA.after_step

    def stop_in_the_second_epoch(self, model, step):
        original(self, model, step)
        if step.step == STEPS_PER_EPOCH + 5:
            train.STOP.set()

    monkeypatch.setattr(rela_module.RELA, "after_step", stop_in_the_second_epoch)
    try:
        with pytest.raises(train.Preempted):
            run("rela", tmp_path / "cut", epochs=2)
    finally:
        train.STOP.clear()
    monkeypatch.setattr(rela_module.RELA, "after_step", original)
    if not cache_kept:  # then the targets are recomputed, and not charged a second time
        shutil.rmtree(tmp_path / "cut" / "cache")
    resumed = run("rela", tmp_path / "cut", epochs=2)  # the targets come back from the cache, uncharged
    assert resumed["metrics"] == reference["metrics"] and resumed["compute"] == reference["compute"]
    assert resumed["method_stats"] == reference["method_stats"]


# -- priors ----------------------------------------------------------------------------------------------


def test_a_prior_given_by_run_id_loads_the_saved_model(tmp_path):
    prior_run = execute(RunSpec("smoke-ssl", "byol", {}, 5, {"epochs": 1}), tmp_path, log=quiet, save=True)
    spec = f"run:{prior_run['run_id']}"
    record = run("rela", tmp_path, params={"prior": spec}, epochs=1)
    assert record["status"] == "complete" and record["method_stats"]["prior"] == spec
    # The targets are the PCA of the saved backbone's features.
    ctx = build_context(apply_overrides(load_protocol("smoke-ssl"), {"epochs": 1}), 0, results_dir=tmp_path, log=quiet)
    method = attach("rela", ctx, prior=spec)
    method.build_model(ctx)
    method.prepare(ctx)
    saved = load_saved_model(prior_run["run_id"], tmp_path).backbone
    with torch.no_grad():
        features = torch.cat([embed(saved, b.x) for b in ctx.data.train.batches(torch.arange(1024), 256)])
    assert torch.allclose(method.targets, pca_targets(features, 16), atol=1e-4)
    # A second seed uses the same targets from the cache, charged the same.
    again = run("rela", tmp_path, seed=1, params={"prior": spec}, epochs=1)
    assert again["compute"]["selection_flops"] == record["compute"]["selection_flops"] > 0
    assert len(list((tmp_path / "cache" / "rela-targets").rglob("run_*.pt"))) == 1


def test_an_unknown_run_id_fails_with_one_clear_line(tmp_path):
    with pytest.raises(BenchError, match="no saved model for run 'nope'"):
        run("rela", tmp_path, params={"prior": "run:nope"}, epochs=1)
    result = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--protocol", "smoke-ssl", "--method", "rela",
                             "--param", "prior='run:nope'", "--out", str(tmp_path / "cli"), "--wandb", "off"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "no saved model for run 'nope'" in result.stderr


@pytest.mark.parametrize("prior", ["imagenet", "run:", "timm:", "timm:resnet18@"])
def test_a_malformed_prior_fails_when_parameters_are_resolved(prior):
    with pytest.raises(BenchError, match="prior"):
        RunSpec("smoke-ssl", "rela", {"prior": prior}, 0, {}).resolve()


def test_a_timm_prior_from_a_local_weights_file_sees_pixels_as_it_was_trained(tmp_path):
    import timm

    donor = timm.create_model("test_resnet", pretrained=False, num_classes=0)  # random: unlike a fresh one
    weights = tmp_path / "w.pth"
    torch.save({"state_dict": donor.state_dict()}, weights)
    ctx = ssl_context(data_kwargs={"n_train": 64, "n_test": 64, "num_classes": 4, "size": 8})  # 160x160 passes
    encoder = load_prior(f"timm:test_resnet@{weights}", ctx)
    assert torch.equal(encoder.prior.conv1[0].weight, donor.conv1[0].weight)
    assert not any(p.requires_grad for p in encoder.parameters())
    batch = first_batch(ctx, 4)
    adapted = encoder.adapt(batch.x)
    pixels = batch.raw.float() / 255  # gray 8x8 -> RGB 160x160, normalised with the model's (0.5, 0.5)
    expected = (F.interpolate(pixels.expand(-1, 3, -1, -1), size=(160, 160), mode="bilinear") - 0.5) / 0.5
    assert adapted.shape == (4, 3, 160, 160) and torch.allclose(adapted, expected, atol=1e-4)
    assert encoder.feature_dim(ctx.data.input_shape) == 96
    with torch.no_grad():
        assert torch.allclose(embed(encoder, batch.x), donor.eval()(expected), atol=1e-5)
    features = embedding_pass(encoder, ctx, tag="t")
    assert features.shape == (64, 96) and ctx.meter.flops["selection"] > 0


# -- the linear probe --------------------------------------------------------------------------------------


class Flatten(torch.nn.Module):
    """Features = the normalised pixels themselves."""

    def forward_features(self, x):
        return x

    def forward_head(self, x, pre_logits=False):
        return x.flatten(1)


def separable_split(n: int, generator: torch.Generator, scramble: bool = False) -> TensorSplit:
    images = torch.randint(0, 256, (n, 1, 2, 3), generator=generator, dtype=torch.uint8)
    w = torch.tensor([[1.0, -2.0, 0.5, 1.5, -1.0, 0.7], [-1.0, 0.5, 2.0, -0.5, 1.0, -1.5]])
    scores = (images.float().flatten(1) / 255 - 0.5) @ w.T
    labels = 2 * (scores[:, 0] > 0).long() + (scores[:, 1] > 0).long()  # 4 classes cut by 2 hyperplanes
    if scramble:
        labels = labels[torch.randperm(n, generator=generator)]
    return TensorSplit(images, labels, (0.5,), (0.25,))


def test_the_linear_probe_reaches_high_accuracy_on_linearly_separable_features():
    ctx = ssl_context(probe_epochs=30, probe_lr=1e-2)
    g = torch.Generator().manual_seed(3)
    ctx.data = DataBundle(train=separable_split(2000, g), test=separable_split(1000, g), num_classes=4)
    metrics = linear_probe(Flatten(), ctx)
    assert metrics["probe_train_acc"] > 0.95 and metrics["test_acc"] > 0.95
    assert ctx.meter.flops["eval"] > 0 and ctx.meter.flops["train"] == ctx.meter.flops["selection"] == 0
    scrambled = ssl_context(probe_epochs=30, probe_lr=1e-2)  # test labels unrelated to the features: near chance
    scrambled.data = DataBundle(train=separable_split(2000, g), test=separable_split(1000, g, scramble=True),
                                num_classes=4)
    assert linear_probe(Flatten(), scrambled)["test_acc"] < 0.4


# -- the toy study -------------------------------------------------------------------------------------------


def test_toy_study_lower_variance_and_cleaner_targets_lower_the_validation_loss():
    result = run_study(ToyConfig(steps=60, seeds=16, n_val=500, eval_every=20))
    assert result["holds"]["variance"] and result["holds"]["targets"]
    final = result["final"]
    assert final["variance"][0.25] < final["variance"][1.0] and final["targets"][0.0] < final["targets"][0.4]
    assert result["steps"] == [20, 40, 60] and all(len(c) == 3 for c in result["curves"]["targets"].values())


def test_toy_command_prints_verdicts_and_writes_the_plot(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks", "toy", "--steps", "40", "--seeds", "8",
                             "--out", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "target noise" in result.stdout and "holds" in result.stdout
    assert (tmp_path / "toy.png").stat().st_size > 0 and (tmp_path / "toy.json").exists()


# -- the ssl-fashion grid ------------------------------------------------------------------------------------


def test_the_ssl_fashion_sweep_uses_the_prior_sweeps_saved_run():
    from benchmarks.jobs.sweep import load_sweep

    prior = load_sweep("ssl-fashion-prior")
    assert prior.save_model and len(prior.runs) == 1 and prior.runs[0].method == "byol"
    grid = load_sweep("ssl-fashion")
    runs = {(r.method, r.params["budget"], r.params.get("prior"), r.seed) for r in grid.runs}
    assert {(m, b, p, s) for m, b, p, s in runs if m == "byol"} == \
        {("byol", b, None, s) for b in (0.1, 0.2, 0.5, 1.0) for s in (0, 1)}
    assert {(m, b, p, s) for m, b, p, s in runs if m == "rela"} == \
        {("rela", b, p, s) for b in (0.1, 0.2, 0.5) for p in ("random", f"run:{prior.runs[0].run_id}") for s in (0, 1)}

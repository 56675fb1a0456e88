"""Online batch selection (GREATS, RHO-Loss, max-loss, grad-norm, uniform-online) and the ghost kernel:
products against loops of single-example autograd, the greedy against exhaustive search, subset
gradients against autograd, rankings against brute force, RHO-Loss's independence, the one-pass
trainer path, and the steps columns of tables and plots."""

from __future__ import annotations

import copy
import itertools
import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.api import Step
from benchmarks.core import train
from benchmarks.core.compute import ComputeMeter
from benchmarks.core.layout import ResultsLayout
from benchmarks.core.models import create_model
from benchmarks.core.protocol import apply_overrides, load_protocol
from benchmarks.core.record import SCHEMA, load_records, write_record
from benchmarks.core.registry import create_method
from benchmarks.core.run import RunSpec, build_context, execute
from benchmarks.errors import BenchError
from benchmarks.kit.ghost import (
    capture,
    ghost_flops,
    gram,
    gram_with_validation,
    materialised_flops,
    subset_gradient,
    weight_form,
)
from benchmarks.kit.online import kept_count, top_k
from benchmarks.kit.proxies import train_proxy
from benchmarks.reporting.plots import write_plots
from benchmarks.reporting.tables import build_sections, markdown_tables, steps_to_target
from conftest import quiet
from methods import greats as greats_module
from methods.greats import greedy_pick, set_value
from methods.rho_loss import IL_TAG, IrreducibleMonitor, best_epoch, irreducible_losses

ONLINE = ["greats", "uniform-online", "max-loss", "grad-norm", "rho-loss"]
HOLDOUT = {"holdout": 64}


# -- brute force ------------------------------------------------------------------------------------


def per_example_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0):
    """[n, P]: one example at a time, autograd's gradient of its loss over all trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(y)):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], label_smoothing=label_smoothing)
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def randomise_batchnorm(model: nn.Module, seed: int = 1) -> nn.Module:
    """Running statistics and affine parameters far from their defaults, so eval-mode BN matters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g))
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(c, generator=g))
            m.bias.data.copy_(torch.randn(c, generator=g))
    return model


def inputs(shape, classes, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(classes, (n,), generator=g)


class Tokens(nn.Module):
    """A Linear applied along a sequence axis (T = 5 positions), then a Linear on the flattened result."""

    def __init__(self):
        super().__init__()
        self.mix, self.head = nn.Linear(4, 6), nn.Linear(30, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.mix(x)).flatten(1))


def conv_net() -> nn.Module:
    """Stride, dilation, non-square kernels, no bias: conv1 (T = 64, d = 18) materialises, conv3 (T = 4) ghosts."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(3, 8, (3, 2), stride=2, padding=(1, 0), dilation=(1, 2), bias=False), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5))


MODELS = {  # name -> (model factory, input shape, classes, n)
    "linear": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, 4)), (3, 4), 4, 6),
    "linear-sequence": (Tokens, (5, 4), 3, 6),
    "conv2d": (conv_net, (2, 8, 8), 5, 6),
    "tiny-cnn": (lambda: randomise_batchnorm(create_model("tiny-cnn", in_chans=2, num_classes=5)), (2, 8, 8), 5, 6),
    "small-cnn": (lambda: randomise_batchnorm(create_model("small-cnn", in_chans=1, num_classes=10, width=4)),
                  (1, 28, 28), 10, 4),
}


# -- ghost products ---------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["auto", "ghost", "materialise"])
@pytest.mark.parametrize("name", list(MODELS))
def test_gram_equals_single_example_autograd(name, form):
    factory, shape, classes, n = MODELS[name]
    torch.manual_seed(0)
    model = factory().double().eval()  # BatchNorm (tiny-cnn, small-cnn) from running statistics: the rule
    x, y = inputs(shape, classes, n)
    got, used = gram(capture(model, x, y, label_smoothing=0.1), form)
    grads = per_example_gradients(model, x, y, label_smoothing=0.1)
    expected = grads @ grads.T
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * expected.abs().max()), (got - expected).abs().max()
    assert expected.abs().max() > 1e-3 and (expected - expected.diagonal().diag()).abs().max() > 1e-4
    if form != "auto":
        assert used["ghost" if form == "ghost" else "materialise"] == sum(used.values()) > 0


@pytest.mark.parametrize("form", ["ghost", "materialise"])
def test_gram_in_small_chunks_is_the_same(monkeypatch, form):
    import benchmarks.kit.ghost as ghost

    torch.manual_seed(0)
    model = conv_net().double()
    x, y = inputs((2, 8, 8), 5, 6)
    whole, _ = gram(capture(model, x, y), form)
    monkeypatch.setattr(ghost, "GRAM_CHUNK_FLOATS", 64)  # one row / one output channel at a time
    chunked, _ = gram(capture(model, x, y), form)
    assert torch.allclose(chunked, whole, rtol=1e-12, atol=1e-12)


def test_the_conv_net_really_uses_both_forms():
    torch.manual_seed(0)
    model = conv_net().double()
    x, y = inputs((2, 8, 8), 5, 6)
    _, used = gram(capture(model, x, y))
    assert used == {"ghost": 2, "materialise": 2}  # conv1, conv2 materialise; conv3 and the head ghost


def test_products_with_the_validation_gradient_equal_autograd_of_the_mean_validation_loss():
    torch.manual_seed(0)
    model = randomise_batchnorm(create_model("tiny-cnn", in_chans=2, num_classes=5)).double().eval()
    x, y = inputs((2, 8, 8), 5, 7)
    values, interactions, _ = gram_with_validation(capture(model, x, y), 5)
    params = list(model.parameters())
    g_val = torch.cat([g.flatten() for g in torch.autograd.grad(F.cross_entropy(model(x[5:]), y[5:]), params)])
    grads = per_example_gradients(model, x[:5], y[:5])
    assert torch.allclose(values, grads @ g_val, atol=1e-8)
    assert torch.allclose(interactions, grads @ grads.T, atol=1e-8)


@pytest.mark.parametrize("form", ["auto", "ghost", "materialise"])
def test_without_interactions_only_the_validation_block_is_computed_and_it_is_the_same(form):
    torch.manual_seed(0)
    model = conv_net().double()
    x, y = inputs((2, 8, 8), 5, 8)
    captured = capture(model, x, y)
    values, interactions, _ = gram_with_validation(captured, 6, form)
    alone, none, _ = gram_with_validation(captured, 6, form, interactions=False)
    assert none is None and torch.allclose(alone, values, rtol=1e-12, atol=1e-12)
    block, _ = gram(captured, form, columns=torch.tensor([6, 7]))
    grads = per_example_gradients(model, x, y)
    assert block.shape == (8, 2) and torch.allclose(block, grads @ grads[6:].T, atol=1e-10)
    assert weight_form(8, 64, 18, 3, columns=2) == "materialise" and weight_form(8, 4, 72, 16, columns=2) == "ghost"


def test_whole_resnet18_gram_equals_autograd():
    torch.manual_seed(0)
    model = randomise_batchnorm(create_model("resnet18-cifar", in_chans=3, num_classes=4)).double().eval()
    x, y = inputs((3, 8, 8), 4, 3)
    got, used = gram(capture(model, x, y))
    grads = per_example_gradients(model, x, y)
    assert torch.allclose(got, grads @ grads.T, rtol=1e-7, atol=1e-5)
    assert used["ghost"] > 0 and used["materialise"] > 0


def test_batchnorm_in_train_mode_is_refused_and_other_layers_are_named():
    model = create_model("tiny-cnn", in_chans=1, num_classes=4).train()
    x, y = torch.randn(4, 1, 8, 8), torch.arange(4)
    with pytest.raises(ValueError, match="BatchNorm2d in train mode couples the examples"):
        capture(model, x, y)
    with pytest.raises(ValueError, match="LayerNorm"):
        capture(nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.LayerNorm(4)), x, y)


@pytest.mark.parametrize("n, t, d, p, expected", [
    (514, 49, 576, 128, "materialise"),  # the Fashion-MNIST model's last conv: "2T^2 <= dp" would say ghost
    (258, 16, 4608, 512, "ghost"),  # ResNet-18's last stage on 32x32
    (514, 784, 9, 32, "materialise"),  # a first conv on 28x28
    (514, 1, 1152, 10, "ghost"),  # a linear head on flat features
])
def test_the_cost_rule_takes_the_form_with_fewer_flops(n, t, d, p, expected):
    assert weight_form(n, t, d, p) == expected
    cheaper = "ghost" if ghost_flops(n, t, d, p) <= materialised_flops(n, t, d, p) else "materialise"
    assert cheaper == expected
    assert weight_form(n, t, d, p, "ghost") == "ghost" and weight_form(n, t, d, p, "materialise") == "materialise"


# -- subset gradients from the captured factors ----------------------------------------------------


@pytest.mark.parametrize("name", ["linear-sequence", "conv2d", "tiny-cnn"])
def test_subset_gradient_from_factors_equals_autograd_of_the_subset_mean_loss(name):
    factory, shape, classes, _ = MODELS[name]
    torch.manual_seed(0)
    model = factory().double().eval()
    x, y = inputs(shape, classes, 8)
    keep = torch.tensor([6, 1, 3])
    weights = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    captured = capture(model, x, y, label_smoothing=0.1)
    for w in (None, weights):
        got = subset_gradient(model, captured, keep, w)
        losses = F.cross_entropy(model(x[keep]), y[keep], reduction="none", label_smoothing=0.1)
        loss = (losses * w).mean() if w is not None else losses.mean()
        names, params = zip(*model.named_parameters())
        assert set(got) == set(names)
        for key, expected in zip(names, torch.autograd.grad(loss, params)):
            assert got[key].shape == expected.shape
            assert torch.allclose(got[key], expected, rtol=0, atol=1e-10), key


# -- the greedy -------------------------------------------------------------------------------------


def random_instance(b: int, seed: int, dim: int = 6):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(b, dim, generator=g, dtype=torch.float64)
    g_val = torch.randn(dim, generator=g, dtype=torch.float64)
    return grads @ g_val, grads @ grads.T


@pytest.mark.parametrize("seed", range(5))
def test_each_greedy_pick_has_the_largest_marginal_gain_by_exhaustive_search(seed):
    values, interactions = random_instance(8, seed)
    eta = 0.7  # large enough that interactions change the order
    picks = greedy_pick(values, interactions, 5, eta).tolist()
    chosen = []
    for pick in picks:
        gains = {z: set_value(values, interactions, chosen + [z], eta) - set_value(values, interactions, chosen, eta)
                 for z in range(8) if z not in chosen}
        assert gains[pick] == pytest.approx(max(gains.values()), abs=1e-12)
        chosen.append(pick)
    assert picks != top_k(values, 5).tolist() or seed > 0  # seed 0: the interactions do change the pick


@pytest.mark.parametrize("seed", range(5))
def test_without_the_interaction_term_greedy_is_the_exhaustive_optimum_and_top_k(seed):
    values, interactions = random_instance(9, seed)
    picks = greedy_pick(values, interactions, 4, 0.3, interaction=False)
    best = max(itertools.combinations(range(9), 4),
               key=lambda s: set_value(values, interactions, s, 0.3, interaction=False))
    assert sorted(picks.tolist()) == sorted(best)
    assert picks.tolist() == top_k(values, 4).tolist()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_with_one_pick_or_orthogonal_gradients_is_the_exhaustive_optimum(k):
    # Orthogonal per-example gradients: no interactions between distinct candidates, so the objective is
    # modular and greedy is optimal; with k = 1 it is optimal whatever the interactions.
    g = torch.Generator().manual_seed(k)
    grads = torch.diag(torch.randn(6, generator=g, dtype=torch.float64))
    values = grads @ torch.randn(6, generator=g, dtype=torch.float64)
    for interactions in (grads @ grads.T, random_instance(6, k)[1] if k == 1 else grads @ grads.T):
        picks = greedy_pick(values, interactions, k, 0.5)
        best = max(set_value(values, interactions, s, 0.5) for s in itertools.combinations(range(6), k))
        assert set_value(values, interactions, picks.tolist(), 0.5) == pytest.approx(best)


def test_greedy_breaks_ties_by_position():
    values = torch.tensor([1.0, 3.0, 3.0, 0.0])
    assert greedy_pick(values, torch.zeros(4, 4), 2, 1.0).tolist() == [1, 2]
    assert top_k(values, 2).tolist() == [1, 2] and kept_count(129, 2) == 65


# -- the methods' selections against brute force ----------------------------------------------------


def smoke_context(seed=0, **overrides):
    return build_context(apply_overrides(load_protocol("smoke"), dict(HOLDOUT, **overrides)), seed, log=quiet)


def candidate_batch(ctx, n=128, seed=0):
    order = torch.randperm(ctx.num_train, generator=torch.Generator().manual_seed(seed))[:n]
    return next(iter(ctx.data.train.batches(order, n)))


def method_for(ctx, name, **params):
    method = create_method(name, **params)
    method.setup(ctx)  # nothing to prepare for these tests' hooks; a prepare called after fills its state
    return method


def trained_model(ctx):
    """A model a few steps into training, so BatchNorm statistics and scores are not those of the start."""
    model = ctx.new_model("main")
    train.Trainer(ctx, model, create_method("full"), evaluate=False, epochs=1).fit()
    return model


def step_at(lr=0.05, number=3):
    return Step(epoch=0, step=number, lr=lr, progress=0.1, autocast=nullcontext)


def eval_losses(model, x, y, label_smoothing):
    model.eval()
    with torch.no_grad():
        losses = torch.stack([F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], label_smoothing=label_smoothing)
                              for i in range(len(y))])
    model.train()
    return losses


def assert_top_k_of(selected, scores, k):
    """The selected positions are k of the highest scores (a brute-force ranking, ties aside)."""
    assert len(selected) == k == len(set(selected.tolist()))
    ranking = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    assert sorted(selected.tolist()) == sorted(ranking[:k])
    assert float(scores[selected].min()) >= float(scores[ranking[k]])


def test_max_loss_keeps_the_highest_losses_of_a_brute_force_ranking():
    ctx = smoke_context(label_smoothing=0.1)
    model, batch = trained_model(ctx), candidate_batch(ctx)
    selection = method_for(ctx, "max-loss").select(batch, model, step_at())
    assert model.training
    assert_top_k_of(selection.keep, eval_losses(model, batch.x, batch.y, 0.1), 64)


def test_grad_norm_keeps_the_largest_gradients_of_a_brute_force_ranking():
    ctx = smoke_context(label_smoothing=0.1)
    model, batch = trained_model(ctx), candidate_batch(ctx)
    selection = method_for(ctx, "grad-norm").select(batch, model, step_at())
    model.eval()
    norms = per_example_gradients(model, batch.x, batch.y, label_smoothing=0.1).norm(dim=1)
    model.train()
    assert_top_k_of(selection.keep, norms, 64)


def test_uniform_online_draws_k_from_the_step_seed():
    ctx = smoke_context()
    method, batch = method_for(ctx, "uniform-online", candidate_factor=4), candidate_batch(ctx)
    a, b, c = (method.select(batch, None, step_at(number=s)).keep for s in (3, 3, 4))
    assert len(a) == 32 and len(a.unique()) == 32 and torch.equal(a, b) and not torch.equal(a, c)


def test_greats_scores_with_eval_mode_batchnorm_and_leaves_the_model_as_it_was(monkeypatch):
    """The BatchNorm rule: products from eval-mode (running-statistics) gradients; the model stays in
    train mode with its statistics untouched; the validation batch comes from the held-out split."""
    ctx = smoke_context(label_smoothing=0.1)
    model, batch = trained_model(ctx), candidate_batch(ctx)
    method = method_for(ctx, "greats")
    seen = {}
    original = greats_module.greedy_pick

    def spy(values, interactions, k, eta, interaction=True):
        seen.update(values=values, interactions=interactions, k=k, eta=eta)
        return original(values, interactions, k, eta, interaction)

    monkeypatch.setattr(greats_module, "greedy_pick", spy)
    statistics = [b.clone() for b in model.buffers()]
    selection = method.select(batch, model, step_at(lr=0.04, number=7))
    assert model.training and all(torch.equal(a, b) for a, b in zip(statistics, model.buffers()))
    val_x, val_y = method.validation_batch(7)
    held = ctx.data.holdout.normalize(ctx.data.holdout.images)  # un-augmented held-out images
    assert len(val_y) == 2 and all((held == v).flatten(1).all(1).any() for v in val_x)
    draws = {tuple(method.validation_batch(s)[0].sum((1, 2, 3)).tolist()) for s in range(20)}
    assert 1 < len(draws) <= 20  # a fresh pair of the fixed five each step
    assert torch.equal(method.validation_batch(7)[0], val_x)  # the same pair for the same step (resume)
    model.eval()
    grads = per_example_gradients(model, batch.x, batch.y, label_smoothing=0.1)
    params = [p for p in model.parameters()]
    val_loss = F.cross_entropy(model(val_x), val_y, label_smoothing=0.1)
    g_val = torch.cat([g.flatten() for g in torch.autograd.grad(val_loss, params)])
    model.train()
    scale = grads.abs().max() ** 2
    assert torch.allclose(seen["values"], grads @ g_val, atol=1e-4 * scale)
    assert torch.allclose(seen["interactions"], grads @ grads.T, atol=1e-4 * scale)
    assert seen["k"] == 64 and seen["eta"] == 0.04 and len(selection.keep) == 64
    assert selection.gradients is None  # a BatchNorm model: the kept examples train in a second pass


def test_rho_loss_irreducible_model_never_sees_the_examples_it_scores(monkeypatch):
    ctx = smoke_context(holdout=200, epochs=2)
    trained = []
    original = train.Trainer._step

    def spy(self, batch, step, selection=None):
        trained.append((self.tag, batch.raw.clone(), batch.index.clone()))
        return original(self, batch, step, selection)

    monkeypatch.setattr(train.Trainer, "_step", spy)
    method = method_for(ctx, "rho-loss")
    method.prepare(ctx)
    assert {tag for tag, *_ in trained} == {IL_TAG}
    images = torch.cat([raw for _, raw, _ in trained])
    assert len(images) == 2 * 200  # every held-out example, each of the 2 epochs
    held = {bytes(im.numpy()) for im in ctx.data.holdout.images}
    scored = {bytes(im.numpy()) for im in ctx.data.train.images}
    assert all(bytes(im.numpy()) in held and bytes(im.numpy()) not in scored for im in images)
    assert torch.equal(torch.cat([i for *_, i in trained]).unique(), torch.arange(200))


# The options that keep the earlier behaviour: eval-mode scoring, the IL model after its last epoch.
RHO_EVAL_LAST = {"scoring_mode": "eval", "il_checkpoint": "last"}


def test_rho_loss_keeps_the_highest_reducible_losses_and_caches_its_model(tmp_path):
    ctx = smoke_context(holdout=200, epochs=2, label_smoothing=0.1)
    ctx.cache_dir = tmp_path
    method = method_for(ctx, "rho-loss", **RHO_EVAL_LAST)  # the defaults are checked in the tests below
    method.prepare(ctx)
    cost = ctx.meter.flops["selection"]
    il_model = ctx.new_model("score", "holdout", 0)
    (cached_file,) = (tmp_path / "proxies").rglob("*-holdout.pt")
    il_model.load_state_dict(torch.load(cached_file, weights_only=True)["state"])
    irreducible = eval_losses(il_model, ctx.data.train.normalize(ctx.data.train.images), ctx.data.train.labels, 0.1)
    assert torch.allclose(method.irreducible, irreducible, atol=1e-5)
    model, batch = trained_model(ctx), candidate_batch(ctx)
    selection = method.select(batch, model, step_at())
    reducible = eval_losses(model, batch.x, batch.y, 0.1) - irreducible[batch.index]
    assert_top_k_of(selection.keep, reducible, 64)
    again = smoke_context(holdout=200, epochs=2, label_smoothing=0.1)
    again.cache_dir = tmp_path
    cached = method_for(again, "rho-loss", **RHO_EVAL_LAST)
    cached.prepare(again)
    assert cached.il_cached and again.meter.flops["selection"] == cost  # a hit is charged what it cost
    assert torch.equal(cached.irreducible, method.irreducible)


def test_rho_loss_scores_candidates_in_train_mode_and_leaves_batchnorm_statistics_alone():
    ctx = smoke_context(label_smoothing=0.1)
    method = method_for(ctx, "rho-loss")  # the default: scoring_mode = "train", as the official code
    assert method.hparams["scoring_mode"] == "train"
    method.irreducible = torch.rand(ctx.num_train, generator=torch.Generator().manual_seed(3))
    model, batch = trained_model(ctx), candidate_batch(ctx)
    # By hand: one train-mode forward of the whole candidate batch (BatchNorm from its own statistics).
    manual = copy.deepcopy(model).train()
    with torch.no_grad():
        train_losses = F.cross_entropy(manual(batch.x), batch.y, reduction="none", label_smoothing=0.1)
    reducible = train_losses - method.irreducible[batch.index]
    trainer = train.Trainer(ctx, model, method, evaluate=False)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    _, selection = trainer._select(batch, step_at())
    assert model.training
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())  # running stats restored
    assert_top_k_of(selection.keep, reducible, 64)
    assert torch.allclose(method.scores(batch, copy.deepcopy(model), step_at()), reducible, atol=1e-5)
    # ... and the test can tell: eval-mode scores (the option) differ, and the scoring forward itself moves
    # the running statistics (the trainer's restore is what keeps them).
    evaluated = eval_losses(model, batch.x, batch.y, 0.1) - method.irreducible[batch.index]
    assert not torch.allclose(evaluated, reducible, atol=1e-3)
    eval_method = method_for(ctx, "rho-loss", scoring_mode="eval")
    eval_method.irreducible = method.irreducible
    assert torch.allclose(eval_method.scores(batch, model, step_at()), evaluated, atol=1e-5)
    moved = copy.deepcopy(model)
    method.scores(batch, moved, step_at())
    running = next(k for k in buffers if k.endswith("running_mean"))
    assert not torch.equal(moved.state_dict()[running], buffers[running])


class ConstantLogits(nn.Module):
    """The same logits for every input: its loss on an example depends only on the example's label."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, x):
        return self.logits.expand(len(x), -1)


def test_best_il_checkpoint_is_the_first_lowest_monitored_loss():
    assert best_epoch([0.9, 0.5, 0.7, 0.5]) == 1  # argmin; a tie keeps the earlier (strict improvement)
    assert best_epoch([2.0, 1.0, 0.5]) == 2 and best_epoch([3.0]) == 0
    # The monitor driven by hand: three "epochs" of models with known losses on the training split.
    ctx = smoke_context()
    monitor = IrreducibleMonitor(ctx)
    labels = ctx.data.train.labels
    sequence = [[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]]  # ever surer of class 0
    expected = []
    for epoch, logits in enumerate(sequence):
        monitor.after_step(ConstantLogits(logits), step_at())
        monitor.epoch_info(epoch)
        hand = F.cross_entropy(torch.tensor(logits).expand(len(labels), -1), labels, reduction="none")
        expected.append(hand)
    means = [float(e.double().mean()) for e in expected]
    assert monitor.monitor == pytest.approx(means)
    best = min(range(3), key=lambda i: means[i])
    assert best == best_epoch(monitor.monitor) and best != 2  # most labels are not 0: surer is worse
    assert torch.allclose(monitor.best, expected[best])


# An IL model on 16 held-out examples with a large step: its loss on the training split goes up and
# down over its 6 epochs (lowest after epoch 3), so the best checkpoint is not the last.
NOISY_IL = {"holdout": 16, "epochs": 6, "lr": 1.0, "batch_size": 8}


def test_rho_loss_default_il_model_is_its_best_epoch_on_the_training_split(tmp_path):
    ctx = smoke_context(**NOISY_IL)
    ctx.cache_dir = tmp_path / "cache"
    method = method_for(ctx, "rho-loss")
    method.prepare(ctx)
    cost = ctx.meter.flops["selection"]
    # Brute force: the IL model after e of the protocol's 6 epochs, for each e, scores the training split.
    per_epoch = []
    for epochs in range(1, 7):
        fresh = smoke_context(**NOISY_IL)
        model, _ = train_proxy(fresh, 0, epochs, tag=IL_TAG, split="holdout")  # as RhoLoss trains it
        per_epoch.append(irreducible_losses(model, fresh))
    means = [float(losses.double().mean()) for losses in per_epoch]
    stats = method.summary()
    assert stats["il_train_split_loss_by_epoch"] == pytest.approx(means, rel=1e-6)
    best = best_epoch(means)
    assert stats["il_best_epoch"] == best + 1 and best < 5  # not the last epoch's model
    assert torch.allclose(method.irreducible, per_epoch[best], atol=1e-6)
    assert not torch.allclose(method.irreducible, per_epoch[-1], atol=1e-3)  # what il_checkpoint="last" keeps
    again = smoke_context(**NOISY_IL)
    again.cache_dir = tmp_path / "cache"
    cached = method_for(again, "rho-loss")
    cached.prepare(again)
    assert cached.il_cached and again.meter.flops["selection"] == cost  # a hit is charged what it cost
    assert torch.equal(cached.irreducible, method.irreducible) and cached.summary() == method.summary() | {
        "scores_cached": True}


def test_rho_loss_il_training_preempted_resumes_to_the_same_choice(tmp_path, monkeypatch):
    reference = smoke_context(holdout=200, epochs=3)
    reference.cache_dir = tmp_path / "ref"
    expected = method_for(reference, "rho-loss")
    expected.prepare(reference)
    original = train.Trainer._step

    def stop(self, batch, step, selection=None):
        loss = original(self, batch, step, selection)
        if self.tag == IL_TAG and self.state.step == 6:  # 4 steps per epoch: inside epoch 2
            train.STOP.set()
        return loss

    monkeypatch.setattr(train.Trainer, "_step", stop)
    cut = smoke_context(holdout=200, epochs=3)
    cut.cache_dir = tmp_path / "cut"
    try:
        with pytest.raises(train.Preempted, match="in epoch 2 after step 2"):
            method_for(cut, "rho-loss").prepare(cut)
    finally:
        train.STOP.clear()
    monkeypatch.setattr(train.Trainer, "_step", original)
    resumed_ctx = smoke_context(holdout=200, epochs=3)
    resumed_ctx.cache_dir = tmp_path / "cut"
    resumed = method_for(resumed_ctx, "rho-loss")
    resumed.prepare(resumed_ctx)
    assert torch.equal(resumed.irreducible, expected.irreducible)
    assert resumed.summary() == expected.summary()
    assert resumed_ctx.meter.flops["selection"] == reference.meter.flops["selection"]


# -- runs: same B and k for every method, holdouts, resume -----------------------------------------


def test_methods_needing_a_holdout_are_refused_without_one():
    for name in ("greats", "rho-loss"):
        with pytest.raises(BenchError, match=f"'{name}' needs a held-out split"):
            RunSpec("smoke", name).resolve()
    with pytest.raises(BenchError, match="val_batch=6 exceeds val_size=5"):
        RunSpec("smoke", "greats", {"val_batch": 6}, 0, HOLDOUT).resolve()
    with pytest.raises(BenchError, match="val_size=5 held-out examples"):
        method_for(smoke_context(holdout=3), "greats").validation_batch(0)


def test_every_online_method_trains_on_the_same_k_of_the_same_b_at_full_step_count(tmp_path):
    overrides = dict(HOLDOUT, epochs=1, budget="iterations")
    full = execute(RunSpec("smoke", "full", {}, 0, overrides), tmp_path, log=quiet)
    for name in ONLINE:
        record = execute(RunSpec("smoke", name, {}, 0, overrides), tmp_path, log=quiet)
        assert record["curve"][-1]["step"] == full["curve"][-1]["step"] == 15  # 960 / 64
        assert record["compute"]["train_examples"] == full["compute"]["train_examples"] == 960
        assert record["compute"]["train_flops"] == full["compute"]["train_flops"]  # the same k per step
        if name != "uniform-online":
            assert record["compute"]["selection_flops"] > 0


@pytest.mark.parametrize("name", ["greats", "rho-loss"])
def test_online_run_stopped_mid_epoch_resumes_identically(tmp_path, monkeypatch, name):
    spec = RunSpec("smoke", name, {}, 1, dict(HOLDOUT, epochs=2))
    reference = execute(spec, tmp_path / "ref", log=quiet)
    original = train.Trainer._step

    def stop(self, batch, step, selection=None):
        loss = original(self, batch, step, selection)
        if self.tag == "main" and self.state.step == 10:  # 8 steps per epoch: inside epoch 2
            train.STOP.set()
        return loss

    monkeypatch.setattr(train.Trainer, "_step", stop)
    try:
        with pytest.raises(train.Preempted):
            execute(spec, tmp_path / "cut", log=quiet)
    finally:
        train.STOP.clear()
    monkeypatch.setattr(train.Trainer, "_step", original)
    resumed = execute(spec, tmp_path / "cut", log=quiet)
    assert resumed["metrics"] == reference["metrics"] and resumed["compute"] == reference["compute"]
    assert [r["train_loss"] for r in resumed["curve"]] == [r["train_loss"] for r in reference["curve"]]


# -- one pass: the trainer applies the subset gradient from the candidate pass ----------------------


def test_one_pass_greats_step_equals_a_second_pass_on_a_model_without_batchnorm():
    ctx = smoke_context(epochs=1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 4))
    runs = {}
    for one_pass in (True, False):
        ctx.meter = ComputeMeter()
        model = copy.deepcopy(net)
        method = method_for(ctx, "greats", one_pass=one_pass)
        trainer = train.Trainer(ctx, model, method, evaluate=False)
        trainer.fit()
        runs[one_pass] = (model, trainer.state.curve[-1], dict(ctx.meter.flops), dict(ctx.meter.examples),
                          method.summary())
    (one, curve1, flops1, ex1, stats1), (two, curve2, flops2, ex2, stats2) = runs[True], runs[False]
    for a, b in zip(one.parameters(), two.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    assert curve1["train_loss"] == pytest.approx(curve2["train_loss"], abs=1e-5)  # observe's losses
    assert stats1["one_pass_steps"] == stats2["two_pass_steps"] == 8
    assert flops1["train"] == 0 < flops2["train"] and ex1["train"] == ex2["train"] == 480
    assert flops1["selection"] > 0


# -- tables and plots against optimiser steps --------------------------------------------------------


def write_run(out, rid, method, seed, acc, curve):
    record = {"schema": SCHEMA, "run_id": rid, "status": "complete", "protocol": "toy", "method": method,
              "params": {}, "seed": seed, "overrides": {}, "budget": "iterations",
              "resolved_protocol": {"name": "toy", "budget": "iterations", "selection_rule": "last-epoch"},
              "metrics": {"test_acc": acc}, "compute": {"fraction": curve[-1][1] / 1000, "selection_share": 0.0,
                                                        "full_flops": 1000},
              "wall_clock_s": 1.0, "curve": [dict(zip(("epoch", "flops", "step", "test_acc"), row)) for row in curve],
              "method_stats": {}, "error": None}
    write_record(ResultsLayout(out).record(rid), record)


def test_tables_and_plots_show_steps_to_target(tmp_path):
    # full: 90 and 92 -> target 90; online reaches 90.5 at step 20 (seed 0) and 30 (seed 1): mean 25
    write_run(tmp_path, "f0", "full", 0, 0.90, [(1, 500, 10, 0.85), (2, 1000, 20, 0.90)])
    write_run(tmp_path, "f1", "full", 1, 0.92, [(1, 500, 10, 0.91), (2, 1000, 20, 0.92)])
    write_run(tmp_path, "o0", "online", 0, 0.91, [(1, 900, 10, 0.80), (2, 1800, 20, 0.905), (3, 2700, 30, 0.91)])
    write_run(tmp_path, "o1", "online", 1, 0.90, [(1, 900, 10, 0.80), (2, 1800, 20, 0.85), (3, 2700, 30, 0.90)])
    records, problems = load_records(tmp_path / "runs")
    sections = build_sections(records, problems)
    table = markdown_tables(sections)["toy"]
    assert "| compute to target | steps to target | reached |" in table
    assert "| online | - | 2 | 90.50 ± 0.71 | -0.50 | 2.700 | 0.0 | 1.0 | 2.250 | 25 | 2/2 |" in table
    assert "| full | - | 2 | 91.00 ± 1.41 | +0.00 | 1.000 | 0.0 | 1.0 | 0.750 | 15 | 2/2 |" in table
    assert math.isnan(steps_to_target([{"step": 5, "test_acc": 0.5}], 0.9))
    assert steps_to_target([{"step": 5, "test_acc": 0.5}, {"step": 9, "test_acc": 0.95}], 0.9) == 9
    names = sorted(p.name for p in write_plots(sections, tmp_path / "plots"))
    assert "toy-curves-steps.png" in names and "toy-curves-steps.pdf" in names

"""The method lifecycle of benchmarks/api.py: `prepare` once per run, `setup` on every process start
(after prepare on a fresh start, after load_state_dict on a resume), never charged; traits in one
place; the public names of the api."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

import benchmarks.api as api
from benchmarks.api import Method, Traits, register
from benchmarks.core import train
from benchmarks.core.compute import flop_counter
from benchmarks.core.protocol import apply_overrides, load_protocol
from benchmarks.core.registry import list_methods, method_class
from benchmarks.core.run import RunSpec, build_context, execute
from conftest import quiet

# name -> (protocol, params, overrides, the state `setup` must leave in place, the part of it that a
# resume gets from setup rather than from the checkpoint). Cheap settings: 2 epochs of the smoke data.
STATEFUL = {
    "infobatch": ("smoke", {}, {}, ("scores",), ()),
    "greats": ("smoke", {}, {"holdout": 64}, ("validation",), ("validation",)),
    "rela": ("smoke-ssl", {}, {}, ("targets",), ("targets",)),
    # adjustment > 0: the adjustment is what setup rebuilds from the group counts
    "group-dro": ("smoke-groups", {"adjustment": 1.0}, {}, ("q", "_adjustment"), ("_adjustment",)),
    "rho-loss": ("smoke", {}, {"holdout": 64}, ("irreducible",), ()),
    "forgetting": ("smoke", {"score_runs": 1}, {}, ("subset",), ()),
}


def spec_for(name: str) -> RunSpec:
    protocol, params, overrides, *_ = STATEFUL[name]
    return RunSpec(protocol, name, params, 0, dict(overrides, epochs=2))


def spy_lifecycle(monkeypatch, cls: type[Method], state: tuple[str, ...]) -> list:
    """Record prepare / load_state_dict / setup calls on `cls`, and after setup forbid assigning the
    state it set up again (what state `setup` replaced as lazy rebuilds did in hooks: a hook that
    rebuilds it after setup raises here). Frozen: whatever setup leaves except the per-step q of
    Group DRO, which every step legitimately replaces."""
    events: list = []
    original = {hook: getattr(cls, hook) for hook in ("prepare", "load_state_dict", "setup")}
    frozen = tuple(n for n in state if n != "q")

    def prepare(self, ctx):
        events.append(("prepare",))
        return original["prepare"](self, ctx)

    def load_state_dict(self, state_dict):
        events.append(("load_state_dict", self.ctx))  # a resume: before setup, so without a context
        return original["load_state_dict"](self, state_dict)

    def setup(self, ctx):
        missing_before = tuple(n for n in state if getattr(self, n) is None)
        meter_before = ctx.meter.state_dict()
        original["setup"](self, ctx)
        events.append(("setup", missing_before, tuple(n for n in state if getattr(self, n) is None),
                       ctx.meter.state_dict() == meter_before))
        self.__dict__["frozen_after_setup"] = frozen

    def guarded_setattr(self, name, value):
        if name in self.__dict__.get("frozen_after_setup", ()):
            raise AssertionError(f"{type(self).__name__}.{name} assigned after setup: a lazy rebuild in a hook")
        object.__setattr__(self, name, value)

    for hook, replacement in (("prepare", prepare), ("load_state_dict", load_state_dict), ("setup", setup),
                              ("__setattr__", guarded_setattr)):
        monkeypatch.setattr(cls, hook, replacement)
    return events


def stop_in_the_second_epoch(monkeypatch) -> None:
    """A stop request (Slurm's warning signal) after the second training step of epoch 2."""
    original = train.Trainer._step
    seen = {"steps": 0}

    def step(self, batch, step, selection=None):
        loss = original(self, batch, step, selection)
        if self.purpose == "train" and self.state.epoch == 1:
            seen["steps"] += 1
            if seen["steps"] == 2:
                train.STOP.set()
        return loss

    monkeypatch.setattr(train.Trainer, "_step", step)


def same_run(a: dict, b: dict) -> None:
    assert a["status"] == b["status"] == "complete"
    assert a["metrics"] == b["metrics"] and a["compute"] == b["compute"] and a["method_stats"] == b["method_stats"]
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in a["curve"]]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in b["curve"]]


def resumed_equals_uninterrupted(name: str, tmp_path, monkeypatch, *, drop_cache: bool = False) -> list:
    """Reference run, then a run stopped mid-epoch 2 and started again (a new method instance, as a new
    process); the two records must agree. Returns the lifecycle events of the resumed start."""
    *_, state, _ = STATEFUL[name]
    events = spy_lifecycle(monkeypatch, method_class(name), state)
    spec = spec_for(name)
    reference = execute(spec, tmp_path / "ref", log=quiet)
    # A fresh start: prepare, then setup once the state is complete; setup charges nothing.
    assert [e[0] for e in events] == ["prepare", "setup"] and events[1][2] == () and events[1][3]
    with monkeypatch.context() as stopping:
        stop_in_the_second_epoch(stopping)
        try:
            with pytest.raises(train.Preempted, match="in epoch 2 after step 2"):
                execute(spec, tmp_path / "cut", log=quiet)
        finally:
            train.STOP.clear()
    if drop_cache:
        shutil.rmtree(tmp_path / "cut" / "cache")
    events.clear()
    logs: list[str] = []
    resumed = execute(spec, tmp_path / "cut", log=logs.append)
    assert any("resumed at epoch 1" in line for line in logs), logs
    same_run(resumed, reference)
    return events


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_a_resumed_run_equals_the_uninterrupted_one_with_its_state_set_up(name, tmp_path, monkeypatch):
    *_, rebuilt = STATEFUL[name]
    events = resumed_equals_uninterrupted(name, tmp_path, monkeypatch)
    # The resume loads the checkpoint (no context injected before), never prepares again, then sets up:
    # what the checkpoint lacks (`rebuilt`) is missing before setup and in place after it, uncharged.
    (load, ctx_at_load), setup = events[0], events[1]
    assert load == "load_state_dict" and ctx_at_load is None
    assert len(events) == 2 and setup[0] == "setup"
    _, missing_before, missing_after, uncharged = setup
    assert missing_before == rebuilt and missing_after == () and uncharged


def test_rela_recomputes_its_targets_in_setup_uncharged_when_the_cache_is_gone(tmp_path, monkeypatch):
    """Without the cached targets the resume recomputes them in setup: the same record (compute
    included: nothing charged twice), no meter swapped, nothing charged while setup runs."""
    events = resumed_equals_uninterrupted("rela", tmp_path, monkeypatch, drop_cache=True)
    assert [e[0] for e in events] == ["load_state_dict", "setup"]
    assert events[1][1:] == (("targets",), (), True)
    assert not (tmp_path / "cut" / "cache" / "rela-targets").exists()  # a recomputation is not cached


# -- setup is never charged -------------------------------------------------------------------------


class SetupRunsAPass(Method):
    """Test-only (not registered): a setup that runs a metered pass, as a rebuild from scratch would."""

    def setup(self, ctx):
        super().setup(ctx)
        with ctx.meter.measure("selection", ("setup-pass",), examples=8):
            self.product = torch.randn(8, 16) @ torch.randn(16, 4)
        ctx.meter.charge_flops("selection", 10**6)


class ForgetsSuper(Method):
    def setup(self, ctx):
        self.ready = True


def test_setup_is_never_charged_nor_seen_by_an_outer_counter():
    ctx = build_context(load_protocol("smoke"), 0, log=quiet)
    method = SetupRunsAPass()
    with flop_counter() as outer:
        train.set_up(method, ctx)
    assert method.ctx is ctx and method.product.shape == (8, 4)  # it ran
    assert ctx.meter.total == 0 and ctx.meter.examples["selection"] == 0 and outer.get_total_flops() == 0
    assert ctx.meter.figures == {}  # nothing measured inside is reused later at a wrong price
    with ctx.meter.measure("selection", ("after",)):  # the meter works again after it
        torch.randn(8, 16) @ torch.randn(16, 4)
    assert ctx.meter.flops["selection"] == 2 * 8 * 16 * 4
    with pytest.raises(TypeError, match="must call super"):
        train.set_up(ForgetsSuper(), ctx)


# -- traits, hooks, the public names ---------------------------------------------------------------


def test_traits_are_declared_once_and_checked_at_registration():
    class OldFlags(Method):
        needs_holdout = True

    with pytest.raises(ValueError, match="sets needs_holdout as class attributes"):
        register("test-lifecycle-old-flags")(OldFlags)

    class NamesAMissingParameter(Method):
        traits = Traits(candidate_factor="factor")

    with pytest.raises(ValueError, match="factor"):
        register("test-lifecycle-missing-param")(NamesAMissingParameter)
    with pytest.raises(ValueError, match="kind"):
        Traits(kind="unsupervised")
    with pytest.raises(ValueError, match="candidate_factor"):
        Traits(candidate_factor=0)
    assert not {"test-lifecycle-old-flags", "test-lifecycle-missing-param"} & set(list_methods())


def test_the_candidate_factor_is_resolved_from_the_parameter_the_traits_name():
    assert method_class("max-loss").traits.candidate_factor == "candidate_factor"
    assert method_class("max-loss")(candidate_factor=5).candidate_factor() == 5
    assert Method().candidate_factor() == 1

    class Fixed(Method):
        traits = Traits(candidate_factor=3)

    assert Fixed().candidate_factor() == 3


def test_the_base_objective_is_the_protocols_cross_entropy_and_found_like_any_hook():
    ctx = build_context(apply_overrides(load_protocol("smoke"), {"label_smoothing": 0.1}), 0, log=quiet)
    method = Method()
    method.setup(ctx)
    model = ctx.new_model("main")
    batch = next(iter(ctx.data.train.batches(torch.arange(32), 32)))
    loss, logits = method.objective(model, batch)
    expected = F.cross_entropy(model(batch.x), batch.y, reduction="none", label_smoothing=0.1)
    assert torch.allclose(loss, expected) and logits.shape == (32, ctx.data.num_classes)
    assert not api.overrides(method, "objective") and api.overrides(method_class("group-dro")(), "objective")
    # The trainer runs the base under its own protocol: a helper method without a context trains too.
    trainer = train.Trainer(ctx, model, Method(), evaluate=False)
    assert torch.allclose(trainer.objective(model, batch)[0], expected)


def test_the_api_exports_what_a_method_author_needs():
    names = {"Method", "Traits", "Param", "register", "Batch", "EpochPlan", "Selection", "Step", "StepInfo",
             "RunContext", "overrides"}
    assert names <= set(api.__all__)
    assert all(getattr(api, name) is not None for name in api.__all__)
    from benchmarks.core.context import RunContext
    from benchmarks.core.registry import Param
    from benchmarks.core.registry import register as registry_register

    assert api.RunContext is RunContext and api.Param is Param and api.register is registry_register

"""A run's identity, resolved once: protocol + method + parameters + seed + overrides -> run id.

`RunSpec` is what a user (or a manifest line) asks for. `RunSpec.resolve()` loads the protocol,
applies the overrides, fills in the method's defaults, checks that the method fits the protocol,
and returns a `ResolvedRun` carrying the run id and the protocol fingerprint. Every command and
every job reads the id from there: this module is the only place that defines it.

The run id hashes the protocol by name AND by resolved contents (`benchmarks.core.protocol.fingerprint`,
overrides applied), so an edited protocol file makes new runs instead of finding old records
"complete"; fields that cannot change a run (description, seeds, save_model) and defaults written
out do not change it.

A run of a tuned sweep (benchmarks/jobs/tuning.py) also carries its `tuning` descriptor (a trial, or
the selected setting at a final seed): it enters the run id, and the record carries it unchanged,
so one record file has one role. A run without one keeps the id it always had.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from benchmarks.core.protocol import Protocol, apply_overrides, fingerprint, load_protocol
from benchmarks.core.registry import method_class, resolve_params
from benchmarks.errors import BenchError

if TYPE_CHECKING:
    from benchmarks.api import Method


def run_id(protocol: str, method: str, params: dict, seed: int, overrides: dict, protocol_fingerprint: str,
           tuning: dict | None = None) -> str:
    """A stable hash of what defines a run; `params` resolved (defaults filled in). `tuning` (a tuned
    sweep's descriptor) enters the hash only when given, so every other run keeps its id."""
    fields = {"protocol": protocol, "fingerprint": protocol_fingerprint, "method": method, "params": params,
              "seed": seed, "overrides": overrides}
    if tuning is not None:
        fields["tuning"] = tuning
    key = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ResolvedRun:
    """A run resolved once: the protocol with its overrides, the full parameters, the identity."""

    spec: RunSpec
    protocol: Protocol
    params: dict
    fingerprint: str
    run_id: str

    @property
    def method(self) -> str:
        return self.spec.method

    @property
    def method_class(self) -> type[Method]:
        return method_class(self.spec.method)

    @property
    def seed(self) -> int:
        return self.spec.seed

    @property
    def overrides(self) -> dict:
        return self.spec.overrides

    def identity(self) -> dict:
        """The fields every record of this run starts with (benchmarks.core.record.new_record)."""
        identity = {"run_id": self.run_id, "protocol": self.protocol.name, "method": self.method,
                    "params": self.params, "seed": self.seed, "overrides": self.overrides,
                    "budget": self.protocol.budget, "selection_rule": self.protocol.selection_rule,
                    "reads_train_groups": self.method_class.traits.reads_train_groups,
                    "protocol_fingerprint": self.fingerprint, "resolved_protocol": self.protocol.as_dict()}
        if self.spec.tuning is not None:
            identity["tuning"] = self.spec.tuning
        return identity


@dataclass
class RunSpec:
    """What defines a run, as asked for; `resolve()` gives its identity (params with defaults filled in)."""

    protocol: str
    method: str
    params: dict = field(default_factory=dict)
    seed: int = 0
    overrides: dict = field(default_factory=dict)
    tuning: dict | None = None  # a tuned sweep's trial or selected run (benchmarks/jobs/tuning.py)
    # The last resolution and the fields it was made from: a spec is resolved once, and again only if
    # a field was changed after (the protocol file is read once, not on every access to run_id).
    _resolution: tuple[str, ResolvedRun] | None = field(default=None, init=False, repr=False, compare=False)

    def resolve(self) -> ResolvedRun:
        """Protocol, overrides, parameters and the method's fit, checked (BenchError), and the run id."""
        key = json.dumps([self.protocol, self.method, self.params, self.seed, self.overrides, self.tuning],
                         sort_keys=True, default=str)
        if self._resolution is not None and self._resolution[0] == key:
            return self._resolution[1]
        protocol = apply_overrides(load_protocol(self.protocol), self.overrides)
        params = resolve_params(self.method, self.params)
        check_fit(protocol, self.method)
        protocol_fingerprint = fingerprint(protocol)
        resolved = ResolvedRun(self, protocol, params, protocol_fingerprint,
                               run_id(protocol.name, self.method, params, self.seed, self.overrides,
                                      protocol_fingerprint, self.tuning))
        self._resolution = (key, resolved)
        return resolved

    @property
    def run_id(self) -> str:
        return self.resolve().run_id


def unfit_reason(protocol: Protocol, name: str, role: str = "method") -> str | None:
    """Why a method cannot run under a protocol (None when it can): its kind against the protocol's task,
    training group labels the data lacks, a held-out split the protocol lacks. One rule for `run`,
    `bench` and sweeps (bench leaves such methods out and says why)."""
    from benchmarks.data import dataset_has_groups  # the dataset registry, loaded only when asked

    traits = method_class(name).traits
    if traits.kind != protocol.task:
        return (f"{role} '{name}' is {traits.kind} and protocol '{protocol.name}' is {protocol.task}; "
                "`python -m benchmarks list` shows which methods fit which protocols")
    if traits.reads_train_groups and not dataset_has_groups(protocol.dataset, protocol.data_kwargs):
        return (f"{role} '{name}' reads training group labels and protocol '{protocol.name}' "
                f"(dataset {protocol.dataset}) has none; use a protocol with groups (waterbirds, spurious-fashion)")
    if traits.needs_holdout and protocol.holdout == 0:
        return (f"{role} '{name}' needs a held-out split and protocol '{protocol.name}' has none; "
                "set one, e.g. --set holdout=0.1 (a fraction) or holdout=5000 (a count)")
    return None


def check_fit(protocol: Protocol, method: str) -> None:
    """The method and the protocol's reference fit the protocol (BenchError otherwise)."""
    for name, role in ((method, "method"), (protocol.reference, "reference method")):
        reason = unfit_reason(protocol, name, role)
        if reason:
            raise BenchError(reason)

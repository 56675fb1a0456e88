"""Method registry: `@register("name")` on a Method subclass, `create_method(name, **params)`.

Every method declares its parameters (type, default, range) in one place, its `params` dict, so
`list` can show them and bad values fail before any training starts.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from benchmarks.core.plugins import METHODS_GROUP, failures_note, load_plugins
from benchmarks.errors import BenchError

if TYPE_CHECKING:  # benchmarks.api imports this module (it re-exports Param and register)
    from benchmarks.api import Method

_METHODS: dict[str, type[Method]] = {}
_PACKAGES_WITH_METHODS = ("baselines", "methods")


@dataclass(frozen=True)
class Param:
    default: Any
    help: str = ""
    low: float | None = None  # inclusive bounds unless the *_open flag says otherwise
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | None = None
    # How a value reads in words where a number would puzzle a reader (a sentinel: ccs_beta -1 ->
    # "paper beta"); plots use it. Not part of the parameter's identity (run ids hash values only).
    labels: dict | None = field(default=None, compare=False, hash=False)

    def reads(self, value: Any) -> str | None:
        """The words `labels` gives `value`, or None."""
        return (self.labels or {}).get(value)

    @property
    def kind(self) -> type:
        return type(self.default)

    def describe(self) -> str:
        parts = [f"default {self.default!r}"]
        if self.choices:
            parts.append("one of " + "/".join(map(str, self.choices)))
        if self.low is not None or self.high is not None:
            lo = "(" if self.low_open else "["
            hi = ")" if self.high_open else "]"
            parts.append(f"in {lo}{self.low if self.low is not None else '-inf'}, "
                         f"{self.high if self.high is not None else 'inf'}{hi}")
        return ", ".join(parts)

    def check(self, method: str, name: str, value: Any) -> Any:
        kind = self.kind
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
            raise BenchError(f"method '{method}': parameter '{name}' must be {kind.__name__}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):  # TOML reads nan and inf as floats
            raise BenchError(f"method '{method}': parameter '{name}' must be a finite number, got {value!r} "
                             f"({self.describe()})")
        if self.choices and value not in self.choices:
            raise BenchError(f"method '{method}': parameter '{name}' must be one of {self.choices}, got {value!r}")
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise BenchError(f"method '{method}': parameter '{name}'={value!r} is out of range ({self.describe()})")
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise BenchError(f"method '{method}': parameter '{name}'={value!r} is out of range ({self.describe()})")
        return value


# Class flags that `traits = Traits(...)` replaced: a class still setting one would be silently ignored.
_FORMER_FLAGS = ("kind", "needs_holdout", "reads_train_groups", "for_groups", "candidate_multiplier",
                 "augment_batches", "select_updates_batchnorm", "unused_parameters", "single_process_only",
                 "save_model", "headline_params")


def check_traits(name: str, cls: type[Method]) -> None:
    """A method's traits name its own parameters, and no former class flag is left (ValueError)."""
    traits = cls.traits
    for klass in cls.__mro__:
        stale = sorted(set(vars(klass)) & set(_FORMER_FLAGS))
        if stale:
            raise ValueError(f"method '{name}': {klass.__name__} sets {', '.join(stale)} as class attributes; "
                             "declare them in `traits = Traits(...)` (benchmarks.api)")
    named = [traits.candidate_factor] if isinstance(traits.candidate_factor, str) else []
    unknown = [p for p in (*named, *traits.headline_params) if p not in cls.params]
    if unknown:
        raise ValueError(f"method '{name}': traits name parameter(s) {', '.join(unknown)} that it does not have "
                         f"(its parameters: {', '.join(cls.params) or 'none'})")


def register(name: str):
    def decorate(cls: type[Method]) -> type[Method]:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method '{name}' registered twice")
        check_traits(name, cls)
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorate


def _load_all() -> None:
    """The built-in packages (each imports all its modules), then the installed plugins' methods
    (once per process; built-ins first, so a plugin reusing a built-in name is the one that fails)."""
    for package in _PACKAGES_WITH_METHODS:
        importlib.import_module(package)
    load_plugins(METHODS_GROUP)


def list_methods() -> dict[str, type[Method]]:
    _load_all()
    return dict(sorted(_METHODS.items()))


def method_class(name: str) -> type[Method]:
    methods = list_methods()
    if name not in methods:
        raise BenchError(f"unknown method '{name}' (available: {', '.join(methods)}){failures_note(METHODS_GROUP)}")
    return methods[name]


def resolve_params(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """The full parameter set of a method: defaults overlaid with the given values, checked."""
    cls = method_class(name)
    unknown = sorted(set(given) - set(cls.params))
    if unknown:
        known = ", ".join(cls.params) or "none"
        raise BenchError(f"method '{name}' has no parameter '{unknown[0]}' (its parameters: {known})")
    resolved = {k: p.default for k, p in cls.params.items()}
    for key, value in given.items():
        resolved[key] = cls.params[key].check(name, key, value)
    cls.check_params(resolved)
    return resolved


def create_method(name: str, **params: Any) -> Method:
    return method_class(name)(**resolve_params(name, params))

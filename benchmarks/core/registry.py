"""Method registry: `@register("name")` on a Method subclass, `create_method(name, **params)`.

Every method declares its parameters (type, default, range) in one place, its `params` dict, so
`list` can show them and bad values fail before any training starts. A parameter's search space for
tuning sits next to its default (`Param(..., space=...)`, DomainBed's way); a method may also declare
the protocol settings its paper tunes per method (`Method.protocol_space`). Both are checked when the
method is registered: a space outside the parameter's own bounds, or naming no protocol setting, is a
ValueError at import, not a surprise in the middle of a sweep.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from benchmarks.core.plugins import METHODS_GROUP, failures_note, load_plugins
from benchmarks.errors import BenchError

if TYPE_CHECKING:  # benchmarks.api imports this module (it re-exports Param and register)
    from benchmarks.api import Method

_METHODS: dict[str, type[Method]] = {}
_PACKAGES_WITH_METHODS = ("baselines", "methods")


SIGNIFICANT_DIGITS = 4  # sampled floats are rounded so that records and tables stay readable


@dataclass(frozen=True)
class Space:
    """A search distribution: uniform over `choices`, or over the range [low, high] (log-uniform with
    `log=True`), drawing integers when `integer` (a Param's space takes it from the default's type).

        Param(100, "...", low=0, space=(20, 50, 100))                     # choices
        Param(0.01, "...", low=0.0, space=Space.range(1e-3, 1e-1, log=True))
    """

    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    def __post_init__(self):
        if self.choices:
            if not isinstance(self.choices, tuple) or self.low is not None or self.high is not None:
                raise ValueError(f"Space: choices must be a non-empty tuple, without a range, got {self!r}")
            return
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                      for v in (self.low, self.high))
        if not numbers or not self.low < self.high:
            raise ValueError(f"Space: a range needs finite numbers low < high, got {self.low!r} and {self.high!r}")
        if self.log and self.low <= 0:
            raise ValueError(f"Space: a log range needs low > 0, got {self.low!r}")
        if self.integer and not (isinstance(self.low, int) and isinstance(self.high, int)):
            raise ValueError(f"Space: an integer range needs integer bounds, got {self.low!r} and {self.high!r}")

    @classmethod
    def range(cls, low: float, high: float, *, log: bool = False) -> Space:
        """[low, high]; integers when both bounds are ints (a float Param's space draws floats)."""
        return cls(low=low, high=high, log=log,
                   integer=isinstance(low, int) and isinstance(high, int) and not isinstance(low, bool))

    def describe(self) -> str:
        if self.choices:
            return "tuned over " + "/".join(map(str, self.choices))
        kind = "log-uniform" if self.log else "uniform"
        return f"tuned {kind} in [{self.low}, {self.high}]" + (" (integers)" if self.integer else "")

    def contains(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        return self.low <= value <= self.high and (not self.integer or isinstance(value, int))

    def sample(self, rng: random.Random) -> Any:
        """One draw from `rng` (seeded by the caller: the draws are reproducible)."""
        if self.choices:
            return self.choices[rng.randrange(len(self.choices))]
        if self.integer:
            if not self.log:
                return rng.randint(self.low, self.high)
            # log-uniform over [low, high + 1), floored: each integer gets the mass of its unit interval
            return min(self.high, math.floor(math.exp(rng.uniform(math.log(self.low), math.log(self.high + 1)))))
        value = (math.exp(rng.uniform(math.log(self.low), math.log(self.high))) if self.log
                 else rng.uniform(self.low, self.high))
        rounded = float(f"{value:.{SIGNIFICANT_DIGITS}g}")
        return rounded if self.low <= rounded <= self.high else value


def as_space(space: Space | tuple | None) -> Space | None:
    if space is None or isinstance(space, Space):
        return space
    if isinstance(space, tuple):
        return Space(choices=space)
    raise ValueError(f"a search space is a tuple of choices or a Space, got {space!r}")


@dataclass(frozen=True)
class Param:
    default: Any
    help: str = ""
    low: float | None = None  # inclusive bounds unless the *_open flag says otherwise
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | None = None
    # The search space used when a sweep tunes the method ([tuning] in a sweep spec): a tuple of
    # choices or a Space. None: the parameter is not tuned (it keeps its default, or a grid's value).
    space: Space | tuple | None = None
    # How a value reads in words where a number would puzzle a reader (a sentinel: ccs_beta -1 ->
    # "paper beta"); plots use it. Not part of the parameter's identity (run ids hash values only).
    labels: dict | None = field(default=None, compare=False, hash=False)

    def __post_init__(self):
        space = as_space(self.space)
        if space is not None and not space.choices:
            if self.kind is int and not space.integer:
                raise ValueError(f"Param(default {self.default!r}): an int parameter's range needs int bounds, "
                                 f"got {space.low!r} and {space.high!r}")
            if self.kind is float and space.integer:  # Space.range(0, 1) for a float: draw floats
                space = dataclasses.replace(space, low=float(space.low), high=float(space.high), integer=False)
            if self.kind not in (int, float):
                raise ValueError(f"Param(default {self.default!r}): a range needs a numeric parameter; "
                                 "give a tuple of choices")
        object.__setattr__(self, "space", space)

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
        if self.space is not None:
            parts.append(self.space.describe())
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


def check_spaces(name: str, cls: type[Method]) -> None:
    """Every search space lies within what it tunes (ValueError at registration): a parameter's choices
    and range ends pass the parameter's own check; `protocol_space` names numeric protocol settings."""
    for pname, param in cls.params.items():
        space = param.space
        if space is None:
            continue
        values = space.choices or (space.low, space.high)
        for value in values:
            try:
                param.check(name, pname, value)
            except BenchError as exc:
                raise ValueError(f"method '{name}': the search space of '{pname}' ({space.describe()}) leaves "
                                 f"the parameter's own bounds: {exc}") from None
    from benchmarks.core.protocol import Protocol  # the registry is imported before protocols are needed

    kinds = {f.name: f.type for f in dataclasses.fields(Protocol)}
    for key, space in cls.protocol_space.items():
        kind = kinds.get(key)
        if not isinstance(space, Space):
            raise ValueError(f"method '{name}': protocol_space['{key}'] must be a Space, got {space!r}")
        if kind not in ("int", "float", int, float):
            raise ValueError(f"method '{name}': protocol_space names '{key}', which is not a numeric protocol "
                             f"setting (numeric settings: {', '.join(k for k, t in kinds.items() if t in ('int', 'float'))})")
        values = space.choices or (space.low, space.high)
        if kind in ("int", int) and not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"method '{name}': protocol_space['{key}'] must draw integers ('{key}' is an int)")
        if kind in ("float", float) and space.integer:
            raise ValueError(f"method '{name}': protocol_space['{key}'] draws integers; give float bounds "
                             f"('{key}' is a float)")
        if space.choices and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ValueError(f"method '{name}': protocol_space['{key}'] choices must be numbers")


def register(name: str):
    def decorate(cls: type[Method]) -> type[Method]:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method '{name}' registered twice")
        check_traits(name, cls)
        check_spaces(name, cls)
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

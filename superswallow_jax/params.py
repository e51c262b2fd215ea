"""Parameter settings: mergekit's filter lists and gradients, as immutable values.

A parameter setting in a mergekit YAML is one of:

* a scalar (number, bool or string);
* a list of numbers: a *gradient*, interpolated at ``t`` in [0, 1];
* ``{filter: <substring>, value: <scalar or gradient>}``;
* a list of such conditionals, scanned in order, first match wins.

A conditional matches a tensor name when ``filter`` is missing, is ``"*"``, or is
a substring of the name. When nothing matches the setting yields ``None`` and
resolution falls through to the next level (see :mod:`superswallow_jax.plan`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

Scalar = Union[float, bool, str]


@dataclass(frozen=True)
class Gradient:
    """A list of K numbers interpolated piecewise-linearly at t (Python double)."""

    values: tuple[float, ...]

    def at(self, t: float) -> float:
        v = self.values
        k = len(v)
        if k == 1:
            return v[0]
        s = t * (k - 1)
        i0 = int(math.floor(s))
        i0 = max(0, min(k - 1, i0))
        i1 = min(k - 1, i0 + 1)
        f = s - i0
        return (1 - f) * v[i0] + f * v[i1]


Value = Union[Scalar, Gradient]


@dataclass(frozen=True)
class Conditional:
    """One ``{filter, value}`` entry. ``filter`` None means catch-all."""

    filter: str | None
    value: Value

    def matches(self, name: str) -> bool:
        return self.filter is None or self.filter == "*" or self.filter in name


@dataclass(frozen=True)
class Setting:
    """An ordered tuple of conditionals; the first that matches wins."""

    rules: tuple[Conditional, ...]

    def evaluate(self, name: str, t: float) -> Scalar | None:
        for rule in self.rules:
            if rule.matches(name):
                v = rule.value
                return v.at(t) if isinstance(v, Gradient) else v
        return None

    def describe(self) -> str:
        parts = []
        for r in self.rules:
            v = list(r.value.values) if isinstance(r.value, Gradient) else r.value
            parts.append(f"{r.filter or '*'}: {v}" if r.filter is not None else f"{v}")
        return "; ".join(parts)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def numeric_string(x: object) -> float | None:
    """The finite float a string such as ``"0.5"`` spells, else None (mergekit's pydantic coerces them)."""
    if not isinstance(x, str) or len(x) > 64:
        return None
    try:
        v = float(x)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def parse_value(raw: object, where: str) -> Value:
    """Parse a scalar or gradient. ``where`` names the config key for errors."""
    from .errors import ConfigError, short

    if isinstance(raw, bool) or isinstance(raw, str):
        return raw
    if _is_number(raw):
        return float(raw)
    if isinstance(raw, list):
        if not raw:
            raise ConfigError(f"{where}: empty list")
        if all(_is_number(x) or numeric_string(x) is not None for x in raw):
            return Gradient(tuple(float(x) for x in raw))
        raise ConfigError(f"{where}: a gradient must be a list of numbers, got {short(raw)}")
    raise ConfigError(f"{where}: expected a number, bool, string or list of numbers, got {type(raw).__name__}")


def parse_setting(raw: object, where: str) -> Setting:
    """Parse any of the setting forms into a :class:`Setting`."""
    from .errors import ConfigError, short

    def cond(item: object, w: str) -> Conditional:
        if isinstance(item, dict):
            unknown = set(item) - {"filter", "value"}
            if unknown:
                raise ConfigError(f"{w}: unknown key {short(sorted(map(str, unknown))[0])} (expected filter, value)")
            if "value" not in item:
                raise ConfigError(f"{w}: conditional without 'value'")
            f = item.get("filter")
            if f is not None and not isinstance(f, str):
                raise ConfigError(f"{w}.filter: must be a string")
            return Conditional(f, parse_value(item["value"], f"{w}.value"))
        return Conditional(None, parse_value(item, w))

    if isinstance(raw, list) and raw and any(isinstance(x, dict) for x in raw):
        if not all(isinstance(x, dict) for x in raw):
            raise ConfigError(f"{where}: cannot mix conditionals and numbers in one list")
        return Setting(tuple(cond(x, f"{where}[{i}]") for i, x in enumerate(raw)))
    return Setting((cond(raw, where),))


def coerce(value: object, typ: type, where: str) -> object:
    """``value`` as a parameter of type ``typ`` (float, int or bool), else a ConfigError naming ``where``.

    Numbers in quotes (``"0.5"``) count as numbers, as mergekit accepts them.
    """
    from .errors import ConfigError, short

    if typ in (float, int) and numeric_string(value) is not None:
        value = numeric_string(value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)):
            return bool(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is int:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer():
            return int(value)
    raise ConfigError(f"{where}: expected {typ.__name__}, got {short(value)}")


def literals(setting: Setting) -> list:
    """Every value a setting spells out (gradient points included): what it can evaluate to lies
    between them, so checking these against a closed range checks every tensor's value."""
    return [x for r in setting.rules for x in (r.value.values if isinstance(r.value, Gradient) else (r.value,))]

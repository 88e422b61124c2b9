"""Resolving parameter settings (scalars, per-layer gradients, name filters) to scalars.

Semantics follow mergekit 0.1.5 so existing configs give the same numbers:
- a list of numbers is a gradient: with `t` in [0, 1] the position of the layer within its slice,
  the value is interpolated linearly between the two nearest of the evenly spaced points;
  a list of booleans picks `values[int(t * (n - 1))]`;
- a list of `{filter, value}` entries picks the first whose filter is a substring of the tensor
  name (`*` or no filter matches everything);
- scopes are searched from the most specific (the model's own parameters) to the global ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from mergelab.methods.registry import Param, ParamValue
from mergelab.plan.config import ConditionalValue, ParameterSetting

_MISSING = object()


def _to_number(value: Any) -> Any:
    # YAML 1.1 reads `1e-3` as a string; mergekit accepts it as a number, so do we.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def evaluate_setting(setting: ParameterSetting, tensor_name: str, t: float) -> Any:
    """Resolve one setting for a tensor at layer position `t`; None when no filter matches."""
    if isinstance(setting, ConditionalValue):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, ConditionalValue) for e in setting):
            for cond in setting:
                if cond.filter in (None, "*") or (tensor_name and cond.filter in tensor_name):
                    return evaluate_setting(cond.value, tensor_name, t)
            return None
        values = [_to_number(v) for v in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        lower = int(scaled)
        upper = min(len(values) - 1, lower + 1)
        frac = scaled - lower
        return (1 - frac) * values[lower] + frac * values[upper]
    return _to_number(setting)


def resolve_param(
    param: Param,
    scopes: Iterable[Mapping[str, ParameterSetting] | None],
    tensor_name: str,
    t: float,
) -> ParamValue | object:
    """The value of `param` from the first scope that sets it, else its default.

    Returns the module-level sentinel `MISSING` when a required parameter is set nowhere.
    """
    for scope in scopes:
        if scope and param.name in scope:
            value = evaluate_setting(scope[param.name], tensor_name, t)
            if value is not None:
                return param.coerce(value)
    if param.default is None:
        return _MISSING
    return param.default


MISSING = _MISSING


def setting_leaves(setting: ParameterSetting) -> list[Any]:
    """Every scalar a setting can produce (for validating values up front)."""
    if isinstance(setting, ConditionalValue):
        return setting_leaves(setting.value)
    if isinstance(setting, list):
        out: list[Any] = []
        for item in setting:
            out.extend(setting_leaves(item))
        return out
    return [_to_number(setting)]

"""Find a policy by name: built-ins and plugins alike are entry points of the group
``overcommitd.policies``; anything else may be named as ``module:Class``.

A policy that fails to load stops the start with an error naming it (MOM only warned
about a missing controller and ran without it).

``module:Class`` imports code, so only the config file may name one (whoever writes it
already controls the host); a name from the network goes through ``create_registered``,
which looks in the entry points and imports nothing else.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from pydantic import BaseModel, ValidationError

from policies.api import ModulePathRefused, Policy, PolicyLoadError, UnknownPolicy

GROUP = "overcommitd.policies"
# Every policy's durations (``*_s`` parameters) stay within a year: a larger one, like
# ``inf`` or ``nan``, is a typo or an attack, never a setting (a policy's own Params
# model sets tighter bounds where it has them).
MAX_PARAM_DURATION_S = 365 * 86400.0


def known() -> dict[str, EntryPoint]:
    """Registered policies by name."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def load_class(spec: str, *, allow_module_path: bool = True) -> type[Any]:
    """The policy class for a registry name or, when allowed, a ``module:Class`` spec."""
    if ":" in spec:
        if not allow_module_path:
            raise ModulePathRefused(
                f"policy {spec[:80]!r}: module:Class names are accepted in the config file only;"
                " name a registered policy"
            )
        module_name, _, attr = spec.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError, TypeError) as e:  # ValueError: ":x", an empty module
            raise PolicyLoadError(f"cannot load policy {spec!r}: {e}") from e
    else:
        registered = known()
        if spec not in registered:
            names = ", ".join(sorted(registered)) or "(none: is overcommitd installed?)"
            raise UnknownPolicy(
                f"unknown policy {spec[:80]!r}; known policies: {names}; a plugin can also be named as module:Class"
            )
        try:
            cls = registered[spec].load()
        except Exception as e:
            raise PolicyLoadError(f"policy {spec!r} ({registered[spec].value}) failed to load: {e}") from e
    if not callable(getattr(cls, "decide", None)) or not callable(getattr(cls, "initial_state", None)):
        raise PolicyLoadError(f"{spec!r} is not a policy: it needs decide() and initial_state() (see policies.api)")
    return cls  # type: ignore[no-any-return]


def create(spec: str, params: Mapping[str, Any] | None = None, *, allow_module_path: bool = True) -> Policy[Any]:
    """Instantiate a policy, validating ``params`` against its ``Params`` model."""
    cls = load_class(spec, allow_module_path=allow_module_path)
    params = dict(params or {})
    if out_of_range := _out_of_range(params):
        raise PolicyLoadError(f"policy {spec!r}: bad parameters: {'; '.join(out_of_range)}")
    params_model: type[BaseModel] | None = getattr(cls, "Params", None)
    if params_model is None:
        if params:
            raise PolicyLoadError(f"policy {spec!r} takes no parameters, got: {', '.join(sorted(params))}")
        return cls()  # type: ignore[no-any-return]
    try:
        return cls(params_model.model_validate(params))  # type: ignore[no-any-return]
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise PolicyLoadError(f"policy {spec!r}: bad parameters: {problems}") from e


def _out_of_range(params: Mapping[str, Any], prefix: str = "", depth: int = 0) -> list[str]:
    """Non-finite numbers anywhere, and durations above ``MAX_PARAM_DURATION_S``."""
    problems = []
    for key, value in params.items():
        where = f"{prefix}{key}"
        if isinstance(value, Mapping) and depth < 8:
            problems += _out_of_range(value, f"{where}.", depth + 1)
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{where}: {value} is not a finite number")
        elif str(key).endswith("_s") and isinstance(value, int | float) and value > MAX_PARAM_DURATION_S:
            problems.append(f"{where}: {value} s is more than a year ({MAX_PARAM_DURATION_S:.0f} s)")
    return problems

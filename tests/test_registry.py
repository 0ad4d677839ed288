"""The policy registry: entry points, module:Class, parameters, and errors a user can act on."""

from __future__ import annotations

import pytest

from policies import registry
from policies.api import PolicyLoadError
from policies.headroom import HeadroomPolicy


def test_builtins_are_registered_as_entry_points() -> None:
    assert "headroom" in registry.known()
    assert isinstance(registry.create("headroom"), HeadroomPolicy)


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(PolicyLoadError) as e:
        registry.create("nope")
    message = str(e.value)
    assert "unknown policy 'nope'" in message
    for name in registry.known():
        assert name in message
    assert "module:Class" in message


def test_module_class_spec_loads_a_plugin_without_entry_point() -> None:
    policy = registry.create("tests.helpers:Noop")
    assert policy.name == "noop"


def test_a_spec_that_does_not_import_is_a_load_error() -> None:
    with pytest.raises(PolicyLoadError, match="cannot load policy 'no_such_module:X'"):
        registry.create("no_such_module:X")


def test_something_that_is_not_a_policy_is_refused() -> None:
    with pytest.raises(PolicyLoadError, match="is not a policy"):
        registry.create("pathlib:Path")


def test_params_are_validated_by_the_policy_model() -> None:
    policy = registry.create("headroom", {"host_target_used_pct": 70})
    assert isinstance(policy, HeadroomPolicy) and policy.params.host_target_used_pct == 70
    with pytest.raises(PolicyLoadError, match="host_target_used_pct"):
        registry.create("headroom", {"host_target_used_pct": 170})
    with pytest.raises(PolicyLoadError, match="bogus"):
        registry.create("headroom", {"bogus": 1})


def test_size_params_take_the_config_size_syntax() -> None:
    policy = registry.create("headroom", {"min_free_kib": "1.5GiB"})
    assert isinstance(policy, HeadroomPolicy) and policy.params.min_free_kib == 1536 * 1024
    with pytest.raises(PolicyLoadError, match=r"min_free_kib.*'lots' is not a size"):
        registry.create("headroom", {"min_free_kib": "lots"})


def test_a_policy_without_params_refuses_them() -> None:
    with pytest.raises(PolicyLoadError, match="takes no parameters, got: x"):
        registry.create("tests.helpers:Noop", {"x": 1})


def test_every_tuning_dimension_is_a_parameter_its_policy_accepts() -> None:
    from sim.evaluation.tune import SPACES

    for name, dims in SPACES.items():
        params = registry.load_class(name).Params
        for d in dims:
            assert d.name in params.model_fields, f"{name}: {d.name}"
            params.model_validate({d.name: int(d.high) if d.integer else d.high})

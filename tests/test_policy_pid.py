"""pid: converges on a step without oscillating, gives back faster than it takes,
filters noise, tightens under host pressure, and stays within bounds."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from policies.pid import PidParams, PidPolicy, PidState
from policies.testing import GIB, MIB, guest, host

STEP_S = 10.0


def _pid(**params: float) -> PidPolicy:
    """pid without its warm-up, so the control law acts from the first step."""
    return PidPolicy(PidParams(**({"warmup_s": 0.0} | params)))


def _run(
    policy: PidPolicy, demand_kib: list[int], *, actual_kib: int = 8 * GIB, host_avail_kib: int = 32 * GIB
) -> list[int]:
    """Close the loop on an ideal balloon: the guest gets its target at the next step, and
    demand above its memory is swapped (swap-in grows by the shortfall). Returns the
    guest's memory at every step."""
    state: PidState = policy.initial_state()
    sizes = []
    swap_in_kib = 0
    for i, used in enumerate(demand_kib):
        swap_in_kib += max(0, used - actual_kib)
        g = guest(
            at_s=i * STEP_S,
            max_kib=8 * GIB,
            actual_kib=actual_kib,
            available_kib=max(0, actual_kib - used),
            swap_in_kib=swap_in_kib,
        )
        result = policy.decide(host(at_s=i * STEP_S, available_kib=host_avail_kib), [g], state)
        state = result.state
        actual_kib = result.targets_kib.get(g.uuid, actual_kib)
        sizes.append(actual_kib)
    return sizes


def _setpoint(policy: PidPolicy, used: int) -> float:
    return used + policy.setpoint_kib(used, 1.0, 8 * GIB)


def test_converges_on_a_step_without_oscillation() -> None:
    # the controller alone: no room kept for the step it saw, and the room its swap-in
    # earned (policies.signals.Paging) gone by the next step
    policy = _pid(burst_factor=0.0, paging_half_life_s=1e-3)
    demand = [2 * GIB] * 150 + [4 * GIB] * 150
    sizes = _run(policy, demand)
    first, second = sizes[:150], sizes[150:]
    # reclaim from 8 GiB: monotone (within 4 MiB), no overshoot, settles on use + set-point
    setpoint = _setpoint(policy, 2 * GIB)
    assert all(b <= a + 4 * MIB for a, b in pairwise(first))
    assert min(first) > setpoint - 4 * MIB
    assert abs(first[-1] - setpoint) < MIB
    # demand steps up: the swap-in makes it give back at once, then it settles without
    # swinging back below its new set-point
    new_setpoint = _setpoint(policy, 4 * GIB)
    assert second[1] >= new_setpoint - 4 * MIB
    assert min(second[1:]) > new_setpoint - 4 * MIB
    assert abs(second[-1] - new_setpoint) < MIB


def test_gives_back_faster_than_it_takes() -> None:
    policy = _pid(filter_tau_s=0)
    used = 2 * GIB
    setpoint = _setpoint(policy, used)
    spare = guest(max_kib=8 * GIB, actual_kib=int(setpoint + GIB), available_kib=int(setpoint + GIB) - used)
    short = guest(max_kib=8 * GIB, actual_kib=int(setpoint - GIB), available_kib=int(setpoint - GIB) - used)
    taken = spare.actual_kib - policy.decide(host(), [spare], policy.initial_state()).targets_kib[spare.uuid]
    given_back = policy.decide(host(), [short], policy.initial_state()).targets_kib[short.uuid] - short.actual_kib
    assert 0 < taken < given_back


def test_the_integral_removes_the_lag_on_a_ramp() -> None:
    ramp = [int(5 * GIB - i * 4 * MIB) for i in range(300)]  # demand falls 4 MiB per 10 s
    with_i = _run(_pid(ki_per_s=0.002, filter_tau_s=0), ramp)
    without_i = _run(_pid(ki_per_s=0.0, filter_tau_s=0), ramp)
    target = _setpoint(_pid(), ramp[-1])
    assert abs(without_i[-1] - target) > 8 * MIB  # P alone lags by rate / kp
    assert abs(with_i[-1] - target) < abs(without_i[-1] - target)


def test_noisy_use_is_filtered() -> None:
    # use dips by 1 GiB every other sample (a cache flush, a freed buffer)
    noisy = [3 * GIB if i % 2 else 2 * GIB for i in range(200)]
    filtered = _run(_pid(filter_tau_s=120), noisy)[100:]
    raw = _run(_pid(filter_tau_s=0), noisy)[100:]
    assert max(filtered) - min(filtered) < (max(raw) - min(raw)) / 4


def test_host_pressure_tightens_the_setpoint_and_relief_relaxes_it() -> None:
    policy = _pid()
    demand = [2 * GIB] * 200
    calm = _run(policy, demand, host_avail_kib=32 * GIB)[-1]
    pressed = _run(policy, demand, host_avail_kib=2 * GIB)[-1]  # 3 % available < 10 % target
    assert pressed < calm
    state = PidState(host_scale=0.5)
    for i in range(30):
        state = policy.decide(host(at_s=i * STEP_S, available_kib=32 * GIB), [], state).state
    assert state.host_scale == 1.0


def test_psi_counts_as_host_pressure() -> None:
    policy = _pid()
    assert policy.host_pressure(host(available_kib=32 * GIB, psi_some_avg10=0.5)) == 0.0
    assert policy.host_pressure(host(available_kib=32 * GIB, psi_some_avg10=5.0)) == 1.0


def test_swap_in_gives_memory_back() -> None:
    policy = _pid()
    used = 2 * GIB
    actual = int(_setpoint(policy, used))
    g0 = guest(at_s=0, actual_kib=actual, available_kib=actual - used, swap_in_kib=0)
    state = policy.decide(host(at_s=0), [g0], policy.initial_state()).state
    g1 = guest(at_s=10, actual_kib=actual, available_kib=actual - used, swap_in_kib=64 * MIB)
    assert policy.decide(host(at_s=10), [g1], state).targets_kib[g1.uuid] > actual


def test_guests_without_stats_are_held() -> None:
    result = _pid().decide(host(), [guest(stats=False)], PidState())
    assert result.targets_kib == {} and result.errors == {}


@given(
    max_gib=st.integers(1, 64),
    actual_frac=st.floats(0.05, 1.0),
    avail_frac=st.floats(0.0, 1.0),
    floor_frac=st.floats(0.0, 1.0),
    host_avail_frac=st.floats(0.0, 1.0),
)
def test_targets_stay_within_floor_and_maximum_and_reclaim_is_bounded(
    max_gib: int, actual_frac: float, avail_frac: float, floor_frac: float, host_avail_frac: float
) -> None:
    policy = _pid()
    max_kib = max_gib * GIB
    actual = max(1, int(max_kib * actual_frac))
    g = guest(
        max_kib=max_kib, actual_kib=actual, available_kib=int(actual * avail_frac), floor_kib=int(max_kib * floor_frac)
    )
    result = policy.decide(host(available_kib=int(64 * GIB * host_avail_frac)), [g], PidState())
    target = result.targets_kib[g.uuid]
    assert g.floor_kib <= target <= max_kib
    assert target >= min(actual - policy.params.max_reclaim_step_kib, actual) or target == g.floor_kib


def test_an_oom_kill_gives_the_guest_its_maximum_back_for_good() -> None:
    import dataclasses

    policy = _pid()

    def roomy(at_s: float, kills: int):  # type: ignore[no-untyped-def]
        g = guest(at_s=at_s, max_kib=8 * GIB, actual_kib=4 * GIB, available_kib=3 * GIB)
        assert g.stats is not None
        return dataclasses.replace(g, stats=dataclasses.replace(g.stats, oom_kills=kills))

    state = policy.decide(host(at_s=0), [roomy(0, 0)], policy.initial_state()).state
    assert policy.decide(host(at_s=10), [roomy(10, 0)], state).targets_kib["uuid-vm"] < 4 * GIB
    result = policy.decide(host(at_s=10), [roomy(10, 1)], state)
    assert result.targets_kib["uuid-vm"] == 8 * GIB
    for later_s in (3600.0, 30 * 86400.0):
        assert policy.decide(host(at_s=later_s), [roomy(later_s, 1)], result.state).targets_kib["uuid-vm"] == 8 * GIB


def test_a_new_guest_is_watched_before_anything_is_taken() -> None:
    policy = _pid(warmup_s=3600.0)
    state = policy.initial_state()
    targets = []
    for i in range(0, 4000, 10):
        g = guest(at_s=i, max_kib=8 * GIB, actual_kib=8 * GIB, available_kib=6 * GIB)
        result = policy.decide(host(at_s=i), [g], state)
        state = result.state
        targets.append((i, result.targets_kib[g.uuid]))
    assert all(t == 8 * GIB for i, t in targets if i < 3600)
    assert all(t < 8 * GIB for i, t in targets if i >= 3600)

"""The pure translation of libvirt's balloon stats and domain XML."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overcommitd.hypervisor import libvirt_stats as ls
from overcommitd.hypervisor import libvirt_xml as lx
from overcommitd.model import RunState

# As read from a real 512 MiB guest (real-guest.md).
REAL_BULK = {
    "balloon.current": 524288,
    "balloon.maximum": 524288,
    "balloon.swap_in": 0,
    "balloon.swap_out": 0,
    "balloon.major_fault": 0,
    "balloon.minor_fault": 512,
    "balloon.unused": 451612,
    "balloon.available": 481428,
    "balloon.usable": 451308,
    "balloon.last-update": 1795850315,
    "balloon.disk_caches": 3088,
    "balloon.hugetlb_pgalloc": 0,
    "balloon.hugetlb_pgfail": 0,
    "balloon.rss": 222244,
}


def test_misleading_names_are_translated_once() -> None:
    r = ls.from_bulk(REAL_BULK)
    assert (r.current_kib, r.maximum_kib, r.rss_kib) == (524288, 524288, 222244)
    assert r.stats is not None
    assert r.stats.mem_total_kib == 481428  # libvirt "available" is MemTotal
    assert r.stats.mem_available_kib == 451308  # "usable" is MemAvailable
    assert r.stats.mem_free_kib == 451612  # "unused" is MemFree
    assert (r.stats.last_update_s, r.stats.disk_caches_kib, r.stats.minor_faults) == (1795850315.0, 3088, 512)


def test_memory_stats_dict_gives_the_same_reading() -> None:
    d = {k.removeprefix("balloon.").replace("last-update", "last_update"): v for k, v in REAL_BULK.items()}
    d["actual"] = d.pop("current")
    del d["maximum"]
    assert ls.from_memory_stats(d, 524288) == ls.from_bulk(REAL_BULK)


def test_guest_without_stats_has_none() -> None:
    r = ls.from_bulk({"balloon.current": 1000, "balloon.maximum": 2000, "balloon.last-update": 0, "balloon.rss": 5})
    assert r.stats is None and r.current_kib == 1000


def test_no_maximum_is_an_error_naming_the_guest() -> None:
    with pytest.raises(ValueError, match="web1: no positive balloon maximum"):
        ls.from_bulk({}, where="web1")


stat_value = st.one_of(st.none(), st.integers(-5, 2**40), st.booleans(), st.text(max_size=3))


@given(
    current=st.one_of(st.none(), st.integers(0, 2**40)),
    maximum=st.integers(1, 2**40),
    extra=st.dictionaries(
        st.sampled_from([f"balloon.{n}" for n in [*ls._STAT_NAMES.values(), "last-update"]]), stat_value
    ),
)
def test_any_bulk_params_give_a_sane_reading(current: int | None, maximum: int, extra: dict[str, object]) -> None:
    params: dict[str, object] = dict(extra, **{"balloon.maximum": maximum})
    if current is not None:
        params["balloon.current"] = current
    r = ls.from_bulk(params)
    assert 0 <= r.current_kib <= r.maximum_kib == maximum
    if r.stats is not None:
        assert r.stats.last_update_s > 0
        for ours, theirs in ls._STAT_NAMES.items():
            v = params.get("balloon." + theirs)
            expected = v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None
            assert getattr(r.stats, ours) == expected


DOMAIN = f"""<domain type='qemu'><name>g</name>
<metadata><oc:guest xmlns:oc='{lx.NAMESPACE}'><oc:floor unit='MiB'>300</oc:floor><oc:weight>2.5</oc:weight>
<oc:exclude>yes</oc:exclude></oc:guest><other xmlns='urn:x'/></metadata>
<devices><memballoon model='virtio' autodeflate='on' freePageReporting='off'><stats period='2'/></memballoon></devices>
</domain>"""


def test_domain_xml_gives_features_period_and_metadata() -> None:
    d = lx.parse_domain(DOMAIN)
    assert d.has_balloon and d.features.deflate_on_oom and not d.features.reporting
    assert d.stats_period_s == 2.0
    assert d.metadata == lx.GuestMetadata(floor_kib=300 * 1024, weight=2.5, exclude=True)


def test_domain_without_balloon_or_metadata() -> None:
    d = lx.parse_domain("<domain><devices><memballoon model='none'/></devices></domain>")
    assert not d.has_balloon and d.stats_period_s == 0 and d.metadata == lx.GuestMetadata()


def _with_qemu(balloon: str, qemu: str) -> str:
    return (
        f"<domain xmlns:qemu='{lx.QEMU_NAMESPACE}'><devices><memballoon model='virtio'>{balloon}</memballoon>"
        f"</devices>{qemu}</domain>"
    )


def _override(alias: str, value: str) -> str:
    return (
        f"<qemu:override><qemu:device alias='{alias}'><qemu:frontend>"
        f"<qemu:property name='free-page-hint' type='bool' value='{value}'/>"
        "</qemu:frontend></qemu:device></qemu:override>"
    )


def _commandline(*args: str) -> str:
    return "<qemu:commandline>" + "".join(f"<qemu:arg value='{a}'/>" for a in args) + "</qemu:commandline>"


@pytest.mark.parametrize(
    ("balloon", "qemu", "hint"),
    [
        ("", _override("balloon0", "true"), True),  # libvirt's default alias
        ("<alias name='balloon0'/>", _override("balloon0", "on"), True),
        ("<alias name='ua-bal'/>", _override("ua-bal", "true"), True),  # a user alias
        ("<alias name='ua-bal'/>", _override("balloon0", "true"), False),  # another device's override
        ("", _override("balloon0", "false"), False),
        ("", _commandline("-global", "virtio-balloon-pci.free-page-hint=on"), True),
        ("", _commandline("-set", "device.balloon0.free-page-hint=true"), True),
        ("", _commandline("-set", "device.net0.free-page-hint=on"), False),
        ("", _commandline("-global", "virtio-balloon-pci.free-page-reporting=on"), False),
        ("", "", False),
    ],
)
def test_free_page_hint_is_read_from_the_qemu_namespace(balloon: str, qemu: str, hint: bool) -> None:
    assert lx.parse_domain(_with_qemu(balloon, qemu)).features.free_page_hint is hint


def test_bad_metadata_names_the_guest_and_field() -> None:
    bad = DOMAIN.replace("<oc:weight>2.5", "<oc:weight>lots")
    with pytest.raises(lx.DomainXmlError, match="web1: metadata weight 'lots'"):
        lx.parse_domain(bad, where="web1")


@given(floor=st.integers(0, 2**40), weight=st.floats(0.01, 1000, allow_nan=False), exclude=st.booleans())
def test_metadata_round_trips(floor: int, weight: float, exclude: bool) -> None:
    meta = lx.GuestMetadata(floor, weight, exclude)
    assert lx.parse_metadata_element(lx.metadata_element(meta), "g") == meta


@pytest.mark.parametrize(
    ("state", "reason", "migrating", "expected"),
    [
        (1, 0, False, RunState.RUNNING),
        (2, 0, False, RunState.RUNNING),  # blocked on I/O is still running
        (3, 0, False, RunState.PAUSED),  # paused by the user
        (3, 2, False, RunState.MIGRATING),  # VIR_DOMAIN_PAUSED_MIGRATION
        (3, 12, False, RunState.MIGRATING),  # post-copy
        (1, 0, True, RunState.MIGRATING),  # a migration event said so: live pre-copy
        (4, 1, False, RunState.SHUTTING_DOWN),
        (7, 0, False, RunState.PAUSED),  # pmsuspended
        (5, 0, False, None),  # shut off
        (6, 0, True, None),  # crashed
    ],
)
def test_run_state(state: int, reason: int, migrating: bool, expected: RunState | None) -> None:
    assert ls.run_state(state, reason, migrating=migrating) is expected

"""``overcommitd sim calibrate``: the guest constants recovered from recordings built
with the kernel's own rules (sim.memory.kernel), and clear errors on recordings that lack them."""

from __future__ import annotations

import csv
import gzip
import random
import statistics
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overcommitd.cli import EXIT_BAD_INPUT, main
from overcommitd.config import DaemonConfig
from sim.evaluation.compare import spec_from_args
from sim.memory.calibrate import CalibrationError, calibrate
from sim.memory.guest_model_file import GuestModelFileError, load_guest_model
from sim.memory.kernel import DEBIAN_6_1_PC, GuestKernel, boot, mem_available_kib

MIB = 1024
STATS = ["stat_total_memory_kib", "stat_free_memory_kib", "stat_available_memory_kib", "stat_disk_caches_kib"]
EXTRA = ["stat_swap_in_kib", "stat_htlb_pgalloc", "stat_htlb_pgfail"]


def guest_rows(name: str, ram_kib: int, rng: random.Random, *, thp: str = "always") -> list[dict[str, object]]:
    """A guest as the kernel would report it: idle first, then a workload, page cache
    coming and going, the balloon inflated for a while (no DEFLATE_ON_OOM)."""
    km = boot(ram_kib, GuestKernel(thp=thp))
    rows = []
    for i in range(120):
        anon = 0 if i < 10 else rng.randrange(0, km.mem_total_kib // 3)
        caches = rng.randrange(0, 2 * MIB) if i % 7 else rng.randrange(100 * MIB, 200 * MIB)
        balloon = 256 * MIB if 60 <= i < 80 else 0
        total = km.mem_total_kib - balloon
        free = total - km.kernel_kib - anon - caches
        avail = mem_available_kib(km, mem_free_kib=free, file_kib=caches, slab_reclaimable_kib=0)
        row: dict[str, object] = {
            "time_s": 1000 + 2 * i,
            "guest": name,
            "provisioned_kib": ram_kib,
            "used_kib": total - avail,
            "actual_kib": ram_kib - balloon,
            "deflate_on_oom": 0,
            "stat_total_memory_kib": total,
            "stat_free_memory_kib": free,
            "stat_available_memory_kib": avail,
            "stat_disk_caches_kib": caches,
        }
        rows.append(row | dict.fromkeys(EXTRA, 0))
    return rows


def write(path: Path, rows: list[dict[str, object]], columns: list[str]) -> Path:
    with gzip.open(path, "wt", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


COLUMNS = ["time_s", "guest", "provisioned_kib", "used_kib", "actual_kib", "deflate_on_oom", *STATS, *EXTRA]


@pytest.fixture
def recording(tmp_path: Path) -> Path:
    rng = random.Random(16)
    rows = [r for i, ram in enumerate([1024, 2048, 4096, 1536]) for r in guest_rows(f"vm{i}", ram * MIB, rng)]
    rng.shuffle(rows)  # rows may come in any order
    (tmp_path / "rec").mkdir()
    write(tmp_path / "rec" / "guests-2026-12-01T00.csv.gz", rows[:200], COLUMNS)
    write(tmp_path / "rec" / "guests-2026-12-01T01.csv.gz", rows[200:], COLUMNS)
    return tmp_path / "rec"


def test_the_fit_recovers_the_kernels_constants(recording: Path) -> None:
    result = calibrate([recording])
    assert len(result.guests) == 4 and not result.skipped
    for g in result.guests:
        km = boot(g.provisioned_kib)
        assert g.reserved_kib == g.provisioned_kib - km.mem_total_kib
        assert g.kernel_kib == km.kernel_kib
        assert g.reserve_kib == km.totalreserve_kib
    gm, gk = result.model.guest_model, result.model.guest_kernel
    assert gm.reserved_fixed_kib == pytest.approx(DEBIAN_6_1_PC.reserved_fixed_kib, abs=4)
    assert gm.reserved_pct == pytest.approx(DEBIAN_6_1_PC.reserved_pct, abs=1e-3)
    assert gm.kernel_fixed_kib == pytest.approx(DEBIAN_6_1_PC.kernel_fixed_kib, abs=4)
    assert gm.kernel_pct == pytest.approx(DEBIAN_6_1_PC.kernel_pct, abs=1e-3)
    shares = [100 * boot(g.provisioned_kib).totalreserve_kib / g.provisioned_kib for g in result.guests]
    assert gm.min_free_pct == pytest.approx(statistics.median(shares))
    assert 2.5 < gm.min_free_pct < 7.0  # 1-4 GiB guests with THP: 71-117 MiB of reserve
    assert (gk.version, gk.thp) == ("6.1", "always")


def test_thp_off_guests_are_told_apart(tmp_path: Path) -> None:
    rng = random.Random(1)
    rows = [r for ram in (1024, 2048) for r in guest_rows(f"g{ram}", ram * MIB, rng, thp="never")]
    result = calibrate([write(tmp_path / "g.csv.gz", rows, COLUMNS)])
    assert result.model.guest_kernel.thp == "never"
    assert result.model.guest_model.min_free_pct < 1.0


def test_the_cli_writes_a_file_the_replay_reads(recording: Path, tmp_path: Path) -> None:
    out = tmp_path / "guests.toml"
    assert main(["sim", "calibrate", str(recording), "--out", str(out)]) == 0
    loaded = load_guest_model(out)
    assert loaded == calibrate([recording]).model
    parser_args = main.__globals__["build_parser"]().parse_args(["replay", "--guest-model", str(out)])
    spec = spec_from_args(parser_args, DaemonConfig())
    assert spec.guest_model == loaded.guest_model and spec.guest_kernel == loaded.guest_kernel


def test_the_files_guests_section_sets_the_replay_and_an_argument_wins(tmp_path: Path) -> None:
    """Issue 16: what a replay held to real guests needs (stats period and phase, swap,
    DEFLATE_ON_OOM, reporting) is settable from a file, not only from arguments."""
    path = tmp_path / "guests.toml"
    path.write_text(
        "[guests]\nstats_period_s = 2\nswap_mib = 0\nreporting_share = 0.0\n"
        'deflate_on_oom = ["fid-doo"]\nstats_phase_s = { "fid-*" = 1.25 }\n'
    )
    parse = main.__globals__["build_parser"]().parse_args
    spec = spec_from_args(parse(["replay", "--guest-model", str(path)]), DaemonConfig())
    assert (spec.stats_period_s, spec.guest_swap_kib, spec.reporting_share) == (2.0, 0, 0.0)
    assert spec.deflate_on_oom_guests == ("fid-doo",) and spec.stats_phase_s == (("fid-*", 1.25),)
    given = parse(["replay", "--guest-model", str(path), "--stats-period-s", "5", "--guest-swap-mib", "64"])
    spec = spec_from_args(given, DaemonConfig())
    assert (spec.stats_period_s, spec.guest_swap_kib, spec.reporting_share) == (5.0, 64 * 1024, 0.0)
    default = spec_from_args(parse(["replay"]), DaemonConfig())
    assert (default.stats_period_s, default.guest_swap_kib) == (5.0, 512 * 1024)  # ReplaySpec's own


def test_a_recording_without_the_balloon_stats_is_refused_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = guest_rows("vm", 1024 * MIB, random.Random(2))
    path = write(tmp_path / "old.csv.gz", rows, [c for c in COLUMNS if c != "stat_available_memory_kib"])
    with pytest.raises(CalibrationError, match="stat_available_memory_kib"):
        calibrate([path])
    assert main(["sim", "calibrate", str(path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "old.csv.gz" in err and "stat_available_memory_kib" in err and "overcommitd record" in err


def test_a_guest_without_enough_stats_is_skipped_and_named(tmp_path: Path) -> None:
    rows = guest_rows("ok", 1024 * MIB, random.Random(3)) + guest_rows("blank", 1024 * MIB, random.Random(4))[:2]
    result = calibrate([write(tmp_path / "g.csv.gz", rows, COLUMNS)])
    assert [g.guest for g in result.guests] == ["ok"]
    assert len(result.skipped) == 1 and result.skipped[0].startswith("blank: 2 samples")


def test_older_kernels_are_recognised_by_their_tags(tmp_path: Path) -> None:
    rows = guest_rows("vm", 2048 * MIB, random.Random(5))
    no_htlb = [c for c in COLUMNS if "htlb" not in c]
    assert calibrate([write(tmp_path / "a.csv.gz", rows, no_htlb)]).model.guest_kernel.version == "4.16"
    newer = [r | {"stat_oom_kills": 0} for r in rows]
    path = write(tmp_path / "b.csv.gz", newer, [*COLUMNS, "stat_oom_kills"])
    assert calibrate([path]).model.guest_kernel.version == "6.12"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[guest_model]\nkernel_pct = -1\n", "guest_model.kernel_pct"),
        ("[guest_kernel]\nthp = 'sometimes'\n", "guest_kernel.thp"),
        ("[guest_kernel]\nversion = '6'\n", "guest_kernel.version"),
        ("[guest]\n", "guest"),
        ("[guests]\nswap_mib = -1\n", "guests.swap_mib"),
        ("[guests]\nstats_phase_s = { a = -2 }\n", "guests.stats_phase_s.a"),
        ("[guests]\nreporting_share = 1e400\n", "guests.reporting_share"),
        ("x = [", "not TOML"),
    ],
)
def test_a_bad_guest_model_file_names_the_key(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "g.toml"
    path.write_text(text)
    with pytest.raises(GuestModelFileError, match=where):
        load_guest_model(path)


values = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70), st.just(""))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(*(values for _ in STATS), values), min_size=1, max_size=12))
def test_any_values_give_a_fit_or_a_clear_error(tmp_path: Path, rows: list[tuple[object, ...]]) -> None:
    recs = [
        {"time_s": i, "guest": "g", "provisioned_kib": prov, "used_kib": 0, **dict(zip(STATS, stats, strict=True))}
        for i, (*stats, prov) in enumerate(rows)
    ]
    path = write(tmp_path / "fuzz.csv.gz", recs, ["time_s", "guest", "provisioned_kib", "used_kib", *STATS])
    try:
        result = calibrate([path])
    except CalibrationError as e:
        assert str(path) in str(e) or "fitted constants" in str(e)
    else:
        assert all(g.provisioned_kib > 0 for g in result.guests)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200) | st.builds(lambda n: "[guest_model]\n" + "a = [" * n + "]" * n, st.integers(0, 2000)))
def test_any_guest_model_text_loads_or_is_refused_clearly(tmp_path: Path, text: str) -> None:
    path = tmp_path / "g.toml"
    path.write_text(text)
    try:
        load_guest_model(path)
    except GuestModelFileError as e:
        assert str(path) in str(e)

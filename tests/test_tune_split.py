"""``overcommitd tune`` learns on one split of guests and hours and reports on another."""

from __future__ import annotations

from pathlib import Path

import pytest

from overcommitd import cli
from policies import registry
from sim.evaluation.replay import ReplaySpec
from sim.evaluation.tune import Split, TuneError, default_split, parse_slice, split_specs
from sim.memory import traces as trace_io

BITBRAINS = Path(__file__).parents[1] / "sim" / "data" / "traces" / "bitbrains-rnd"


def test_default_split_keeps_train_and_test_disjoint() -> None:
    spec = ReplaySpec(traces=(BITBRAINS,), hours=5.0, start_h=2.0)
    n = len(trace_io.expand([BITBRAINS]))
    train, test = split_specs(spec, default_split(n, 2.0, 5.0))
    assert set(train.traces).isdisjoint(test.traces)
    assert len(train.traces) + len(test.traces) == n
    assert (train.start_h, train.hours, test.start_h, test.hours) == (2.0, 5.0, 2.0, 5.0)
    one = default_split(1, 2.0, 5.0)
    assert one.test_start_h == 7.0  # one trace: the test span follows the train span


def test_slices_are_parsed_and_bad_ones_named() -> None:
    assert parse_slice("3:7", "--train-guests") == slice(3, 7)
    assert parse_slice(":4", "--train-guests") == slice(None, 4)
    for bad in ("3", "a:b", "-1:3", "1:2:3"):
        with pytest.raises(TuneError, match="--test-guests"):
            parse_slice(bad, "--test-guests")
    spec = ReplaySpec(traces=(BITBRAINS,))
    with pytest.raises(TuneError, match="--test-guests 900:None: no trace"):
        split_specs(spec, Split(slice(0, 2), slice(900, None), 0.0, 1.0, 0.0, 1.0))


def _rows(text: str, label: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"#   {label} "))


def test_cli_tunes_on_train_and_prints_start_and_best_on_both(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tuned.toml"
    rc = cli.main(
        [
            "tune", "--policy", "trim", "--trace", str(BITBRAINS), "--train-guests", "0:3", "--test-guests", "3:6",
            "--hours", "2", "--test-start-hours", "24", "--max-evals", "3", "--workers", "1", "--out", str(out), "--warmup-hours", "1",
        ]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert text == out.read_text()
    assert "train 3 guests x 2 h, test 3 guests x 2 h" in text
    lines = {label: _rows(text, label) for label in ("train start", "train best", "test start", "test best")}
    # Different guests and days: the test scorecards are not the train ones.
    assert lines["train start"].split("saved")[1] != lines["test start"].split("saved")[1]
    assert all("saved" in line and "OOM kills" in line for line in lines.values())


def test_cli_refuses_an_empty_split(capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["tune", "--policy", "trim", "--trace", str(BITBRAINS), "--test-guests", "999:", "--workers", "1"])
    assert rc == cli.EXIT_BAD_INPUT
    assert "--test-guests" in capsys.readouterr().err


def test_screen_replays_spread_points_first_and_the_search_starts_from_the_best() -> None:
    from overcommitd.config import DaemonConfig
    from sim.evaluation.sweep import Sweep
    from sim.evaluation.tune import SPACES, screen_points, tune

    dims = [d for d in SPACES["trim"] if d.name in ("headroom_pct", "burst_factor")]
    spec = ReplaySpec(traces=(BITBRAINS,), guests=3, hours=1.0, warmup_h=1.0, seed=4)
    points = screen_points(dims, 3, seed=4)
    assert [p.tolist() for p in points] == [p.tolist() for p in screen_points(dims, 3, seed=4)]  # seeded
    assert all(0 <= u <= 1 for p in points for u in p) and len({tuple(p) for p in points}) == 3
    result = tune(
        "trim",
        spec,
        DaemonConfig(),
        dims=dims,
        max_evals=5,
        sweep=Sweep(workers=1),
        screen=3,
        make_policy=registry.create,
    )
    screened = [{d.name: d.value(float(u)) for d, u in zip(dims, p)} for p in points]
    assert [e.params for e in result.evaluations[1:4]] == screened
    assert 4 <= len(result.evaluations) <= 5
    assert result.best.objective <= min(e.objective for e in result.evaluations[:4])
    assert result.start is result.evaluations[0]


def test_a_recording_is_split_by_time_never_by_file() -> None:
    """A recording holds many guests per file: slicing files would train and test on the
    same guests, so the default splits it by hours and a guest slice is refused."""
    import argparse

    from sim.evaluation.tune import split_from_args
    from tests.realguest.recording import recording_dir

    spec = ReplaySpec(traces=(recording_dir(),), start_h=0.0, hours=0.02)
    args = argparse.Namespace(train_guests=None, test_guests=None, test_start_hours=None, test_hours=None)
    train, test = split_from_args(args, spec)
    assert train.traces == test.traces and test.start_h >= train.start_h + train.hours
    with pytest.raises(TuneError, match="split it by hours"):
        split_specs(spec, Split(slice(0, 1), slice(1, None), 0.0, 1.0, 0.0, 1.0))

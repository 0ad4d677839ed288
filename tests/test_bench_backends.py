"""The backends benchmark still runs (its figures are for humans; nothing here is timed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def test_bench_backends_runs_for_a_few_guests(capsys: pytest.CaptureFixture[str]) -> None:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_backends.py"
    spec = importlib.util.spec_from_file_location("bench_backends", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--guests", "3", "--ticks", "2"]) == 0
    rows = {
        line.split()[0] + " " + line.split()[1]: line.split()[-1] for line in capsys.readouterr().out.splitlines()[2:]
    }
    # read + set per tick: held 2+1, brief (1+3)+(1+1) QMP commands per guest; libvirt 1 bulk + info and set per guest
    assert rows == {"qmp, held": "9", "qmp, brief": "18", "libvirt, test": "7"}

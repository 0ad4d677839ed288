"""The worked plugin example under examples/ installs with pip, registers its entry
point, and replays through the CLI like a built-in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from overcommitd.cli import main
from policies import registry
from policies.api import PolicyLoadError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "peak-hold-policy"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pip-install the example into a private directory (the test environment's venv is
    left as it was) and return that directory for sys.path."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(EXAMPLE)],
        check=True,
    )
    return target


def test_the_example_registers_its_entry_point(installed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(installed))
    assert "peak-hold" in registry.known()
    policy = registry.create("peak-hold", {"window_s": 3600, "margin_pct": 10})
    assert policy.name == "peak-hold"
    with pytest.raises(PolicyLoadError, match="margin_pct"):
        registry.create("peak-hold", {"margin_pct": -1})


def test_the_example_replays_side_by_side_with_a_built_in(
    installed: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(installed))
    code = main(["replay", "--policy", "peak-hold,pid", "--guests", "4", "--hours", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    header = next(line for line in out.splitlines() if line.startswith("| metric"))
    assert "peak-hold" in header and "pid" in header

"""Config: loading, errors that name the key, sizes, per-guest overrides, and the
check-config command through the front door."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from overcommitd.cli import main
from overcommitd.config import ConfigError, DaemonConfig
from overcommitd.model import parse_kib
from policies import registry
from tests.helpers import GIB, MIB, guest

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "overcommitd.toml"
    path.write_text(text)
    return path


def documented_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key of the config model, dotted; dict-of-model tables by their value type."""
    keys = []
    for name, info in model.model_fields.items():
        keys.append(prefix + name)
        inner = info.annotation
        args = getattr(inner, "__args__", ())
        for candidate in (inner, *args):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                keys += documented_keys(candidate, f"{prefix}{name}.")
    return keys


def test_the_example_config_is_valid_and_documents_every_key() -> None:
    example = REPO / "config.example.toml"
    DaemonConfig.load(example)
    text = example.read_text()
    for key in documented_keys(DaemonConfig):
        leaf = key.rsplit(".", 1)[-1]
        assert re.search(rf"^(#\s*)?{leaf} =|^(#\s*)?\[(.*\.)?{leaf}[.\]]", text, re.MULTILINE), (
            f"config.example.toml lacks {key}"
        )


def test_the_example_documents_every_param_of_its_policy_with_its_default() -> None:
    """The commented ``key = value`` lines under [policy] are the policy's whole Params,
    each with a value the policy accepts and its default."""
    example = REPO / "config.example.toml"
    block = example.read_text().split("[policy]\n", 1)[1].split("[policy.params]", 1)[0]
    lines = re.findall(r"^#\s+(\w+) = (\S+)", block, re.MULTILINE)
    params = {key: tomllib.loads(f"v = {value}")["v"] for key, value in lines}
    name = DaemonConfig.load(example).policy.name
    policy = registry.create(name, params)
    assert set(params) == set(type(policy).Params.model_fields)  # type: ignore[attr-defined]
    assert policy.params == registry.create(name).params  # type: ignore[attr-defined]


def test_the_example_values_are_the_defaults() -> None:
    """The example shows what you get by leaving a key out (its guest section aside)."""
    example = DaemonConfig.load(REPO / "config.example.toml")
    assert example.model_copy(update={"guests": {}}) == DaemonConfig()


def test_the_example_guest_section_is_commented_out() -> None:
    """Copied verbatim to /etc, the example must not configure a guest that is not there."""
    assert DaemonConfig.load(REPO / "config.example.toml").guests == {}


def test_sizes_take_binary_units(tmp_path: Path) -> None:
    cfg = DaemonConfig.load(write(tmp_path, '[guard]\nmin_guest_kib = "512MiB"\nmax_deflate_step_kib = "1.5 GiB"\n'))
    assert cfg.guard.min_guest_kib == 512 * MIB
    assert cfg.guard.max_deflate_step_kib == int(1.5 * GIB)


@given(st.integers(min_value=0, max_value=2**40), st.sampled_from(["KiB", "MiB", "GiB", "k", "M", "G", ""]))
def test_parse_kib_scales_by_unit(n: int, unit: str) -> None:
    scale = {"KiB": 1, "k": 1, "": 1, "MiB": 1024, "M": 1024, "GiB": 1024**2, "G": 1024**2}[unit]
    assert parse_kib(f"{n}{unit}") == n * scale
    assert parse_kib(n) == n


def test_bad_size_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        DaemonConfig.load(write(tmp_path, '[guard]\nmin_guest_kib = "lots"\n'))
    assert [key for key, _ in e.value.problems] == ["guard.min_guest_kib"]
    assert "'lots' is not a size" in str(e.value)


def test_unknown_keys_are_errors_with_their_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        DaemonConfig.load(
            write(tmp_path, "interval_s = 5\n[guard]\nmax_inflate_stp_kib = 1\n[guests.web]\nflor_kib = 1\n")
        )
    keys = {key for key, _ in e.value.problems}
    assert keys == {"guard.max_inflate_stp_kib", "guests.web.flor_kib"}


def test_deflate_must_not_be_slower_than_inflate(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="give memory back at least as fast"):
        DaemonConfig.load(write(tmp_path, "[guard]\nmax_inflate_step_kib = 2048\nmax_deflate_step_kib = 1024\n"))


def test_cli_overrides_the_file(tmp_path: Path) -> None:
    assert DaemonConfig.load(write(tmp_path, "interval_s = 5\n"), interval_s=2.0).interval_s == 2.0
    assert DaemonConfig.load(write(tmp_path, "interval_s = 5\n"), interval_s=None).interval_s == 5.0


def test_guest_override_by_uuid_wins_over_name(tmp_path: Path) -> None:
    cfg = DaemonConfig.load(
        write(
            tmp_path,
            '[guests.vm1]\nweight = 2\n[guests."uuid-vm1"]\nfloor_kib = "1GiB"\n[guests.other]\nexclude = true\n',
        )
    )
    override = cfg.override_for(guest("vm1"))
    assert override is not None and override.floor_kib == GIB and override.weight is None
    assert cfg.override_for(guest("vm2")) is None


def test_check_config_prints_each_error_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "interval_s = -1\n[policy]\nname = 'headroom'\n[policy.params]\nbuffer_pct = -5\n")
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: interval_s:" in err


def test_check_config_validates_policy_params(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "[policy]\nname = 'headroom'\n[policy.params]\nbuffer_pct = -5\n")
    assert main(["check-config", str(path)]) == 2
    assert "buffer_pct" in capsys.readouterr().err


def test_check_config_reports_toml_syntax_with_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(write(tmp_path, "interval_s = = 3\n"))]) == 2
    assert "line 1" in capsys.readouterr().err


def test_check_config_accepts_a_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(REPO / "config.example.toml")]) == 0
    assert "ok" in capsys.readouterr().out

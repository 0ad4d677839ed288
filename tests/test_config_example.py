"""config.example.toml documents every key and is itself a valid config."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel

from overcommitd.cli import main
from overcommitd.config import DaemonConfig

EXAMPLE = Path(__file__).resolve().parents[1] / "config.example.toml"


def test_example_is_valid(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["check-config", str(EXAMPLE)]) == 0


def test_example_values_are_the_defaults() -> None:
    assert DaemonConfig.load(EXAMPLE) == DaemonConfig()


def test_every_key_is_documented() -> None:
    text = EXAMPLE.read_text()

    def keys(model: type[BaseModel], prefix: str = "") -> list[str]:
        out = []
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                out += keys(ann, f"{prefix}{name}.")
            else:
                out.append(name)
        return out

    missing = [k for k in keys(DaemonConfig) if k not in ("guests", "params") and f"{k} =" not in text and f"# {k} =" not in text]
    assert missing == []
    assert tomllib.loads(text)["guard"]["min_guest_kib"] == "256MiB"

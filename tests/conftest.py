"""Shared fixtures. The real-guest fixtures (private libvirtd, mosquitto, guests) live in
tests/realguest/conftest.py; the broker fixture is here because unit tests use it too."""

from __future__ import annotations

from hypothesis import settings

# A 2-core CI machine under load: no per-example deadline, or the first example flakes.
settings.register_profile("overcommitd", deadline=None)
settings.load_profile("overcommitd")


import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from sim.virtio.world import World
from tests.realguest.harness import Mosquitto

UNDER_CI = os.environ.get("CI", "").lower() == "true"


def need_binaries(*names: str) -> None:
    """Skip when a service binary is absent on a developer's machine; under CI=true a
    missing binary is a failure, never a skip (scripts/setup-host.sh installs them)."""
    missing = [n for n in names if shutil.which(n) is None and not Path(f"/usr/sbin/{n}").exists()]
    if not missing:
        return
    message = f"missing {', '.join(missing)}: run scripts/setup-host.sh"
    if UNDER_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A real mosquitto on 127.0.0.1 and a free port, for the whole session."""
    need_binaries("mosquitto")
    m = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    m.start()
    yield m
    m.stop()


@pytest.fixture
def world() -> World:
    """A fresh simulated clock."""
    return World()


@pytest.fixture
def log() -> list[tuple[float, str]]:
    """A test's trace of (time, what happened)."""
    return []

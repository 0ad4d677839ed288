from __future__ import annotations

import pytest

from sim.world import World


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
def log() -> list[tuple[float, str]]:
    return []

"""Shared fixtures. The real-guest fixtures (private libvirtd, mosquitto, guests) live in
tests/realguest/conftest.py; the broker fixture is here because unit tests use it too."""

from __future__ import annotations

from hypothesis import settings

# A 2-core CI machine under load: no per-example deadline, or the first example flakes.
settings.register_profile("overcommitd", deadline=None)
settings.load_profile("overcommitd")

"""overcommitd: automatic memory-overcommit policy engine for KVM/QEMU hosts."""

from __future__ import annotations

__version__ = "0.1.0"  # kept equal to pyproject.toml's; used when the package metadata is absent


def package_version() -> str:
    """The installed distribution's version (``importlib.metadata``), else ``__version__``
    (a source tree run without installing)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("overcommitd")
    except PackageNotFoundError:
        return __version__

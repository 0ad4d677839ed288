"""overcommitd.host against real files under tmp_path and the live /proc."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from overcommitd.host import HostError, HostPaths, ProcHostReader, parse_psi

MEMINFO = """MemTotal:       24684092 kB
MemFree:        22000000 kB
MemAvailable:   20000000 kB
SwapTotal:       2097148 kB
SwapFree:        1048576 kB
HugePages_Total:       0
"""
PSI = """some avg10=1.50 avg60=0.75 avg300=0.10 total=123456
full avg10=0.50 avg60=0.25 avg300=0.05 total=6543
"""


def paths(tmp_path: Path, *, meminfo: str = MEMINFO, psi: str | None = PSI, ksm: str | None = "1000\n") -> HostPaths:
    (tmp_path / "meminfo").write_text(meminfo)
    if psi is not None:
        (tmp_path / "psi").write_text(psi)
    (tmp_path / "ksm").mkdir()
    if ksm is not None:
        (tmp_path / "ksm" / "pages_sharing").write_text(ksm)
    return HostPaths(tmp_path / "meminfo", tmp_path / "psi", tmp_path / "ksm")


def test_reads_meminfo_psi_and_ksm(tmp_path: Path) -> None:
    host = ProcHostReader(paths(tmp_path), clock=lambda: 42.0).read()
    assert (host.taken_at_s, host.mem_total_kib, host.mem_available_kib) == (42.0, 24684092, 20000000)
    assert (host.swap_total_kib, host.swap_free_kib) == (2097148, 1048576)
    assert host.psi is not None
    assert (host.psi.some_avg10, host.psi.some_total_us, host.psi.full_avg60, host.psi.full_total_us) == (
        1.5,
        123456,
        0.25,
        6543,
    )
    assert host.ksm_sharing_kib == 1000 * 4  # 4 KiB pages on x86-64


def test_missing_psi_degrades_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reader = ProcHostReader(paths(tmp_path, psi=None, ksm=None))
    with caplog.at_level(logging.WARNING):
        first, second = reader.read(), reader.read()
    assert first.psi is None and second.psi is None and first.ksm_sharing_kib == 0
    assert [r.message for r in caplog.records if "PSI" in r.message] and len(caplog.records) == 1


def test_meminfo_without_memavailable_names_the_file_and_key(tmp_path: Path) -> None:
    p = paths(tmp_path, meminfo="MemTotal: 100 kB\n")
    with pytest.raises(HostError, match=r"meminfo: no MemAvailable"):
        ProcHostReader(p).read()


def test_malformed_psi_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(HostError, match=r"some avg10: 'x'"):
        parse_psi("some avg10=x avg60=0 avg300=0 total=0\n")


def test_missing_meminfo_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(HostError, match="cannot read"):
        ProcHostReader(HostPaths(meminfo=tmp_path / "nope")).read()


def test_reads_this_host() -> None:
    host = ProcHostReader().read()
    assert 0 < host.mem_available_kib <= host.mem_total_kib

"""Every guest in a list of trace files and directories, whatever their formats: the one
entry point the replay, sweeps and ``overcommitd trace`` read traces through. It sits
above both readers (``sim.memory.traces`` for the public datasets, ``sim.memory.trace_reader`` for
overcommitd's documented format), so neither imports the other back."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sim.memory.traces import DEFAULT_MACHINE_KIB, DEFAULT_MAX_GAP_S, Trace, expand, load, sniff


def load_all(
    paths: Sequence[Path], *, machine_kib: int = DEFAULT_MACHINE_KIB, max_gap_s: float = DEFAULT_MAX_GAP_S
) -> list[Trace]:
    """Every guest in the given files and directories, whatever their format.

    Files in overcommitd's documented format are read together, so a guest's rows may
    span many files (a recording's hourly files) and a file may hold many guests; a
    Bitbrains/Materna or Google 2019 file is one guest each, as ``load`` reads it.
    """
    from sim.memory import trace_reader  # the documented format; pyarrow is imported only when needed

    files = expand(paths)
    kinds = [sniff(f) for f in files]
    own = [f for f, k in zip(files, kinds, strict=True) if k == "overcommitd"]
    out: list[Trace] = []
    for f, kind in zip(files, kinds, strict=True):
        if kind != "overcommitd":
            out.append(load(f, machine_kib=machine_kib, max_gap_s=max_gap_s))
        elif f == own[0]:  # every guest of the documented format where its first file is
            out.extend(trace_reader.read(own, max_gap_s=max_gap_s))
    return out

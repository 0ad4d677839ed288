"""What a scenario returns: a timeline of labelled series, printed or drawn by
``sim.evaluation.scenarios``. Its own module so that scenarios living elsewhere (``sim.evaluation.arc_scenario``)
return it without importing the scenario registry that lists them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ScenarioResult:
    name: str
    title: str
    times_s: tuple[float, ...]
    series: dict[str, tuple[float, ...]]  # label -> one value per time, MiB or a count
    notes: tuple[str, ...] = ()

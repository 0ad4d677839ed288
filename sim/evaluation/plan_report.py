"""A plan as pictures: each policy's frontier of reclaim against harm, and an HTML page.

``frontier.png`` has two panels, one point per replay the search tried, one colour per
policy, filled where the replay held and hollow where it failed:

* host memory not backed (``Scorecard.saved_pct``, never-touched pages included)
  against the overcommit ratio: how it grows as the host shrinks, and where each policy
  stops holding;
* memory reclaimed by ballooning (``Scorecard.reclaimed_pct``) against harm: guest-hours
  degraded (workload killed or thrashing) plus guest-hours below floor plus hours the host
  spent above 100 % (symlog axis; 0 is harm-free, though a replay can still fail the
  paging SLO).
"""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt

from sim.evaluation.metrics import Scorecard
from sim.evaluation.plan import Plan
from sim.evaluation.report import _img


def harm_h(card: Scorecard) -> float:
    """One number for a replay's harm, hours, 0 when it harmed nobody (module docstring)."""
    return (card.degraded_guest_s + card.below_floor_guest_s + card.host_over_100_s) / 3600


def plot_frontier(result: Plan, path: Path) -> Path:
    fig, (ax_ratio, ax_harm) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, p in enumerate(result.plans):
        color = f"C{i % 10}"
        steps = sorted(p.steps, key=lambda s: s.overcommit)
        x = [s.overcommit for s in steps]
        y = [s.card.saved_pct for s in steps]
        ax_ratio.plot(x, y, color=color, lw=0.8, label=p.policy)
        for s in steps:
            face = color if s.holds else "none"
            ax_ratio.scatter(s.overcommit, s.card.saved_pct, s=25, facecolors=face, edgecolors=color)
            ax_harm.scatter(harm_h(s.card), s.card.reclaimed_pct, s=25, facecolors=face, edgecolors=color)
    ax_ratio.set(
        xlabel="overcommit (provisioned / host RAM)", ylabel="not backed (incl. never touched), % of provisioned"
    )
    ax_ratio.set_title("not backed as the host shrinks (filled: held)", fontsize=10)
    ax_harm.set_xscale("symlog", linthresh=0.1)
    ax_harm.set(
        xlabel="harm, h: guests degraded + below floor + host over 100 %",
        ylabel="reclaimed by ballooning, % of provisioned",
    )
    ax_harm.set_title("reclaim against harm, every ratio tried", fontsize=10)
    ax_ratio.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plan_report(result: Plan, table_md: str, out_dir: Path) -> Path:
    """``frontier.png`` and ``index.html`` (the table, the plot) in ``out_dir``; the page's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_frontier(result, out_dir / "frontier.png")
    title = f"overcommitd plan: {result.guests} guests, {result.hours:.0f} h"
    page = (
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><pre>{html.escape(table_md)}</pre>{_img(png)}</body></html>"
    )
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    return index

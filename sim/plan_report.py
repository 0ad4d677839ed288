"""A plan as pictures: each policy's frontier of reclaim against harm, and an HTML page.

``frontier.png`` has two panels, one point per replay the search tried, one colour per
policy, filled where the replay held and hollow where it failed:

* memory saved (% of provisioned) against the overcommit ratio: how the saving grows
  as the host shrinks, and where each policy stops holding;
* memory saved against harm: guest OOM kills plus guest-minutes below floor plus
  minutes the host spent above 100 % (symlog axis; 0 is a holding replay's harm).
"""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt

from sim.metrics import Scorecard
from sim.plan import Plan
from sim.report import _img


def harm(card: Scorecard) -> float:
    """One number for a replay's harm, 0 when it harmed nobody (see the module docstring)."""
    host_over_min = 0.0 if card.host_peak_pct <= 100 else card.hours * 60  # stand-in: peak only
    return card.oom_kills + card.below_floor_guest_s / 60 + host_over_min


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
            ax_harm.scatter(harm(s.card), s.card.saved_pct, s=25, facecolors=face, edgecolors=color)
    ax_ratio.set(xlabel="overcommit (provisioned / host RAM)", ylabel="memory saved, % of provisioned")
    ax_ratio.set_title("saving as the host shrinks (filled: held)", fontsize=10)
    ax_harm.set_xscale("symlog", linthresh=1.0)
    ax_harm.set(xlabel="harm: OOM kills + guest-min below floor + host-min over 100 %", ylabel="memory saved, %")
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

"""A comparison as pictures: PNG plots and one self-contained HTML page with the table.

Plots (one file each, all policies of a comparison on the same axes or grid):

* ``host_use.png``: host memory in use over time, % of host RAM, one line per policy;
* ``guest.png``: for one guest (the one whose demand moves most, relative to its RAM),
  demand, balloon target and actual memory over time, one panel per policy;
* ``distributions.png``: per guest and sampling interval, the swap-in rate (MiB/min, a
  log histogram of the non-zero part) and MemAvailable as % of the guest's RAM.

The page embeds the PNGs as data URIs, so it can be mailed or attached as one file.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt

from sim.evaluation.compare import REFERENCE, Comparison, table_notes, table_rows
from sim.evaluation.metrics import Timeline
from sim.evaluation.replay import ReplayResult

GIB_KIB = 1024.0 * 1024.0
MIB_KIB = 1024.0


def _runs(comp: Comparison) -> dict[str, ReplayResult]:
    head = {REFERENCE: comp.reference} if comp.reference is not None else {}
    return head | comp.results


def _stack(series: list[npt.NDArray[np.float64]]) -> npt.NDArray[np.float64]:
    return np.vstack(series) if series else np.zeros((0, 0))


def busiest_guest(tl: Timeline, ram_kib: npt.NDArray[np.float64]) -> int:
    """The guest whose demand moves most relative to its RAM: the one worth looking at."""
    demand = _stack(tl.demand_kib)
    return int(np.argmax(demand.std(axis=0) / ram_kib)) if demand.size else 0


def plot_host_use(comp: Comparison, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(10, 4))
    for name, run in _runs(comp).items():
        tl = run.timeline
        host_kib = run.scorecard.host_gib * GIB_KIB
        ax.plot(np.array(tl.t_s) / 3600, 100 * np.array(tl.host_used_kib) / host_kib, label=name, lw=1)
    ax.axhline(100, color="k", lw=0.5, ls="--")
    ax.set(xlabel="hours", ylabel="host memory in use, % of RAM", title="Host memory in use")
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_guest(comp: Comparison, path: Path) -> Path:
    runs = _runs(comp)
    first = next(iter(runs.values())).timeline
    ram = _stack(first.actual_kib).max(axis=0) if first.actual_kib else np.ones(1)
    g = busiest_guest(first, np.maximum(ram, 1.0))
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.2 * len(runs)), sharex=True, squeeze=False)
    for ax, (name, run) in zip(axes[:, 0], runs.items()):
        tl = run.timeline
        hours = np.array(tl.t_s) / 3600
        for label, series in (("demand", tl.demand_kib), ("target", tl.target_kib), ("actual", tl.actual_kib)):
            ax.plot(hours, _stack(series)[:, g] / GIB_KIB, label=label, lw=1)
        ax.set_ylabel("GiB")
        ax.set_title(f"{name}: guest {run.guest_names[g] if run.guest_names else g}", fontsize=9)
    axes[0, 0].legend(ncol=3, fontsize=8)
    axes[-1, 0].set_xlabel("hours")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def swap_in_rates_mib_min(tl: Timeline) -> npt.NDArray[np.float64]:
    """Swap-in per guest and sampling interval, MiB per minute (flattened)."""
    swap = _stack(tl.swap_in_kib)
    if swap.shape[0] < 2:
        return np.zeros(0)
    dt_min = np.diff(np.array(tl.t_s))[:, None] / 60
    return (np.diff(swap, axis=0) / MIB_KIB / dt_min).ravel()


def plot_distributions(comp: Comparison, path: Path) -> Path:
    runs = _runs(comp)
    colors = {name: f"C{i}" for i, name in enumerate(runs)}  # one colour per policy in both panels
    rates = {name: swap_in_rates_mib_min(run.timeline) for name, run in runs.items()}
    top = max((float(r.max()) for r in rates.values() if r.size), default=1.0)
    bins = np.logspace(-3, np.log10(max(top, 1e-2)) + 0.01, 40)  # the same bins for every policy
    fig, (ax_swap, ax_head) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in runs.items():
        nonzero = rates[name][rates[name] >= 1e-3]
        if nonzero.size:
            ax_swap.hist(nonzero, bins=bins, histtype="step", label=name, color=colors[name])
        tl = run.timeline
        actual = _stack(tl.actual_kib)
        ram = np.maximum(actual.max(axis=0), 1.0) if actual.size else np.ones(1)
        headroom_pct = (100 * _stack(tl.available_kib) / ram).ravel()
        ax_head.hist(
            headroom_pct, bins=50, range=(0, 100), histtype="step", label=name, density=True, color=colors[name]
        )
    ax_swap.set(
        xscale="log", xlabel="swap-in, MiB/min (samples >= 0.001)", ylabel="guest-samples", title="Guest swap-in"
    )
    ax_head.set(xlabel="MemAvailable, % of guest RAM", ylabel="density", title="Guest headroom")
    ax_swap.legend(fontsize=8)
    ax_head.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def html_table(comp: Comparison) -> str:
    names, rows = table_rows(comp)
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = []
    for label, cells, marks in rows:
        tds = "".join(f"<td{' class=best' if m else ''}>{html.escape(c)}</td>" for c, m in zip(cells, marks))
        body.append(f"<tr><th>{html.escape(label)}</th>{tds}</tr>")
    return f"<table><tr><th>metric</th>{head}</tr>{''.join(body)}</table>"


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<p><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}"></p>'


def write_report(comp: Comparison, out_dir: Path) -> Path:
    """Write the PNGs and ``index.html`` into ``out_dir``; returns the page's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = [
        plot_host_use(comp, out_dir / "host_use.png"),
        plot_guest(comp, out_dir / "guest.png"),
        plot_distributions(comp, out_dir / "distributions.png"),
    ]
    card = comp.cards()[0]
    title = f"overcommitd replay: {card.guests} guests, {card.hours:.0f} h"
    page = (
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:right}"
        "td.best{font-weight:bold;background:#dfd}table{border-collapse:collapse}"
        "tr:nth-child(even){background:#f4f4f4}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{card.provisioned_gib:.0f} GiB of guest RAM on a {card.host_gib:.0f} GiB "
        "host. Bold: the best policy of each row (the no-ballooning reference <i>none</i> is not ranked).</p>"
        f"{html_table(comp)}"
        + "".join(f"<p>{html.escape(n)}</p>" for n in table_notes(comp))
        + "".join(_img(p) for p in pngs)
        + "</body></html>"
    )
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    return index

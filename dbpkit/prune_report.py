"""prune.py's report: cluster_stats.csv, quotas.png and the most and least pruned clusters in words.

matplotlib is imported inside plot_quotas (no pyplot: no GUI backend, and a faster import).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dbpkit.figures import legend_room
from dbpkit.files import write_csv

STATS_FILE = "cluster_stats.csv"
PLOT_FILE = "quotas.png"


def pruning_extremes(sizes: np.ndarray, quotas: np.ndarray, count: int = 3) -> str:
    """The most and least pruned clusters, in words, for the log."""
    full = np.flatnonzero(sizes > 0)
    fraction = quotas[full] / sizes[full]
    order = full[np.argsort(fraction, kind="stable")]

    def describe(js: np.ndarray) -> str:
        return ", ".join(f"cluster {j} keeps {quotas[j]} of {sizes[j]} ({quotas[j] / sizes[j]:.1%})" for j in js)
    return f"most pruned: {describe(order[:count])}; least pruned: {describe(order[::-1][:count])}"


def write_report(task: tuple) -> None:
    """cluster_stats.csv, temperature_sweep.csv and quotas.png (they need only the quotas, so they are written
    beside the selection)."""
    stats_path, sweep_path, plot_path, table, sweep, plan, target, temperature, title = task
    write_csv(stats_path, table)
    write_csv(sweep_path, sweep)
    with open(plot_path, "wb") as f:
        quotas_figure(table, sweep, plan, target, temperature, title).savefig(f, format="png")


def quotas_figure(table: dict[str, np.ndarray], sweep: dict[str, np.ndarray], plan: Any, target: int,
                  temperature: float, title: str) -> Any:
    """What DBP did. Left: each cluster's quota N_j against its complexity C_j, beside the softmax target
    P_j N it follows (shifted by the water level nu where some clusters are capped) and the equal share N / k
    it departs from; marked, the clusters kept whole (smaller than their target) and those held at the
    per-cluster minimum. Middle: per cluster, by complexity, its size and what it keeps, on a log scale (so
    that large clusters do not hide small quotas). Right: the temperature sweep, how far the quotas move from
    the equal share at each T, the run's T marked."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, and a faster import
    from matplotlib.ticker import EngFormatter, MaxNLocator

    complexity, probs, quotas, sizes = table["complexity"], table["probability"], table["quota"], table["size"]
    share = probs * target
    order = np.argsort(complexity, kind="stable")
    whole = (sizes > 0) & (plan.x == plan.upper) & (share - plan.nu > plan.upper)  # all it has, less than its share
    raised = (plan.x == plan.lower) & (share - plan.nu < plan.lower) & ~whole  # held at the minimum, above it
    plain = ~whole & ~raised
    fig = Figure(figsize=(16, 4.2), dpi=100)
    left, right, knob = fig.subplots(1, 3)
    left.plot(complexity[order], share[order], color="tab:orange", lw=1.2, label="softmax target $P_j N$")
    left.axhline(target / len(sizes), color="0.5", ls="--", lw=1, label="equal share $N / k$")
    left.scatter(complexity[plain], quotas[plain], s=9, color="tab:blue", zorder=3,
                 label=f"quota $N_j \\approx P_j N - \\nu$ ($\\nu$ = {plan.nu:.3g})")
    if whole.any():
        left.scatter(complexity[whole], quotas[whole], s=16, marker="v", color="tab:red", zorder=3,
                     label="kept whole (smaller than its target)")
    if raised.any():
        left.scatter(complexity[raised], quotas[raised], s=16, marker="^", color="tab:green", zorder=3,
                     label=f"held at the minimum m = {plan.min_per_cluster}")
    highest = max(float(share.max(initial=0)), float(quotas.max(initial=0)), 1.0)
    left.set(ylim=(0, legend_room(highest, 3 + whole.any() + raised.any())),  # (quotas near the equal share: the top)
             xlabel="complexity $C_j$", ylabel="samples kept", title=title)
    left.yaxis.set_major_formatter(EngFormatter(sep=""))  # 500k, 2M: short enough for the label beside them
    left.xaxis.set_major_locator(MaxNLocator(6))  # complexities such as 0.00425: more labels would run together
    left.legend(loc="upper left", fontsize=8)
    edges = np.arange(len(order) + 1) - 0.5  # a bar per cluster, each drawn as one step artist (1000 bars: 0.5 s)
    right.stairs(sizes[order], edges, fill=True, color="0.8", label="cluster size $n_j$")
    right.stairs(quotas[order], edges, fill=True, color="tab:blue", label="kept $N_j$")
    right.set_yscale("log")
    bottom = right.get_ylim()[0]  # (matplotlib's, from the data)
    top = legend_room(max(float(sizes.max(initial=1)), 1.0), 2, bottom, log=True)  # (the simplest may be the largest)
    right.set(xlim=(edges[0], edges[-1]), ylim=(bottom, top), xlabel="clusters, by complexity (lowest left)",
              ylabel="samples (log scale)", title="what each cluster keeps of what it has")
    right.legend(loc="upper left", fontsize=8)
    knob.plot(sweep["temperature"], sweep["moved_fraction"], marker="o", ms=3, color="tab:blue",
              label="moved from the equal share")
    knob.axvline(temperature, color="tab:red", lw=1.2, label=f"this run's T = {temperature:g}")
    knob.set_xscale("log")
    knob.set(ylim=(0, max(0.05, 1.15 * float(sweep["moved_fraction"].max()))), xlabel="temperature T (log scale)",
             ylabel="$\\sum_j |N_j - N/k| \\,/\\, 2N$", title="what the temperature does")
    knob.legend(loc="upper right", fontsize=8)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.13, top=0.92, wspace=0.25)  # (tight_layout: 3x slower)
    return fig

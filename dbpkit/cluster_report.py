"""cluster_embeddings.py's figures: clusters.png (the cluster sizes of a run, against the paper's settings) and
k_sweep.png (the k sweep, for choosing k from the data).

matplotlib is imported inside the functions that draw (no pyplot: no GUI backend, and a faster import).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dbpkit.figures import legend_room

# Rows per cluster in the paper's settings: what a run's own figure is read against.
PAPER_SETTINGS = {"SemDeDup, LAION-440M at k = 50,000": 8_800, "DBP, LAION-DeDup-280M at k = 500": 560_000,
                  "DBP, DataComp-Medium at k = 100": 1_280_000}


def write_clusters_figure(task: tuple[str, np.ndarray, float | None]) -> None:
    """clusters.png at `path` (a task: it needs only the sizes, so a worker draws it beside other work)."""
    path, sizes, objective = task
    with open(path, "wb") as f:
        clusters_figure(sizes, objective).savefig(f, format="png")


def clusters_figure(sizes: np.ndarray, objective: float | None) -> Any:
    """clusters.png: how many clusters hold how many rows (log bins), the smallest, median and largest marked,
    and the rows per cluster of this run beside the paper's settings."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.2), dpi=100)
    ax = fig.subplots()
    held = sizes[sizes > 0]
    top = max(int(sizes.max(initial=1)), max(PAPER_SETTINGS.values()))
    bins = np.geomspace(1, top * 1.5, 60)
    counts, _, _ = ax.hist(np.maximum(held, 1), bins=bins, color="0.6")
    for value, label, color in ((held.min() if len(held) else 0, "smallest", "tab:red"),
                                (float(np.median(sizes)), "median", "tab:blue"),
                                (held.max(initial=0), "largest", "tab:green")):
        ax.axvline(max(value, 1), color=color, lw=1.2, label=f"{label}: {value:,.0f} rows")
    for (setting, rows), style in zip(PAPER_SETTINGS.items(), (":", "-.", "--")):
        ax.axvline(rows, color="0.3", lw=1, ls=style, label=f"{setting}: ~{rows:,} a cluster")
    empty, single = int((sizes == 0).sum()), int((sizes == 1).sum())
    ax.set_xscale("log")
    ax.set(xlabel="rows in a cluster (log scale)", ylabel="clusters",
           ylim=(0, legend_room(max(float(counts.max(initial=0)), 1.0), len(ax.lines))),  # (LAION's bars: the right)
           title=f"{len(sizes)} clusters, {sizes.sum():,} rows ({sizes.sum() / len(sizes):,.0f} a cluster)\n"
                 f"{empty} empty, {single} of one row" + (f"; objective {objective:.6g}" if objective else ""))
    ax.legend(loc="upper right", fontsize=7)
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.13, top=0.86)  # (a title of two lines)
    return fig


def k_sweep_figure(sweep: dict[str, np.ndarray]) -> Any:
    """k_sweep.png. Left: the k-means objective against k. Right: the spread of d_intra and of d_intra x d_inter
    over the clusters (what DBP's softmax will see) against k."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=100)
    left, right = fig.subplots(1, 2)
    left.plot(sweep["k"], sweep["objective"], marker="o", color="tab:blue")
    left.set(xlabel="k", ylabel="faiss's k-means objective", title="the objective (spherical: higher is tighter)")
    right.plot(sweep["k"], sweep["dintra_spread"], marker="o", color="tab:orange", label="d_intra: max - min")
    right.plot(sweep["k"], sweep["complexity_spread"], marker="s", color="tab:purple",
               label="d_intra x d_inter: max - min")
    highest = float(np.nanmax(np.concatenate([sweep["dintra_spread"], sweep["complexity_spread"]]), initial=0))
    right.set(xlabel="k", ylabel="spread over the clusters", title="what DBP's softmax will see",
              ylim=(0, legend_room(highest, 2) if highest > 0 else 1))  # (spreads grow with k: the right)
    right.legend(loc="upper right", fontsize=8)
    for ax in (left, right):
        ax.set_xscale("log")
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.9, wspace=0.25)
    return fig

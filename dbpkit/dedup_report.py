"""deduplicate.py's report: dedup_stats.csv, eps_curve.csv, dedup_cluster_stats.csv and similarity.png.

similarity.png is drawn in two goes. Most of its drawing's time goes into its frame (the axes, their log ticks and
labels), which depends only on how many members there are: a run draws the frame while it waits for its workers to
start, and the scores into it once they are all in (a third of a second at the end of the run, then a tenth).
matplotlib is imported inside the class (no pyplot: no GUI backend, and a faster import).
"""

from __future__ import annotations

import csv
from typing import Any

import numpy as np

from dbpkit.dedup import DISTANCE_FLOOR, EPS_GRID, HISTOGRAM_BINS, eps_folder, threshold, threshold_grid
from dbpkit.figures import legend_room

HISTOGRAM_BOTTOM = 0.7  # the histogram's log axis starts below 1: a bin of one member shows


def write_stats(path: str, eps_list: list[float], total: int, removed: np.ndarray) -> None:
    """dedup_stats.csv: per eps, the similarity threshold, kept, removed and the fraction removed."""
    with open(path, "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["eps", "threshold", "kept", "removed", "removed_fraction"])
        for eps, gone in zip(eps_list, removed.sum(axis=0).tolist()):
            rows.writerow([eps, float(threshold(eps)), total - gone, gone, gone / total if total else 0.0])


def write_curve(path: str, curve: np.ndarray, total: int) -> None:
    """eps_curve.csv: per eps of EPS_GRID, the similarity threshold and how many rows it removes."""
    with open(path, "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["eps", "threshold", "removed", "removed_fraction"])
        for eps, t, gone in zip(EPS_GRID.tolist(), threshold_grid().tolist(), curve.tolist()):
            rows.writerow([eps, t, gone, gone / total if total else 0.0])


def write_cluster_stats(path: str, eps_list: list[float], sizes: np.ndarray, removed: np.ndarray) -> None:
    """dedup_cluster_stats.csv: per cluster, its size and how many rows each eps removes."""
    with open(path, "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["cluster_id", "size", *(f"removed_{eps_folder(eps)}" for eps in eps_list)])
        rows.writerows([j, size, *gone] for j, (size, gone) in enumerate(zip(sizes.tolist(), removed.tolist())))


class SimilarityFigure:
    """similarity.png of `total` members. Left: how the scores (each member's largest similarity to an earlier one)
    are spread, as 1 - score on a log axis (near-copies at the left), with each eps's threshold. Right: the fraction
    removed for every eps (eps_curve.csv), read off to choose one. Its frame is built here, with the data's artists
    holding zeros; draw_frame() draws it ahead (optional: the image is the same), draw() puts the scores in."""

    def __init__(self, total: int):
        from matplotlib.figure import Figure

        self.total = total
        self.figure = Figure(figsize=(11, 4.2), dpi=100)
        self.left, self.right = self.figure.subplots(1, 2)
        # one artist, not 140 bars: 5x faster to draw
        self.bars = self.left.stairs(np.zeros(len(HISTOGRAM_BINS) - 1), HISTOGRAM_BINS, fill=True, color="0.6")
        self.left.set_ylim(HISTOGRAM_BOTTOM, max(total, 1))  # (the most ticks it can need: made once, kept)
        self.left.set_xscale("log")
        self.left.set_yscale("log")
        self.left.set(xlabel="1 - largest cosine similarity to an earlier member (log scale; left: near-copies)",
                      ylabel="members (log scale)", title=f"SemDeDup scores of {total:,} members")
        (self.curve,) = self.right.plot(EPS_GRID, np.zeros(len(EPS_GRID)), color="0.3", lw=1.2)
        self.right.set_xscale("log")
        self.right.set(xlabel="eps (a member goes when its similarity > 1 - eps)", ylabel="fraction removed",
                       ylim=(0, 1.02), title="what each eps removes")
        self.figure.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.92, wspace=0.25)  # (tight_layout: 3x)

    def draw_frame(self) -> SimilarityFigure:
        """Draw the frame now (its ticks, their labels and the fonts are made once, and kept for draw())."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(self.figure).draw()
        return self

    def draw(self, eps_list: list[float], removed: np.ndarray, histogram: np.ndarray, curve: np.ndarray) -> Any:
        """The figure with the scores' histogram, the fraction each eps of EPS_GRID removes (curve) and, for each eps
        of eps_list, its threshold and the rows it removes."""
        total = max(self.total, 1)
        self.bars.set_data(histogram)
        # (exact copies, the tallest bar of a LAION run, stand at the far left: under the legend without this room)
        self.left.set_ylim(HISTOGRAM_BOTTOM, legend_room(max(int(histogram.max(initial=0)), 1), len(eps_list),
                                                         HISTOGRAM_BOTTOM, log=True))
        self.curve.set_ydata(curve / total)
        for i, eps in enumerate(eps_list):
            gone, color = removed[i] / total, f"C{i % 10}"
            self.left.axvline(max(1 - float(threshold(eps)), DISTANCE_FLOOR), color=color, lw=1.2, ls="--",
                              label=f"eps {eps:g}: {gone:.1%} removed")
            self.right.scatter([eps], [gone], color=color, zorder=3, label=f"eps {eps:g}: {gone:.1%}")
        self.left.legend(loc="upper left", fontsize=8)
        self.right.legend(loc="upper left", fontsize=8)
        return self.figure


def similarity_figure(eps_list: list[float], removed: np.ndarray, histogram: np.ndarray, curve: np.ndarray,
                      total: int) -> Any:
    """similarity.png's figure, drawn in one go."""
    return SimilarityFigure(total).draw(eps_list, removed, histogram, curve)

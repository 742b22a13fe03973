"""What the figures share (quotas.png, similarity.png, clusters.png, k_sweep.png): room at the top of a panel for
its legend, so that the legend never hides data (a LAION run's tallest bars, exact copies or clusters of ~560k
rows, stood right under it).

matplotlib is not imported here.
"""

from __future__ import annotations

import math

# How far down a panel each legend entry reaches at fontsize 8, and as much again for the legend's frame, as a
# fraction of the panel's height (measured on these figures, all 4.2 inches tall, their panels ~0.78 of it).
LEGEND_ROW = 0.055


def legend_room(highest: float, entries: int, bottom: float = 0.0, log: bool = False) -> float:
    """The top of a y axis starting at `bottom` at which values up to `highest` stay below a legend of `entries`
    rows in an upper corner of the panel (on a log axis, `bottom` > 0)."""
    below = 1 - LEGEND_ROW * (entries + 1)  # the share of the panel's height left to the data
    if log:
        return math.exp(math.log(bottom) + (math.log(highest) - math.log(bottom)) / below)
    return bottom + (highest - bottom) / below

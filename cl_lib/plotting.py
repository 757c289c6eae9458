"""Figure style for the book: opaque white figures readable in light and dark mode."""

from __future__ import annotations

import matplotlib as mpl

# Okabe-Ito colour-blind-safe palette.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]


def use_book_style() -> None:
    """Set matplotlib defaults used by every figure of the book.

    Figures keep an opaque white background, so their black text stays legible
    when the book is read in dark mode.
    """
    mpl.rcParams.update(
        {
            "figure.facecolor": "white",
            "axes.facecolor": "white",
            "savefig.facecolor": "white",
            "figure.dpi": 100,
            "figure.figsize": (6.4, 4.0),
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.prop_cycle": mpl.cycler(color=PALETTE),
            "font.size": 11,
            "axes.titlesize": 12,
            "legend.frameon": False,
        }
    )

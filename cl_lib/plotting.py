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


def text_colour(rgba: tuple[float, ...]) -> str:
    """Black or white, whichever is more legible on a cell of colour ``rgba``.

    Uses the relative luminance of the sRGB colour (WCAG 2): black on light cells
    (luminance above 0.179, where both contrasts are equal), white on dark ones.
    """
    if len(rgba) < 3:
        raise ValueError(f"rgba must hold at least 3 channels, got {rgba!r}")

    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(float(c)) for c in rgba[:3])
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return "black" if luminance > 0.179 else "white"


def annotate_cells(ax, image, labels, **kwargs) -> None:
    """Write ``labels[i][j]`` on cell (i, j) of a heat map, in a colour legible on the cell.

    ``image`` is the ``AxesImage`` returned by ``ax.imshow``; a label of ``None`` is skipped.
    Extra keyword arguments go to ``ax.text``.
    """
    data = image.get_array()
    for i, row in enumerate(labels):
        for j, label in enumerate(row):
            if label is None:
                continue
            colour = text_colour(image.cmap(image.norm(data[i, j])))
            ax.text(j, i, label, ha="center", va="center", color=colour, **kwargs)

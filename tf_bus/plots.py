"""PNG charts without pyplot: ``matplotlib.figure.Figure`` needs no backend, so tf-bus
never switches the backend of the program that imports it (a notebook keeps its inline
figures) and holds no global figure state."""

from __future__ import annotations

import io
import os
from pathlib import Path

# What ``plt.subplots`` hands to ``Figure.subplots`` rather than to the figure.
_GRID_KWARGS = ("squeeze", "sharex", "sharey", "width_ratios", "height_ratios", "subplot_kw", "gridspec_kw")


def subplots(nrows: int = 1, ncols: int = 1, **kwargs):
    """Like ``plt.subplots`` (``figsize``, ``squeeze``, ``sharex``, ``height_ratios`` ...),
    constrained layout on."""
    from matplotlib.figure import Figure

    grid = {k: kwargs.pop(k) for k in _GRID_KWARGS if k in kwargs}
    fig = Figure(constrained_layout=True, **kwargs)
    return fig, fig.subplots(nrows, ncols, **grid)


def png_bytes(fig, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save_png(fig, path: str | os.PathLike, dpi: int = 100) -> None:
    """Writes the figure as a PNG through a temporary file (never a half-written PNG)."""
    from tf_bus.io import write_bytes_atomic

    write_bytes_atomic(Path(path), png_bytes(fig, dpi))

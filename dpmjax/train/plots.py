"""Figures for the command line: scatter panels for 2-D samples, image grids for digits."""

from __future__ import annotations

import os

import numpy as np

from .._files import write_file


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    """Save ``fig`` to ``path`` atomically (the format from its extension, PNG without one).

    The directory must exist: nothing is created that the caller did not ask for.
    """
    fmt = os.path.splitext(path)[1][1:].lower() or "png"
    write_file(path, lambda f: fig.savefig(f, format=fmt, dpi=100, bbox_inches="tight"))


def check_image_path(path: str) -> None:
    """``ValueError`` unless matplotlib can write ``path``'s extension (none: PNG)."""
    fmt = os.path.splitext(path)[1][1:].lower() or "png"
    plt = _pyplot()
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    if fmt not in formats:
        raise ValueError(f"--out {path}: cannot write .{fmt} images; use one of "
                         + ", ".join(f".{f}" for f in sorted(formats)))


def scatter_panels(panels, path, *, lim: float | None = None, suptitle: str | None = None):
    """Side-by-side scatter plots, one per ``(title, points (n, 2))`` in ``panels``, saved to ``path``.

    All panels share the square window ``[-lim, lim]^2``; by default 1.25 times the
    largest coordinate of the first panel (the data).
    """
    plt = _pyplot()
    if lim is None:
        lim = 1.25 * float(np.max(np.abs(np.asarray(panels[0][1]))))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, pts) in zip(axes[0], panels):
        pts = np.asarray(pts)
        ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.35, linewidths=0)
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
        ax.set_xlabel("$x_1$", fontsize=8)
    axes[0][0].set_ylabel("$x_2$", fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    _save(fig, path)
    plt.close(fig)


def image_grid(images, path, *, rows: int, title: str | None = None):
    """Tile ``images`` ``(n, H, W, 1)`` in ``[-1, 1]`` into ``rows`` rows and save a grayscale PNG."""
    plt = _pyplot()
    images = np.clip((np.asarray(images)[..., 0] + 1.0) / 2.0, 0.0, 1.0)
    n, h, w = images.shape
    cols = -(-n // rows)
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1), 0.3)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = img
    fig, ax = plt.subplots(figsize=(0.45 * cols + 0.5, 0.45 * rows + 0.6))
    ax.imshow(grid, cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)
    _save(fig, path)
    plt.close(fig)

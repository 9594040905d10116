"""The figures of the comparison and variance studies (matplotlib, Agg).

Each function builds a bare ``matplotlib.figure.Figure``, which renders
without pyplot's global state, and writes one PNG.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

HEATMAP_LIMITS = (5e2, 1e4)  # colour scale of the toy-regression heatmap
_MAX_TRAJECTORY_POINTS = 2000


def _save(figure, path: str | pathlib.Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def plot_curves(
    curves: Mapping[str, Sequence[tuple[int, float | None]]],
    path: str | pathlib.Path,
    title: str,
) -> None:
    """Meta-objective against outer iteration, one line per entry.

    The y-axis is logarithmic when every plotted value is positive. Missing
    (``None``) values, non-finite in the run, are left out.

    Args:
      curves: Label to ``(iteration, meta_objective or None)`` pairs.
      path: Where to write the PNG.
      title: Figure title.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    positive = True
    for label, points in curves.items():
        kept = [(i, y) for i, y in points if y is not None]
        if not kept:
            continue
        iterations, values = zip(*kept, strict=True)
        positive = positive and min(values) > 0
        axes.plot(iterations, values, label=label, linewidth=1.2)
    if positive:
        axes.set_yscale("log")
    axes.set_xlabel("outer iteration")
    axes.set_ylabel("meta-objective (fresh evaluation unroll)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    _save(figure, path)


def plot_heatmap(
    axis: np.ndarray,
    values: np.ndarray,
    trajectories: Mapping[str, np.ndarray],
    grid: Mapping[str, Any],
    path: str | pathlib.Path,
) -> None:
    """The 2-d meta-objective with each entry's ``theta`` trajectory on it.

    Colours are on a log scale clipped to :data:`HEATMAP_LIMITS`.

    Args:
      axis: ``[R]`` coordinates of both grid axes.
      values: ``[R, R]`` meta-objectives, ``values[i, j]`` at
        ``(axis[i], axis[j])``.
      trajectories: Label to ``[num_records, 2]`` thetas in iteration order.
      grid: Holds ``optimum_theta`` (marked with a star) and ``resolution``.
      path: Where to write the PNG.
    """
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    low, high = HEATMAP_LIMITS
    figure = Figure(figsize=(6.5, 5.5))
    axes = figure.subplots()
    clipped = np.clip(np.nan_to_num(values, nan=high, posinf=high), low, high)
    mesh = axes.pcolormesh(
        axis, axis, clipped.T, norm=LogNorm(vmin=low, vmax=high), shading="auto"
    )
    figure.colorbar(mesh, ax=axes, label="meta-objective (log scale, clipped)")
    for label, thetas in trajectories.items():
        stride = max(1, len(thetas) // _MAX_TRAJECTORY_POINTS)
        shown = np.concatenate([thetas[::stride], thetas[-1:]])
        (line,) = axes.plot(shown[:, 0], shown[:, 1], linewidth=1.5, label=label)
        axes.plot(*shown[-1], marker="o", color=line.get_color(), markersize=5)
    axes.plot(*grid["optimum_theta"], marker="*", color="white", markersize=12)
    axes.set_xlim(axis[0], axis[-1])
    axes.set_ylim(axis[0], axis[-1])
    axes.set_xlabel("theta[0] (log initial learning rate)")
    axes.set_ylabel("theta[1] (log final learning rate)")
    axes.set_title(f"meta-objective on a {grid['resolution']}^2 grid; star: optimum")
    axes.legend(fontsize=8, loc="lower left")
    _save(figure, path)


def plot_variance(
    table: Sequence[Mapping[str, Any]],
    path: str | pathlib.Path,
    title: str,
    biased: Sequence[str] = ("truncated_es",),
) -> None:
    """Normalised squared error against truncations per inner problem.

    One panel per scenario, one line per estimator, log-log axes.

    Args:
      table: Rows with ``scenario``, ``estimator``, ``num_truncations`` and
        ``variance``.
      path: Where to write the PNG.
      title: Figure title.
      biased: Estimators whose error also holds a bias (so labelled).
    """
    from matplotlib.figure import Figure

    scenarios = list(dict.fromkeys(row["scenario"] for row in table))
    figure = Figure(figsize=(5 * len(scenarios), 4.2))
    panels = np.atleast_1d(figure.subplots(1, len(scenarios)))
    for axes, scenario in zip(panels, scenarios, strict=True):
        rows = [row for row in table if row["scenario"] == scenario]
        for name in dict.fromkeys(row["estimator"] for row in rows):
            points = sorted(
                (row["num_truncations"], row["variance"])
                for row in rows
                if row["estimator"] == name
            )
            counts, variances = zip(*points, strict=True)
            label = f"{name} (biased: bias^2 + variance)" if name in biased else name
            axes.plot(counts, variances, marker="o", markersize=4, label=label)
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("truncations per inner problem (T / K)")
        axes.set_ylabel("E||g - g_ref||^2 / ||g_ref||^2")
        axes.set_title(f"{scenario} tokens")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(title)
    _save(figure, path)

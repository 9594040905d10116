"""Per-step metrics of a meta-training run: collection, files and plots.

The :class:`pes_optax.Driver` records one row per outer step. This module
finds an estimator's diagnostics inside a (possibly chained) optax state,
turns a step's results into scalars, and writes rows as JSON lines or CSV or
draws them with matplotlib's Agg backend (imported only when plotting).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from pes_optax._src import checkpoint as checkpoint_lib

PyTree = Any
Row = dict[str, int | float]

# Diagnostics field -> metric name; a field the estimator lacks is skipped.
DIAGNOSTIC_METRICS = (
    ("mean_loss", "mean_loss"),
    ("num_dropped_pairs", "num_dropped_pairs"),
    ("num_nonfinite", "num_nonfinite"),
    ("num_inner_steps", "num_inner_steps"),
)
ROW_ORDER = ("mean_loss", "grad_norm", "num_dropped_pairs", "num_nonfinite")
ROW_ORDER += ("num_inner_steps",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_SUFFIXES = (".csv",)


def find_diagnostics(state: PyTree) -> Any | None:
    """First ``diagnostics`` field in an optax state, searched depth first.

    Looks through the tuples (``optax.chain``), lists and dicts that wrap an
    estimator's state, so a chained state ``(ESState, adam_state)`` gives the
    ``ESState``'s diagnostics.

    Args:
      state: An optax state, possibly nested.

    Returns:
      The diagnostics (e.g. an :class:`pes_optax.ESDiagnostics`), or ``None``
      when no part of ``state`` has a ``diagnostics`` field.

    Example:
      >>> import jax, jax.numpy as jnp, optax, pes_optax
      >>> problem = pes_optax.UnrolledProblem(
      ...     init=lambda key, theta: jnp.zeros(()),
      ...     step=lambda theta, s, key, data: (s + theta, s**2), horizon=4)
      >>> chained = optax.chain(
      ...     pes_optax.pes(problem, num_particles=2, sigma=0.1,
      ...                   truncation_length=2, key=0), optax.sgd(0.1))
      >>> state = chained.init(jnp.zeros(()))
      >>> int(pes_optax.find_diagnostics(state).num_inner_steps)
      0
    """
    if isinstance(state, tuple) and hasattr(state, "diagnostics"):
        return state.diagnostics
    if isinstance(state, dict):
        children = list(state.values())
    elif isinstance(state, (tuple, list)):
        children = list(state)
    else:
        return None
    for child in children:
        found = find_diagnostics(child)
        if found is not None:
            return found
    return None


def step_metrics(estimator_state: PyTree, estimate: PyTree) -> dict[str, jax.Array]:
    """Traceable scalars describing one outer step."""
    metrics = {"grad_norm": optax.tree.norm(estimate).astype(jnp.float32)}
    diagnostics = find_diagnostics(estimator_state)
    if diagnostics is not None:
        for field, name in DIAGNOSTIC_METRICS:
            if hasattr(diagnostics, field):
                metrics[name] = jnp.asarray(getattr(diagnostics, field))
    return metrics


def to_rows(
    metrics: dict[str, Any], first_step: int, eval_every: int | None
) -> list[Row]:
    """Host-side ``{name: [S]}`` arrays of a chunk of steps -> one row a step."""
    # One host conversion per metric: tolist() gives Python ints and floats.
    columns = {name: metrics[name].tolist() for name in metrics}
    names = [name for name in ROW_ORDER if name in columns]
    rows = []
    for i in range(len(columns["grad_norm"])):
        step = first_step + i
        row: Row = {"step": step}
        for name in names:
            row[name] = columns[name][i]
        if eval_every is not None and step % eval_every == 0:
            row["eval_loss"] = columns["eval_loss"][i]
        rows.append(row)
    return rows


def progress_bar(progress: bool | None, total: int) -> Any | None:
    """A tqdm bar for ``total`` outer steps, or ``None`` when not shown.

    ``progress=None`` shows one when tqdm is installed; ``True`` requires it.
    """
    if progress is None:
        progress = importlib.util.find_spec("tqdm") is not None
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        raise ImportError(
            "`progress=True` needs tqdm: pip install 'pes_optax[examples]'"
            " or pass progress=False."
        ) from error
    return tqdm(total=total, unit="step", desc="meta-training")


def progress_postfix(rows: list[dict[str, Any]], seconds: float) -> dict[str, str]:
    """Loss and inner-step throughput of the latest rows, for a tqdm bar."""
    last = rows[-1]
    postfix = {}
    if "mean_loss" in last:
        postfix["loss"] = f"{last['mean_loss']:.4g}"
    if "num_inner_steps" in last:
        inner = last["num_inner_steps"] - rows[0]["num_inner_steps"]
        postfix["inner_steps/s"] = f"{inner / max(seconds, 1e-9):.3g}"
    return postfix


def _columns(rows: Sequence[Row]) -> list[str]:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    return list(columns)


def _unwritable(path: str | os.PathLike, error: OSError) -> ValueError:
    reason = checkpoint_lib.os_error_reason(error)
    return ValueError(
        f"`path` {os.fspath(path)!r} cannot be written ({reason}); choose a file "
        "name (not a folder) under folders you can write to."
    )


def _make_parent(path: str | os.PathLike) -> None:
    """Creates the missing folders above ``path``."""
    try:
        pathlib.Path(path).absolute().parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _unwritable(path, error) from None


def _write_rows(rows: Sequence[Row], path: str | os.PathLike, suffix: str) -> None:
    if suffix in JSONL_SUFFIXES:
        with open(path, "w", encoding="utf-8") as file:
            for row in rows:
                file.write(json.dumps(row) + "\n")
    else:
        with open(path, "w", encoding="utf-8", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=_columns(rows), restval="")
            writer.writeheader()
            writer.writerows(rows)


def write_metrics(rows: Sequence[Row], path: str | os.PathLike) -> None:
    """Writes rows as JSON lines (``.jsonl``) or CSV (``.csv``), by suffix.

    Missing parent folders are created.
    """
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in JSONL_SUFFIXES + CSV_SUFFIXES:
        raise ValueError(
            f"`path` must end in one of {JSONL_SUFFIXES + CSV_SUFFIXES} to choose "
            f"the format, got {os.fspath(path)!r}. Use e.g. 'metrics.jsonl' or "
            "'metrics.csv'."
        )
    _make_parent(path)
    try:
        _write_rows(rows, path, suffix)
    except OSError as error:
        raise _unwritable(path, error) from None


def _series(rows: Sequence[Row], name: str) -> tuple[list[int], list[float]]:
    pairs = [(row["step"], row[name]) for row in rows if name in row]
    pairs = [(s, v) for s, v in pairs if math.isfinite(v)]
    return [s for s, _ in pairs], [v for _, v in pairs]


def plot_metrics(rows: Sequence[Row], path: str | os.PathLike) -> None:
    """Saves a PNG of the training loss and, if recorded, the eval loss.

    Missing parent folders are created.
    """
    if not rows:
        raise ValueError("There are no metrics to plot yet; call `run` before `plot`.")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure + Agg canvas: no pyplot, so no global backend is touched.
    panels = [name for name in ("mean_loss", "eval_loss") if _series(rows, name)[0]]
    panels = panels or ["grad_norm"]
    figure = Figure(figsize=(6.0, 2.6 * len(panels)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, panels, strict=True):
        steps, values = _series(rows, name)
        ax.plot(steps, values, marker="o" if name == "eval_loss" else None)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("outer step")
    _make_parent(path)
    try:
        figure.savefig(path, format="png")
    except OSError as error:
        raise _unwritable(path, error) from None

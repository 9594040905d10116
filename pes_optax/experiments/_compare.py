"""Several estimators on one built-in task: the PES paper's synthetic studies.

An entry is an estimator name with an optional truncation length,
``"NAME[:K]"`` (``"tbptt:100"``). Each entry starts from the task's defaults
and the per-task settings of :data:`ENTRY_SETTINGS` (the paper's choices, e.g.
UORO's smaller learning rate on influence balancing), runs through
:func:`pes_optax._runner.run_task` into its own folder, and ends as one row of
the comparison table. Nothing here prints; the CLI does.
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
import re
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from pes_optax import _runner
from pes_optax import tasks as tasks_lib
from pes_optax.experiments import _grid, _plots

# The estimators each task compares when none are named (the paper's runs).
DEFAULT_ENTRIES: dict[str, tuple[str, ...]] = {
    "influence_balancing": (
        "tbptt:1",
        "tbptt:10",
        "tbptt:100",
        "truncated_es",
        "pes",
        "rtrl",
        "uoro",
    ),
    "toy_regression": ("pes", "truncated_es", "tbptt", "rtrl", "uoro"),
    "digits": ("pes", "truncated_es", "tbptt"),
}

# Per-task, per-estimator settings that differ from the task's defaults.
ENTRY_SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    # UORO's rank-one estimate is noisy: the paper lowers its SGD step.
    "influence_balancing": {"uoro": {"learning_rate": 1e-5}},
    # Truncated ES needs a wider search; the paper's online methods take one
    # inner step per outer iteration.
    "toy_regression": {
        "truncated_es": {"sigma": 1.0},
        "rtrl": {"truncation_length": 1},
        "uoro": {"truncation_length": 1},
    },
}

# Comparison defaults that differ from the task's single-run defaults.
TASK_SETTINGS: dict[str, dict[str, Any]] = {
    "influence_balancing": {"eval_every": 10},
    "toy_regression": {"num_iterations": 20000, "eval_every": 10},
}

# Tasks with a 2-d theta whose meta-objective is drawn as a heatmap.
GRID_BOUNDS: dict[str, tuple[float, float]] = {"toy_regression": (-5.0, 5.0)}
DEFAULT_GRID_RESOLUTION = 401

TABLE_COLUMNS = (
    "label",
    "estimator",
    "truncation_length",
    "num_particles",
    "sigma",
    "learning_rate",
    "num_iterations",
    "final_theta",
    "final_meta_objective",
    "best_meta_objective",
    "wall_time_s",
)

_ENTRY_PATTERN = re.compile(r"^([a-z_]+)(?::([0-9]+))?$")


class Entry(NamedTuple):
    """One estimator configuration of a comparison."""

    label: str  # as written on the command line, e.g. "tbptt:10"
    settings: _runner.RunSettings


class ComparisonResult(NamedTuple):
    """What :func:`compare` returns."""

    rows: list[dict[str, Any]]  # one per entry, keys TABLE_COLUMNS (+ grid)
    grid: dict[str, Any] | None  # the heatmap's optimum, or None
    files: dict[str, pathlib.Path]  # "plot", "csv", "json", maybe "heatmap"


def parse_entry(text: str) -> tuple[str, int | None]:
    """Splits ``"NAME[:K]"`` into the estimator name and truncation length.

    Args:
      text: An entry such as ``"pes"`` or ``"tbptt:100"``.

    Returns:
      ``(name, K)`` with ``K`` ``None`` when not given.
    """
    match = _ENTRY_PATTERN.match(text.strip())
    if match is None or match.group(1) not in _runner.ESTIMATORS:
        raise ValueError(
            f"Estimator entry {text!r} must be NAME or NAME:K with NAME one of "
            f"{sorted(_runner.ESTIMATORS)} and K a positive int."
        )
    length = None if match.group(2) is None else int(match.group(2))
    if length == 0:
        raise ValueError(f"Truncation length in {text!r} must be >= 1.")
    return match.group(1), length


def make_entries(
    task: tasks_lib.Task,
    labels: Sequence[str] | None = None,
    *,
    num_iterations: int | None = None,
    num_particles: int | None = None,
    eval_every: int | None = None,
    seed: int = 0,
) -> list[Entry]:
    """The run settings of each entry on ``task``.

    Args:
      task: The task.
      labels: Entries ``"NAME[:K]"``; the task's :data:`DEFAULT_ENTRIES` when
        ``None``.
      num_iterations: Outer iterations for every entry (default: the
        comparison's default for the task, else the task's).
      num_particles: Particles for every particle-based entry.
      eval_every: Outer iterations between evaluations.
      seed: Seed of every entry.

    Returns:
      One ``Entry`` per label, in order.
    """
    labels = (
        DEFAULT_ENTRIES.get(task.name, (task.estimator,)) if labels is None else labels
    )
    if len(set(labels)) != len(labels):
        raise ValueError(f"Estimator entries must be distinct, got {list(labels)}.")
    common = dict(TASK_SETTINGS.get(task.name, {}))
    for name, value in (
        ("num_iterations", num_iterations),
        ("eval_every", eval_every),
    ):
        if value is not None:
            common[name] = value

    entries = []
    for label in labels:
        name, length = parse_entry(label)
        settings = _runner.RunSettings(
            estimator=name,
            num_particles=task.num_particles,
            sigma=task.sigma,
            truncation_length=task.truncation_length,
            learning_rate=task.learning_rate,
            num_iterations=task.num_iterations,
            eval_every=task.eval_every,
            seed=seed,
        )._replace(**common, **ENTRY_SETTINGS.get(task.name, {}).get(name, {}))
        if length is not None:
            settings = settings._replace(truncation_length=length)
        if num_particles is not None:
            settings = settings._replace(num_particles=num_particles)
        entries.append(Entry(label.strip(), settings))
    return entries


def _folder_name(label: str) -> str:
    return label.replace(":", "_K")


def _row(entry: Entry, result: _runner.RunResult) -> dict[str, Any]:
    spec = _runner.ESTIMATORS[entry.settings.estimator]
    settings = entry.settings
    values = [
        r["meta_objective"] for r in result.records if r["meta_objective"] is not None
    ]
    learned = result.summary["learned"]
    return {
        "label": entry.label,
        "estimator": settings.estimator,
        "truncation_length": (
            settings.truncation_length if spec.uses_truncation_length else None
        ),
        "num_particles": settings.num_particles if spec.uses_particles else None,
        "sigma": settings.sigma if spec.uses_particles else None,
        "learning_rate": settings.learning_rate,
        "num_iterations": settings.num_iterations,
        "final_theta": learned["theta"],
        "final_meta_objective": learned["meta_objective"],
        "best_meta_objective": min(values) if values else None,
        "wall_time_s": result.summary["wall_time_s"],
    }


def compare(
    task: tasks_lib.Task,
    entries: Sequence[Entry],
    out_dir: str | pathlib.Path,
    *,
    grid_resolution: int | None = DEFAULT_GRID_RESOLUTION,
    progress: bool = False,
) -> ComparisonResult:
    """Runs every entry on ``task`` and writes the plot and the table.

    Writes ``comparison.png`` (meta-objective against outer iteration, one
    curve per entry), ``comparison.csv`` and ``comparison.json`` (one row per
    entry with the columns of :data:`TABLE_COLUMNS`), and each entry's
    ``metrics.jsonl``, ``summary.json`` and ``meta_objective.png`` in a
    sub-folder named after it (``tbptt:10`` becomes ``tbptt_K10``). For a task
    in :data:`GRID_BOUNDS` it also evaluates the meta-objective on a
    ``grid_resolution`` squared grid and writes ``heatmap.png`` with every
    entry's ``theta`` trajectory.

    Args:
      task: The task.
      entries: From :func:`make_entries`.
      out_dir: Output folder (created if missing).
      grid_resolution: Points per axis of the heatmap; ``None`` or 0 skips it.
      progress: Show a progress bar per entry on stderr.

    Returns:
      A ``ComparisonResult``.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, trajectories, curves = [], {}, {}
    for entry in entries:
        result = _runner.run_task(
            task, entry.settings, out_dir / _folder_name(entry.label), progress
        )
        rows.append(_row(entry, result))
        trajectories[entry.label] = np.array(
            [np.ravel(r["theta"]) for r in result.records], np.float64
        )
        curves[entry.label] = [
            (r["iteration"], r["meta_objective"]) for r in result.records
        ]

    files = {"plot": out_dir / "comparison.png"}
    _plots.plot_curves(curves, files["plot"], f"{task.name}: meta-objective")
    grid = None
    if task.name in GRID_BOUNDS and grid_resolution:
        grid, values, axis = _grid_summary(task, grid_resolution, entries[0])
        for row in rows:
            row["ratio_to_grid_optimum"] = _ratio(
                row["final_meta_objective"], grid["optimum_meta_objective"]
            )
        files["heatmap"] = out_dir / "heatmap.png"
        _plots.plot_heatmap(axis, values, trajectories, grid, files["heatmap"])

    files["csv"], files["json"] = (
        out_dir / "comparison.csv",
        out_dir / "comparison.json",
    )
    _write_table(rows, grid, task.name, files["csv"], files["json"])
    return ComparisonResult(rows, grid, files)


def _ratio(value: float | None, reference: float) -> float | None:
    return None if value is None else value / reference


def _grid_summary(task: tasks_lib.Task, resolution: int, entry: Entry):
    """Evaluates the grid (with the runs' evaluation key) and its optimum."""
    low, high = GRID_BOUNDS[task.name]
    eval_key = jax.random.split(jax.random.key(entry.settings.seed))[1]
    start = time.perf_counter()
    axis, values = _grid.meta_objective_grid(task, low, high, resolution, eval_key)
    values = np.asarray(values, np.float64)
    wall_time = time.perf_counter() - start
    finite = np.where(np.isfinite(values), values, np.inf)
    i, j = np.unravel_index(np.argmin(finite), finite.shape)
    grid = {
        "bounds": [low, high],
        "resolution": resolution,
        "optimum_theta": [float(axis[i]), float(axis[j])],
        "optimum_meta_objective": float(finite[i, j]),
        "wall_time_s": wall_time,
    }
    return grid, values, np.asarray(axis, np.float64)


def _csv_cell(value: Any) -> Any:
    if isinstance(value, list):
        return " ".join(f"{x:.6g}" for x in np.ravel(value))
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return value


def _write_table(rows, grid, task_name, csv_path, json_path) -> None:
    columns = list(rows[0]) if rows else list(TABLE_COLUMNS)
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _csv_cell(row[key]) for key in columns})
    payload = {"task": task_name, "rows": rows, "grid": grid}
    json_path.write_text(json.dumps(payload, indent=2) + "\n")


def _text_cell(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(f"{x:.4g}" for x in np.ravel(value)) + "]"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return "-" if value is None else str(value)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison rows as an aligned plain-text table.

    Args:
      rows: ``ComparisonResult.rows``.

    Returns:
      The table, one line per entry after a header line.
    """
    columns = [
        ("label", "entry"),
        ("truncation_length", "K"),
        ("num_particles", "N"),
        ("sigma", "sigma"),
        ("learning_rate", "lr"),
        ("num_iterations", "iters"),
        ("final_theta", "final theta"),
        ("final_meta_objective", "final meta-obj"),
        ("best_meta_objective", "best meta-obj"),
        ("ratio_to_grid_optimum", "/grid opt"),
        ("wall_time_s", "time s"),
    ]
    columns = [c for c in columns if rows and c[0] in rows[0]]
    table = [[title for _, title in columns]]
    table += [[_text_cell(row[key]) for key, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        for line in table
    )

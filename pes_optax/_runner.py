"""The outer training loop behind the ``pes-optax`` command.

Builds an estimator from :data:`ESTIMATORS`, runs the outer loop of a
:class:`pes_optax.tasks.Task` with :class:`pes_optax.Driver` (one compiled
step per iteration, so that every iteration's theta is recorded), and writes
``metrics.jsonl``, ``summary.json`` and ``meta_objective.png``. Nothing here
prints; the CLI does.

The driver's own evaluation is not used: the CLI evaluates the theta *after*
an iteration, always with the same key (so values along a run are
comparable), also at the last iteration, and records two values
(meta-objective and validation), where ``Driver`` evaluates one scalar on the
theta a step starts from with a fresh key per step.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

import pes_optax
from pes_optax import tasks as tasks_lib

PyTree = Any

METRIC_KEYS = (
    "iteration",
    "mean_loss",
    "theta",
    "grad_norm",
    "num_dropped_pairs",
    "meta_objective",
    "validation",
)


class RunSettings(NamedTuple):
    """Everything a run needs besides the task."""

    estimator: str
    num_particles: int
    sigma: float
    truncation_length: int
    learning_rate: float
    num_iterations: int
    eval_every: int
    seed: int


# --- Estimators ------------------------------------------------------------


class EstimatorSpec(NamedTuple):
    """How the CLI builds one estimator from a problem, settings and a key."""

    build: Callable[
        [pes_optax.UnrolledProblem, RunSettings, jax.Array],
        optax.GradientTransformation,
    ]
    description: str
    uses_particles: bool = True  # whether --particles and --sigma apply
    uses_truncation_length: bool = True  # whether --truncation-length applies


def _evolution_strategy(factory: Callable[..., Any], description: str):
    """Entry for an ES estimator taking particles, sigma and a truncation."""

    def build(problem, settings, key):
        return factory(
            problem,
            num_particles=settings.num_particles,
            sigma=settings.sigma,
            truncation_length=settings.truncation_length,
            key=key,
        )

    return EstimatorSpec(build, description)


def _full_unroll_strategy(factory: Callable[..., Any], description: str):
    """Entry for an ES estimator that unrolls whole inner problems."""

    def build(problem, settings, key):
        return factory(
            problem, num_particles=settings.num_particles, sigma=settings.sigma, key=key
        )

    return EstimatorSpec(build, description, uses_truncation_length=False)


def _gradient_method(factory: Callable[..., Any], description: str):
    """Entry for a backprop or online method (no particles, no sigma)."""

    def build(problem, settings, key):
        return factory(problem, truncation_length=settings.truncation_length, key=key)

    return EstimatorSpec(build, description, uses_particles=False)


def _full_unroll_gradient(factory: Callable[..., Any], description: str):
    """Entry for backprop through whole inner problems (problem and key only)."""

    def build(problem, settings, key):
        del settings
        return factory(problem, key=key)

    return EstimatorSpec(
        build, description, uses_particles=False, uses_truncation_length=False
    )


# One entry per estimator.
ESTIMATORS: dict[str, EstimatorSpec] = {
    "pes": _evolution_strategy(pes_optax.pes, "Persistent ES (unbiased)"),
    "truncated_es": _evolution_strategy(
        pes_optax.truncated_es, "Truncated ES (biased baseline)"
    ),
    "nres": _evolution_strategy(pes_optax.nres, "Noise-reuse ES (unbiased)"),
    "pes_a": _evolution_strategy(
        pes_optax.pes_a, "PES with the current truncation's exact gradient"
    ),
    "full_es": _full_unroll_strategy(
        pes_optax.full_es, "Full-unroll ES (one update per inner problem)"
    ),
    "tbptt": _gradient_method(
        pes_optax.tbptt, "Truncated backprop through time (biased)"
    ),
    "rtrl": _gradient_method(
        pes_optax.rtrl, "Real-time recurrent learning (exact online gradient)"
    ),
    "uoro": _gradient_method(
        pes_optax.uoro, "Unbiased online recurrent optimisation (rank one)"
    ),
    "bptt": _full_unroll_gradient(
        pes_optax.bptt, "Backprop through whole inner problems (exact)"
    ),
}


# --- Running ---------------------------------------------------------------


class RunResult(NamedTuple):
    """What :func:`run_task` returns."""

    records: list[dict[str, Any]]  # the lines of metrics.jsonl
    summary: dict[str, Any]  # the content of summary.json


def _to_json(tree: PyTree) -> Any:
    """Arrays to (nested) Python floats; non-finite floats to ``None``."""

    def convert(x):
        value = np.asarray(x, np.float64).tolist()
        if isinstance(value, float):
            return value if math.isfinite(value) else None
        return value

    return jax.tree.map(convert, tree)


def _evaluator(task: tasks_lib.Task, eval_key: jax.Array):
    """Jitted ``theta -> {"meta_objective": ..., "validation": ...}``."""

    @jax.jit
    def evaluate(theta):
        values = {"meta_objective": task.evaluate(theta, eval_key)}
        if task.validate is not None:
            values["validation"] = task.validate(theta, eval_key)
        return values

    return evaluate


def _record(iteration, theta, row, evaluation) -> dict[str, Any]:
    """One line of metrics.jsonl from a driver's metric row (``{}`` at 0)."""
    record = dict.fromkeys(METRIC_KEYS)
    if row:
        # An estimator without diagnostics has no loss and drops no pairs.
        record["mean_loss"] = _to_json(row.get("mean_loss", math.nan))
        record["grad_norm"] = _to_json(row["grad_norm"])
        record["num_dropped_pairs"] = int(row.get("num_dropped_pairs", 0))
    record.update(_to_json(evaluation or {}))
    record["iteration"] = iteration
    record["theta"] = _to_json(theta)
    return record


def run_task(
    task: tasks_lib.Task,
    settings: RunSettings,
    out_dir: str | pathlib.Path,
    progress: bool = False,
) -> RunResult:
    """Trains ``task.initial_theta`` and writes metrics, plot and summary.

    Args:
      task: The task.
      settings: Estimator and outer-loop settings.
      out_dir: Output folder (created if missing).
      progress: Show a tqdm progress bar on stderr.

    Returns:
      A ``RunResult`` with the metric records and the summary.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    estimator_key, eval_key = jax.random.split(jax.random.key(settings.seed))
    spec = ESTIMATORS[settings.estimator]
    estimator = spec.build(task.problem, settings, estimator_key)
    optimizer = task.optimizer(settings.learning_rate)
    evaluate = _evaluator(task, eval_key)

    # Initial point.
    start = time.perf_counter()
    driver = pes_optax.Driver(
        estimator,
        optimizer,
        task.initial_theta,
        config={"task": task.name, **settings._asdict()},
    )
    initial = _record(0, driver.theta, {}, evaluate(driver.theta))
    records = [initial]

    # Outer loop.
    from tqdm.auto import tqdm

    bar = tqdm(
        range(1, settings.num_iterations + 1),
        disable=not progress,
        desc=f"{task.name}/{settings.estimator}",
        file=sys.stderr,
    )
    with open(out_dir / "metrics.jsonl", "w") as metrics_file:
        metrics_file.write(json.dumps(initial) + "\n")
        for iteration in bar:
            (row,) = driver.run(1, progress=False)
            theta = driver.theta
            due = iteration % settings.eval_every == 0
            due = due or iteration == settings.num_iterations
            record = _record(iteration, theta, row, evaluate(theta) if due else None)
            records.append(record)
            metrics_file.write(json.dumps(record) + "\n")
            bar.set_postfix(
                loss=record["mean_loss"],
                meta=_last_meta_objective(records),
                refresh=False,
            )
    wall_time = time.perf_counter() - start

    summary = {
        "task": task.name,
        "settings": settings._asdict(),
        "initial": _final_row(initial),
        "learned": _final_row(records[-1]),
        "wall_time_s": wall_time,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_meta_objective(records, out_dir / "meta_objective.png", task.name, settings)
    return RunResult(records, summary)


def _last_meta_objective(records: Sequence[dict[str, Any]]) -> float | None:
    for record in reversed(records):
        if record["meta_objective"] is not None:
            return record["meta_objective"]
    return None


def _final_row(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("theta", "meta_objective", "validation")
    return {key: record[key] for key in keys}


def plot_meta_objective(
    records: Sequence[dict[str, Any]],
    path: str | pathlib.Path,
    task_name: str,
    settings: RunSettings,
) -> None:
    """Writes a PNG of the evaluation meta-objective over outer iterations.

    Args:
      records: Metric records as written to ``metrics.jsonl``.
      path: Where to write the PNG.
      task_name: For the title.
      settings: For the title.
    """
    # A bare Figure renders with Agg and leaves pyplot's global state alone.
    from matplotlib.figure import Figure

    points = [
        (r["iteration"], r["meta_objective"])
        for r in records
        if r["meta_objective"] is not None
    ]
    iterations, values = zip(*points, strict=True) if points else ((), ())
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    axes.plot(iterations, values, marker="o", markersize=3)
    if values and min(values) > 0:
        axes.set_yscale("log")
    axes.set_xlabel("outer iteration")
    axes.set_ylabel("meta-objective (fresh full unroll)")
    axes.set_title(f"{task_name}: {settings.estimator}, seed {settings.seed}")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)

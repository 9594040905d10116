"""The ``pes-optax`` command: train a built-in task's ``theta`` with an estimator.

``pes-optax run [TASK]`` builds the task from :mod:`pes_optax.tasks`, chains the
chosen estimator with the task's outer optimizer, runs the outer loop under
one jitted step with a progress bar, prints a table of the initial and learned
``theta`` with their meta-objectives, and writes into the output folder:

* ``metrics.jsonl``: one JSON object per outer iteration (iteration 0 is the
  starting point) with the keys of :data:`METRIC_KEYS` (``null`` where a
  value was not measured at that iteration);
* ``meta_objective.png``: the evaluation meta-objective over iterations;
* ``summary.json``: the settings, the initial and learned ``theta`` with their
  meta-objectives, and the wall time.

``pes-optax list`` lists the tasks with their default settings and the
estimators. The same seed gives the same metrics.

``pes-optax compare TASK --estimators pes,tbptt:10,...`` runs several
estimators on one task (each with the task's per-estimator settings, see
:mod:`pes_optax.experiments`), prints one table and writes ``comparison.png``,
``comparison.csv``, ``comparison.json`` (plus ``heatmap.png`` for
``toy_regression``) and one sub-folder of metrics per estimator.

``pes-optax variance`` measures each ES estimator's error against the number
of truncations per inner problem on a tiny LSTM over text that ships with
Python, prints a Markdown table and writes ``variance.{csv,md,json,png}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from pes_optax import experiments
from pes_optax import tasks as tasks_lib
from pes_optax._arguments import (
    add_common_arguments,
    add_compare_parser,
    add_variance_parser,
    positive,
)
from pes_optax._runner import ESTIMATORS as ESTIMATORS
from pes_optax._runner import METRIC_KEYS as METRIC_KEYS
from pes_optax._runner import RunSettings as RunSettings
from pes_optax._runner import run_task as run_task

# --- Command line ----------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``pes-optax`` argument parser.

    Returns:
      An ``argparse.ArgumentParser`` with the ``run`` and ``list`` commands.
    """
    parser = argparse.ArgumentParser(
        prog="pes-optax",
        description="Train built-in unrolled-optimization tasks with PES and "
        "related gradient estimators.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "list", help="list the tasks with their default settings, and the estimators"
    )

    run = commands.add_parser(
        "run",
        help="train a task's theta",
        description="Train a task's theta. Unset options take the task's "
        "defaults (see `pes-optax list`).",
    )
    run.add_argument(
        "task",
        nargs="?",
        default=tasks_lib.DEFAULT_TASK,
        choices=tasks_lib.TASKS,
        help=f"task to train (default: {tasks_lib.DEFAULT_TASK})",
    )
    run.add_argument(
        "--estimator", choices=sorted(ESTIMATORS), help="gradient estimator"
    )
    run.add_argument(
        "--iterations", type=positive(int, "--iterations"), help="outer updates"
    )
    run.add_argument(
        "--particles",
        type=positive(int, "--particles"),
        help="particles N, both members of each antithetic pair (even)",
    )
    run.add_argument(
        "--sigma",
        type=positive(float, "--sigma"),
        help="standard deviation of the perturbations",
    )
    run.add_argument(
        "--truncation-length",
        type=positive(int, "--truncation-length"),
        help="inner steps K per outer update",
    )
    run.add_argument(
        "--learning-rate",
        type=positive(float, "--learning-rate"),
        help="learning rate of the task's outer optimizer",
    )
    run.add_argument(
        "--eval-every",
        type=positive(int, "--eval-every"),
        help="outer updates between evaluations of the meta-objective",
    )
    add_common_arguments(run, "output folder (default: runs/TASK-ESTIMATOR-seedSEED)")
    add_compare_parser(commands)
    add_variance_parser(commands)
    return parser


def _settings_from_args(args: argparse.Namespace, task: tasks_lib.Task):
    def pick(value, default):
        return default if value is None else value

    return RunSettings(
        estimator=pick(args.estimator, task.estimator),
        num_particles=pick(args.particles, task.num_particles),
        sigma=pick(args.sigma, task.sigma),
        truncation_length=pick(args.truncation_length, task.truncation_length),
        learning_rate=pick(args.learning_rate, task.learning_rate),
        num_iterations=pick(args.iterations, task.num_iterations),
        eval_every=pick(args.eval_every, task.eval_every),
        seed=args.seed,
    )


def _format_theta(theta: Any) -> str:
    leaves = np.ravel(np.asarray(jax.tree.leaves(theta), np.float64))
    return "[" + ", ".join(f"{x:.6g}" for x in leaves) + "]"


def _format_value(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def _print_table(rows: Sequence[Sequence[str]], indent: str = "") -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print((indent + "  ".join(cells)).rstrip())


def _print_summary(summary: dict[str, Any], out_dir: pathlib.Path) -> None:
    rows = [("", "theta", "meta-objective", "validation")]
    for label in ("initial", "learned"):
        row = summary[label]
        rows.append(
            (
                label,
                _format_theta(row["theta"]),
                _format_value(row["meta_objective"]),
                _format_value(row["validation"]),
            )
        )
    _print_table(rows)
    print(f"wall time {summary['wall_time_s']:.1f} s; results in {out_dir}")


def _optimizer_name(factory: Any) -> str:
    while hasattr(factory, "func"):  # functools.partial
        factory = factory.func
    return getattr(factory, "__name__", repr(factory))


def _task_row(name: str) -> tuple[str, ...]:
    settings = tasks_lib.default_settings(name)
    label = name + (" (default)" if name == tasks_lib.DEFAULT_TASK else "")
    return (
        label,
        settings["estimator"],
        str(settings["num_particles"]),
        f"{settings['sigma']:g}",
        str(settings["truncation_length"]),
        _optimizer_name(settings["optimizer"]),
        f"{settings['learning_rate']:g}",
        str(settings["num_iterations"]),
    )


def _print_listing() -> None:
    print("tasks and their defaults (`pes-optax run TASK --option` overrides):")
    header = ("task", "estimator", "particles", "sigma", "truncation")
    header += ("optimizer", "learning-rate", "iterations")
    _print_table([header, *map(_task_row, tasks_lib.TASKS)], indent="  ")
    print("estimators:")
    for name in sorted(ESTIMATORS):
        print(f"  {name:<14}{ESTIMATORS[name].description}")


def _check_applicable(parser, args, estimator: str) -> None:
    """Rejects options that the chosen estimator does not take."""
    spec = ESTIMATORS[estimator]
    unused = []
    if not spec.uses_particles:
        unused += [
            f
            for f, v in (("--particles", args.particles), ("--sigma", args.sigma))
            if v is not None
        ]
    if not spec.uses_truncation_length and args.truncation_length is not None:
        unused.append("--truncation-length")
    if unused:
        parser.error(
            f"{', '.join(unused)} does not apply to --estimator {estimator}; drop it."
        )


def _reason(error: OSError) -> str:
    if isinstance(error, (FileExistsError, NotADirectoryError)):
        return "a folder on the path is a file"
    return error.strerror or str(error)


def _make_out_dir(parser, out_dir: pathlib.Path) -> None:
    """Creates the output folder, or exits with an argparse error."""
    if out_dir.exists() and not out_dir.is_dir():
        parser.error(f"--out {out_dir} exists and is not a folder; pick another.")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(
            f"--out {out_dir} cannot be created ({_reason(error)}); "
            "pick a folder under one you can write to."
        )
    if not os.access(out_dir, os.W_OK | os.X_OK):
        parser.error(f"--out {out_dir} is not writable; pick another folder.")


def _compare(parser, args) -> int:
    task = tasks_lib.get_task(args.task)
    try:
        entries = experiments.make_entries(
            task,
            args.estimators,
            num_iterations=args.iterations,
            num_particles=args.particles,
            eval_every=args.eval_every,
            seed=args.seed,
        )
        for entry in entries:
            ESTIMATORS[entry.settings.estimator].build(
                task.problem, entry.settings, jax.random.key(0)
            )
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    out_dir = args.out or pathlib.Path("runs", f"compare-{task.name}-seed{args.seed}")
    _make_out_dir(parser, out_dir)
    result = experiments.compare(
        task,
        entries,
        out_dir,
        grid_resolution=args.grid_resolution,
        progress=not args.no_progress,
    )
    print(experiments.format_table(result.rows))
    if result.grid is not None:
        grid = result.grid
        print(
            f"grid {grid['resolution']}^2 over {grid['bounds']}: optimum "
            f"{_format_theta(grid['optimum_theta'])} meta-objective "
            f"{grid['optimum_meta_objective']:.6g} ({grid['wall_time_s']:.1f} s)"
        )
    print("results in " + ", ".join(str(path) for path in result.files.values()))
    return 0


def _variance(parser, args) -> int:
    fields = experiments.VarianceSettings._fields
    settings = experiments.VarianceSettings(
        **{field: getattr(args, field) for field in fields}
    )
    try:
        experiments.check_variance_settings(settings)
    except ValueError as error:
        parser.error(str(error))
    out_dir = args.out or pathlib.Path("runs", f"variance-seed{args.seed}")
    _make_out_dir(parser, out_dir)
    result = experiments.variance_study(settings, progress=not args.no_progress)
    files = experiments.write_variance_outputs(result, out_dir)
    summary = result.summary
    print(f"{summary['num_parameters']} parameters; reference: {summary['reference']}")
    print("normalised squared error, mean ± standard error over repeats:")
    print(files["markdown"].read_text(), end="")
    for scenario, ratios in summary["growth"].items():
        shown = ", ".join(f"{name} x{ratio:.3g}" for name, ratio in ratios.items())
        print(f"{scenario}: most / fewest truncations: {shown}")
    print(f"wall time {summary['wall_time_s']:.1f} s; results in {out_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pes-optax`` console script.

    Args:
      argv: Arguments without the program name; ``sys.argv[1:]`` when
        ``None``.

    Returns:
      The exit status, 0 on success. Bad arguments exit with status 2 and an
      argparse message.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "list":
        _print_listing()
        return 0

    task_name = getattr(args, "task", None)
    needed = ("tqdm", "matplotlib") + (("sklearn",) if task_name == "digits" else ())
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        parser.error(
            f"`pes-optax {args.command}` needs {', '.join(missing)}; install "
            "them with `pip install 'pes_optax[examples]'`."
        )
    if args.command == "compare":
        return _compare(parser, args)
    if args.command == "variance":
        return _variance(parser, args)
    task = tasks_lib.get_task(args.task)
    settings = _settings_from_args(args, task)
    _check_applicable(parser, args, settings.estimator)
    try:
        # The factories reject bad combinations (e.g. odd --particles).
        ESTIMATORS[settings.estimator].build(
            task.problem, settings, jax.random.key(settings.seed)
        )
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    out_dir = args.out or pathlib.Path(
        "runs", f"{task.name}-{settings.estimator}-seed{settings.seed}"
    )
    _make_out_dir(parser, out_dir)
    result = run_task(task, settings, out_dir, progress=not args.no_progress)
    _print_summary(result.summary, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

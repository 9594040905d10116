"""Argument types and the parsers of the ``compare`` and ``variance`` commands.

Kept apart from :mod:`pes_optax.cli`, which builds the whole parser, runs the
commands and does all printing.
"""

from __future__ import annotations

import argparse
import math
import pathlib
from collections.abc import Callable
from typing import Any

from pes_optax import experiments
from pes_optax import tasks as tasks_lib


def positive(kind: type, name: str) -> Callable[[str], Any]:
    """An argparse ``type`` accepting values of ``kind`` greater than 0."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(
                f"{name} must be {noun}, got {text!r}"
            ) from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {text!r}")
        return value

    return parse


def non_negative_int(name: str, below: int | None = None) -> Callable[[str], int]:
    """An argparse ``type`` accepting ints ``>= 0`` (and ``< below`` if given)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} must be an int, got {text!r}"
            ) from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{name} must be >= 0, got {text!r}")
        if below is not None and value >= below:
            raise argparse.ArgumentTypeError(
                f"{name} must be < {below} (it must fit in 64 bits), got {text!r}"
            )
        return value

    return parse


def parse_seed(text: str) -> int:
    """The argparse ``type`` of ``--seed``: an int in ``[0, 2**63)``."""
    return non_negative_int("seed", below=2**63)(text)


def parse_out(text: str) -> pathlib.Path:
    """The argparse ``type`` of ``--out``: a non-empty folder path."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "--out must name a folder, got an empty path; drop --out for the "
            "default or pass e.g. --out runs/mine"
        )
    return pathlib.Path(text)


def _grid_resolution(text: str) -> int:
    value = non_negative_int("--grid-resolution")(text)
    if value == 1:
        raise argparse.ArgumentTypeError("--grid-resolution must be 0 (off) or >= 2")
    return value


def _comma_list(kind: type, name: str) -> Callable[[str], tuple]:
    """An argparse ``type`` for a comma-separated list of ``kind``."""
    parse_one = positive(kind, name) if kind is not str else str

    def parse(text: str) -> tuple:
        items = tuple(parse_one(item.strip()) for item in text.split(",") if item)
        if not items:
            raise argparse.ArgumentTypeError(f"{name} needs at least one value")
        return items

    return parse


def add_common_arguments(command: argparse.ArgumentParser, out_help: str) -> None:
    """``--seed``, ``--out`` and ``--no-progress``, shared by every subcommand."""
    command.add_argument(
        "--seed",
        type=parse_seed,
        default=0,
        help="random seed in [0, 2**63) (default 0)",
    )
    command.add_argument("--out", type=parse_out, help=out_help)
    command.add_argument(
        "--no-progress", action="store_true", help="hide progress bars"
    )


def add_compare_parser(commands) -> None:
    compare = commands.add_parser(
        "compare",
        help="run several estimators on one task: one plot, one table",
        description="Run several estimators on one task with the paper's "
        "per-estimator settings; write one plot and one table.",
    )
    compare.add_argument("task", choices=tasks_lib.TASKS, help="task to train")
    compare.add_argument(
        "--estimators",
        type=_comma_list(str, "--estimators"),
        help="comma-separated NAME or NAME:K entries, e.g. "
        "pes,truncated_es,tbptt:10 (default: the task's paper set)",
    )
    compare.add_argument(
        "--iterations", type=positive(int, "--iterations"), help="outer updates"
    )
    compare.add_argument(
        "--particles",
        type=positive(int, "--particles"),
        help="particles N of every particle-based entry",
    )
    compare.add_argument(
        "--eval-every",
        type=positive(int, "--eval-every"),
        help="outer updates between evaluations",
    )
    compare.add_argument(
        "--grid-resolution",
        type=_grid_resolution,
        default=experiments.DEFAULT_GRID_RESOLUTION,
        help="heatmap points per axis for a 2-d theta, 0 to skip "
        f"(default {experiments.DEFAULT_GRID_RESOLUTION})",
    )
    add_common_arguments(compare, "output folder (default: runs/compare-TASK-seedSEED)")


def add_variance_parser(commands) -> None:
    defaults = experiments.VarianceSettings()
    variance = commands.add_parser(
        "variance",
        help="ES estimators' variance against truncations per inner problem",
        description="Normalised squared error of each ES estimator's summed "
        "estimate over one inner problem of a tiny LSTM, against T/K.",
    )
    options = [
        ("--tokens", int, "num_tokens", "sequence length T"),
        ("--truncation-lengths", (int,), "truncation_lengths", "values of K"),
        (
            "--estimators",
            (str,),
            "estimators",
            "ES estimators among " + ",".join(experiments.ESTIMATOR_FACTORIES),
        ),
        ("--scenarios", (str,), "scenarios", "token scenarios real,random,repeat"),
        ("--particles", int, "num_particles", "particles N"),
        ("--sigma", float, "sigma", "perturbation standard deviation"),
        ("--repeats", int, "num_repeats", "repeats with fresh keys"),
        ("--hidden-size", int, "hidden_size", "LSTM hidden size"),
        ("--embedding-size", int, "embedding_size", "token embedding size"),
    ]
    for flag, kind, field, text in options:
        default = getattr(defaults, field)
        parse = (
            _comma_list(kind[0], flag)
            if isinstance(kind, tuple)
            else positive(kind, flag)
        )
        shown = ",".join(map(str, default)) if isinstance(kind, tuple) else default
        variance.add_argument(
            flag, dest=field, type=parse, default=default, help=f"{text} ({shown})"
        )
    add_common_arguments(variance, "output folder (default: runs/variance-seedSEED)")

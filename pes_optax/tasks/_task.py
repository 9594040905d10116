"""The record that bundles a built-in task with its default settings."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

from pes_optax import UnrolledProblem

PyTree = Any
EvaluateFn = Callable[[PyTree, jax.Array], jax.Array]
OptimizerFactory = Callable[[float], optax.GradientTransformation]

# Task fields that `get_task` lets a caller override by name.
HYPERPARAMETERS = (
    "estimator",
    "num_particles",
    "sigma",
    "truncation_length",
    "optimizer",
    "learning_rate",
    "num_iterations",
    "eval_every",
)


@dataclasses.dataclass(frozen=True)
class Task:
    """A built-in unrolled problem, how to evaluate it and how to train it.

    Attributes:
      name: Registry name of the task.
      problem: The unrolled problem the estimators consume.
      initial_theta: Where outer training starts (a pytree of float arrays).
      evaluate: ``(theta, key) -> scalar``: the meta-objective of a fresh full
        inner problem run with a fixed ``theta`` (for an endless problem, the
        task's own evaluation unroll). Lower is better.
      estimator: Default estimator name, e.g. ``"pes"``.
      num_particles: Default number of particles (antithetic pairs counted
        twice).
      sigma: Default perturbation standard deviation.
      truncation_length: Default number of inner steps per outer update.
      optimizer: Factory ``learning_rate -> optax.GradientTransformation`` for
        the outer optimizer.
      learning_rate: Default outer learning rate.
      num_iterations: Default number of outer updates.
      eval_every: Default number of outer updates between evaluations.
      validate: Optional ``(theta, key) -> scalar`` held-out metric (for
        example a validation loss after a full inner problem); ``None`` when
        the task has none.
      description: One line for listings.
    """

    name: str
    problem: UnrolledProblem
    initial_theta: PyTree
    evaluate: EvaluateFn
    estimator: str
    num_particles: int
    sigma: float
    truncation_length: int
    optimizer: OptimizerFactory
    learning_rate: float
    num_iterations: int
    eval_every: int
    validate: EvaluateFn | None = None
    description: str = ""

    def replace(self, **changes: Any) -> Task:
        """A copy of the task with the given fields changed.

        Args:
          **changes: Field names and their new values.

        Returns:
          The new ``Task``.
        """
        return dataclasses.replace(self, **changes)

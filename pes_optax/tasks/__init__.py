"""Built-in unrolled problems for trying and benchmarking the estimators.

Each task bundles an ``UnrolledProblem`` with its starting ``theta``, an
evaluation of the meta-objective and default training settings:

* ``"influence_balancing"``: the endless linear system on which truncated
  methods diverge (UORO and PES papers);
* ``"digits"``: the learning-rate schedule of an MLP on scikit-learn's digits
  (scikit-learn is imported only when the task is built);
* ``"toy_regression"``: the PES paper's 2-d learning-rate-schedule toy.

The core package never imports this subpackage.

Example:
  >>> import jax
  >>> from pes_optax import tasks
  >>> task = tasks.get_task("influence_balancing", num_eval_steps=100)
  >>> task.truncation_length
  1
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from pes_optax.tasks import digits, influence_balancing, toy_regression
from pes_optax.tasks._task import HYPERPARAMETERS, Task

_MODULES = {
    "digits": digits,
    "influence_balancing": influence_balancing,
    "toy_regression": toy_regression,
}
_BUILDERS: dict[str, Callable[..., Task]] = {
    name: module.make_task for name, module in _MODULES.items()
}

TASKS: tuple[str, ...] = tuple(sorted(_BUILDERS))
DEFAULT_TASK = "digits"


def _builder_arguments(name: str) -> tuple[str, ...]:
    return tuple(inspect.signature(_BUILDERS[name]).parameters)


def get_task(name: str, **overrides: Any) -> Task:
    """Builds the registered task ``name``.

    Keyword overrides are either the task's own construction arguments (for
    example ``horizon`` for ``"digits"``) or one of the default settings
    ``estimator``, ``num_particles``, ``sigma``, ``truncation_length``,
    ``optimizer``, ``learning_rate``, ``num_iterations``, ``eval_every``.

    Args:
      name: One of :data:`TASKS`.
      **overrides: Construction arguments and default settings to change.

    Returns:
      The ``Task``.

    Example:
      >>> from pes_optax import tasks
      >>> tasks.get_task("toy_regression", num_particles=8).num_particles
      8
    """
    if name not in _BUILDERS:
        raise ValueError(f"`name` must be one of {TASKS}, got {name!r}.")
    settings = {k: v for k, v in overrides.items() if k in HYPERPARAMETERS}
    arguments = {k: v for k, v in overrides.items() if k not in HYPERPARAMETERS}
    allowed = _builder_arguments(name)
    unknown = sorted(set(arguments) - set(allowed))
    if unknown:
        raise TypeError(
            f"Unknown override(s) {unknown} for task {name!r}. Construction "
            f"arguments: {allowed}; settings: {HYPERPARAMETERS}."
        )
    task = _BUILDERS[name](**arguments)
    return task.replace(**settings) if settings else task


def default_settings(name: str) -> dict[str, Any]:
    """The default settings of the registered task ``name``, without building it.

    Building a task can be slow (``"digits"`` loads scikit-learn's data); this
    reads the settings a built task would carry.

    Args:
      name: One of :data:`TASKS`.

    Returns:
      A new dict with the keys of the default settings (``estimator``,
      ``num_particles``, ``sigma``, ``truncation_length``, ``optimizer``,
      ``learning_rate``, ``num_iterations``, ``eval_every``).

    Example:
      >>> from pes_optax import tasks
      >>> tasks.default_settings("influence_balancing")["num_particles"]
      1000
    """
    if name not in _MODULES:
        raise ValueError(f"`name` must be one of {TASKS}, got {name!r}.")
    return dict(_MODULES[name].DEFAULTS)


__all__ = (
    "DEFAULT_TASK",
    "TASKS",
    "Task",
    "default_settings",
    "get_task",
)

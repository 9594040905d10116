"""The meta-objective of a 2-d ``theta`` on a square grid (the paper's heatmap)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pes_optax import tasks as tasks_lib


def meta_objective_grid(
    task: tasks_lib.Task,
    low: float,
    high: float,
    resolution: int,
    key: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """``task.evaluate`` at every point of a ``resolution`` squared grid.

    The grid runs one row of ``resolution`` points at a time (``lax.map``
    over rows of a ``vmap``), so memory stays at one row of inner problems.

    Args:
      task: A task whose ``initial_theta`` is a float array of shape ``[2]``.
      low: Smallest value of each coordinate.
      high: Largest value of each coordinate.
      resolution: Points per axis (at least 2).
      key: Evaluation key, shared by every point.

    Returns:
      ``(axis, values)``: the float32 ``[resolution]`` coordinates and the
      float32 ``[resolution, resolution]`` meta-objectives with
      ``values[i, j] = task.evaluate([axis[i], axis[j]], key)``.

    Example:
      >>> import jax
      >>> from pes_optax import tasks
      >>> from pes_optax.experiments import meta_objective_grid
      >>> task = tasks.get_task("toy_regression")
      >>> axis, values = meta_objective_grid(task, -5, 5, 3, jax.random.key(0))
      >>> values.shape
      (3, 3)
    """
    if jnp.shape(task.initial_theta) != (2,):
        raise ValueError(
            f"`task` must have a theta of shape (2,), got "
            f"{jnp.shape(task.initial_theta)} for task {task.name!r}."
        )
    if isinstance(resolution, bool) or not isinstance(resolution, int):
        raise TypeError(f"`resolution` must be an int >= 2, got {resolution!r}.")
    if resolution < 2:
        raise ValueError(f"`resolution` must be >= 2, got {resolution}.")
    axis = jnp.linspace(low, high, resolution, dtype=jnp.float32)
    return axis, _evaluate_grid(task.evaluate, axis, key)


def _evaluate_grid(evaluate, axis, key):
    @jax.jit
    def run(axis, key):
        def row(first):
            thetas = jnp.stack([jnp.full_like(axis, first), axis], axis=-1)
            return jax.vmap(evaluate, in_axes=(0, None))(thetas, key)

        return jax.lax.map(row, axis)

    return run(axis, key)

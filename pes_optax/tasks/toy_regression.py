r"""Toy 2-d regression: meta-learning a linear learning-rate schedule.

The toy problem of Vicol, Metz and Sohl-Dickstein, "Unbiased Gradient
Estimation in Unrolled Computation Graphs with Persistent Evolution
Strategies", ICML 2021, https://arxiv.org/abs/2112.13835.

Inner parameters :math:`x \in \mathbb{R}^2` start at ``(1, 1)`` and are trained
by SGD (weight decay ``1e-10``) on

.. math::
  f(x) = \sqrt{x_0^2 + 5} - \sqrt{5} + \sin^2(x_1) e^{-5 x_0^2}
  + \tfrac14 |x_1 - 100|

with the schedule :math:`\eta_t = e^{\theta_0} (T - t) / T + e^{\theta_1}
t / T`. The meta-objective is :math:`\sum_{t=1}^{T} f(x_t)`. Following the
exact local gradient leads into a local minimum near ``2423``; the smoothed
objective that PES follows leads to the basin near ``550``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from pes_optax import UnrolledProblem, unroll
from pes_optax.tasks._task import Task

WEIGHT_DECAY = 1e-10


# The task's default settings (the `Task` fields of the same names).
DEFAULTS: dict[str, Any] = {
    "estimator": "pes",
    "num_particles": 100,
    "sigma": 0.3,
    "truncation_length": 10,
    "optimizer": functools.partial(optax.adam, b1=0.99, b2=0.999),
    "learning_rate": 1e-2,
    "num_iterations": 1000,
    "eval_every": 10,
}


class ToyRegressionState(NamedTuple):
    """Inner state of the toy regression problem."""

    x: jax.Array  # float32 [2]
    step: jax.Array  # int32 [], inner step t


def inner_loss(x: jax.Array) -> jax.Array:
    """The inner objective ``f(x)`` for ``x`` of shape ``[2]``.

    Args:
      x: Inner parameters, float32 ``[2]``.

    Returns:
      A float32 scalar.
    """
    sqrt5 = jnp.sqrt(5.0)
    bowl = jnp.sqrt(x[0] ** 2 + 5.0) - sqrt5
    ripple = jnp.sin(x[1]) ** 2 * jnp.exp(-5.0 * x[0] ** 2)
    return bowl + ripple + 0.25 * jnp.abs(x[1] - 100.0)


def learning_rate(theta: jax.Array, step: jax.Array, horizon: int) -> jax.Array:
    """``exp(theta[0]) (T - t) / T + exp(theta[1]) t / T``.

    Args:
      theta: ``(log initial lr, log final lr)``, float32 ``[2]``.
      step: The inner step ``t``.
      horizon: ``T``.

    Returns:
      The learning rate at step ``t``, a float32 scalar.
    """
    fraction = step.astype(jnp.float32) / horizon
    return jnp.exp(theta[0]) * (1.0 - fraction) + jnp.exp(theta[1]) * fraction


def make_problem(horizon: int = 100) -> UnrolledProblem:
    """The toy regression problem.

    Args:
      horizon: ``T``, inner SGD steps per inner problem.

    Returns:
      An ``UnrolledProblem`` whose step loss is ``f(x_{t+1})``, summed.
    """

    def init(key, theta):
        del key, theta
        return ToyRegressionState(
            x=jnp.ones((2,), jnp.float32), step=jnp.zeros((), jnp.int32)
        )

    def step(theta, state, key, data):
        del key, data
        lr = learning_rate(theta, state.step, horizon)
        grad = jax.grad(inner_loss)(state.x) + WEIGHT_DECAY * state.x
        x = state.x - lr * grad
        return ToyRegressionState(x=x, step=state.step + 1), inner_loss(x)

    return UnrolledProblem(init=init, step=step, horizon=horizon)


def make_task(horizon: int = 100) -> Task:
    """The toy regression task with the PES paper's settings.

    Defaults: PES with ``K=10``, 100 particles, ``sigma=0.3`` and Adam
    (``b1=0.99``) with learning rate ``1e-2``, starting at
    ``theta=(-4, -4)``. The paper runs 20000 iterations; the default here is
    1000, by which PES is already in the good basin.

    Args:
      horizon: ``T``, inner steps per inner problem; a multiple of the
        truncation length 10 keeps truncations aligned with resets.

    Returns:
      The ``Task``.
    """
    if isinstance(horizon, bool) or not isinstance(horizon, int):
        raise TypeError(f"`horizon` must be a positive int, got {horizon!r}.")
    if horizon < 10:
        raise ValueError(
            f"`horizon` must be >= 10 (the default truncation length), got {horizon}."
        )
    problem = make_problem(horizon)

    def evaluate(theta, key):
        return unroll(problem, theta, key)

    return Task(
        name="toy_regression",
        problem=problem,
        initial_theta=jnp.full((2,), -4.0, jnp.float32),
        evaluate=evaluate,
        **DEFAULTS,
        description="2-d toy regression, linear lr schedule (PES paper).",
    )

r"""Influence balancing: a linear system where short truncations see the wrong sign.

The synthetic task of Tallec and Ollivier, "Unbiased Online Recurrent
Optimization" (UORO), ICLR 2018, https://arxiv.org/abs/1702.05043, as used in
Vicol, Metz and Sohl-Dickstein, "Unbiased Gradient Estimation in Unrolled
Computation Graphs with Persistent Evolution Strategies", ICML 2021,
https://arxiv.org/abs/2112.13835.

The state :math:`s \in \mathbb{R}^{23}` starts at ones and follows
:math:`s_{t+1} = A s_t + \theta b` with :math:`A = (I + U_1) / 2` (``U_1`` has
ones on the first superdiagonal) and ``b`` ten ones then thirteen minus ones.
The loss :math:`\frac12 (s[0] - 1)^2` is taken at the end of each truncation.
Over one step ``theta`` raises ``s[0]``, but in the long run its influence is
``-6``, so the fixed point ``s*[0] = -6 theta`` meets the target at
``theta* = -1/6``. Estimators that only look one truncation ahead (truncated
ES or truncated backprop with small ``K``) push ``theta`` the wrong way.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from pes_optax import UnrolledProblem, unroll
from pes_optax.tasks._task import Task

STATE_SIZE = 23
NUM_POSITIVE = 10
OPTIMAL_THETA = -1.0 / 6.0


# The task's default settings (the `Task` fields of the same names).
DEFAULTS: dict[str, Any] = {
    "estimator": "pes",
    "num_particles": 1000,
    "sigma": 0.1,
    "truncation_length": 1,
    "optimizer": optax.sgd,
    "learning_rate": 1e-4,
    "num_iterations": 3000,
    "eval_every": 100,
}


def transition_matrix(state_size: int = STATE_SIZE) -> jax.Array:
    """``A = (I + U_1) / 2``, the ``[state_size, state_size]`` float32 matrix."""
    identity = jnp.eye(state_size, dtype=jnp.float32)
    superdiagonal = jnp.eye(state_size, k=1, dtype=jnp.float32)
    return 0.5 * (identity + superdiagonal)


def influence_vector(
    state_size: int = STATE_SIZE, num_positive: int = NUM_POSITIVE
) -> jax.Array:
    """``b``: ``num_positive`` ones followed by minus ones, float32."""
    signs = jnp.arange(state_size) < num_positive
    return jnp.where(signs, 1.0, -1.0).astype(jnp.float32)


def make_problem() -> UnrolledProblem:
    """The endless influence-balancing problem with a scalar ``theta``.

    Returns:
      An ``UnrolledProblem`` with ``horizon=None`` whose ``step`` returns
      ``0.5 * (s[0] - 1)^2`` after the step, reduced with ``"last"``, so a
      truncation's loss is the loss at its end.
    """
    matrix = transition_matrix()
    influence = influence_vector()

    def init(key, theta):
        del key, theta
        return jnp.ones((STATE_SIZE,), jnp.float32)

    def step(theta, state, key, data):
        del key, data
        state = matrix @ state + theta * influence
        return state, 0.5 * (state[0] - 1.0) ** 2

    return UnrolledProblem(init=init, step=step, horizon=None, loss_reduction="last")


def make_task(num_eval_steps: int = 500) -> Task:
    """The influence-balancing task with the PES paper's settings.

    Defaults: PES with ``K=1``, 1000 particles, ``sigma=0.1``, plain SGD with
    learning rate ``1e-4`` for 3000 iterations, starting at ``theta=0.5``.

    Args:
      num_eval_steps: Length of the evaluation unroll from ``s = 1``; its
        loss is ``0.5 * (s_T[0] - 1)^2``.

    Returns:
      The ``Task``.
    """
    if isinstance(num_eval_steps, bool) or not isinstance(num_eval_steps, int):
        raise TypeError(
            f"`num_eval_steps` must be a positive int, got {num_eval_steps!r}."
        )
    if num_eval_steps < 1:
        raise ValueError(f"`num_eval_steps` must be >= 1, got {num_eval_steps}.")
    problem = make_problem()

    def evaluate(theta, key):
        return unroll(problem, theta, key, num_steps=num_eval_steps)

    return Task(
        name="influence_balancing",
        problem=problem,
        initial_theta=jnp.asarray(0.5, jnp.float32),
        evaluate=evaluate,
        **DEFAULTS,
        description="23-d linear system, endless; optimum theta = -1/6 (UORO/PES).",
    )

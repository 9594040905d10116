"""The unrolled-problem protocol that every estimator in `pes_optax` consumes.

An unrolled computation graph is described by two pure functions and two
settings:

* ``init(key, theta) -> inner_state`` starts a fresh inner problem;
* ``step(theta, inner_state, key, data) -> (inner_state, loss)`` takes one
  inner step and returns that step's scalar loss;
* ``horizon``: the number of inner steps after which an inner problem ends and
  is started afresh, or ``None`` for an endless (purely online) problem;
* ``loss_reduction``: how the losses of the steps of one truncation form that
  truncation's loss: ``"sum"``, ``"mean"`` (sum divided by the truncation
  length) or ``"last"`` (only the loss of the truncation's final step).

``theta`` is any pytree of floating arrays. ``data`` is one time slice of
whatever the caller passes to an estimator's ``update`` (``None`` when the
caller passes nothing, in which case ``step`` draws what it needs from
``key``).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
InitFn = Callable[[jax.Array, PyTree], PyTree]
StepFn = Callable[[PyTree, PyTree, jax.Array, PyTree], tuple[PyTree, jax.Array]]

LOSS_REDUCTIONS = ("sum", "mean", "last")


@dataclasses.dataclass(frozen=True)
class UnrolledProblem:
    """An unrolled computation graph, as consumed by every estimator.

    Attributes:
      init: ``(key, theta) -> inner_state``. Starts a fresh inner problem.
      step: ``(theta, inner_state, key, data) -> (inner_state, loss)``. One
        inner step; ``loss`` is a scalar.
      horizon: Inner steps per inner problem, or ``None`` for an endless one.
      loss_reduction: ``"sum"``, ``"mean"`` or ``"last"``; see the module
        docstring.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import pes_optax
      >>> problem = pes_optax.UnrolledProblem(
      ...     init=lambda key, theta: jnp.zeros(()),
      ...     step=lambda theta, s, key, data: (s + theta, (s + theta) ** 2),
      ...     horizon=10,
      ... )
      >>> float(pes_optax.unroll(problem, jnp.asarray(1.0), jax.random.key(0)))
      385.0
    """

    init: InitFn
    step: StepFn
    horizon: int | None = None
    loss_reduction: str = "sum"

    def __post_init__(self):
        if not callable(self.init):
            raise TypeError(
                f"`init` must be a callable (key, theta) -> inner_state, got "
                f"{self.init!r}."
            )
        if not callable(self.step):
            raise TypeError(
                "`step` must be a callable (theta, inner_state, key, data) -> "
                f"(inner_state, loss), got {self.step!r}."
            )
        if not getattr(self.step, "_pes_optax_checked", False):
            object.__setattr__(self, "step", _checked_step(self.step))
        if self.horizon is not None:
            if isinstance(self.horizon, bool) or not isinstance(
                self.horizon, numbers.Integral
            ):
                raise TypeError(
                    f"`horizon` must be a positive int or None, got {self.horizon!r}."
                )
            object.__setattr__(self, "horizon", int(self.horizon))
            if self.horizon < 1:
                raise ValueError(
                    f"`horizon` must be >= 1 (or None for an endless inner "
                    f"problem), got {self.horizon}."
                )
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(
                f"`loss_reduction` must be one of {LOSS_REDUCTIONS}, got "
                f"{self.loss_reduction!r}."
            )


def _checked_step(step: StepFn) -> StepFn:
    """``step`` with its output checked when it is traced."""

    @functools.wraps(step)
    def checked(theta, inner_state, key, data):
        out = step(theta, inner_state, key, data)
        if not isinstance(out, tuple | list) or len(out) != 2:
            if isinstance(out, tuple | list):
                got = f"a {type(out).__name__} of length {len(out)}"
            else:
                got = f"a single value of shape {jnp.shape(out)}"
            raise TypeError(
                f"`step` must return a pair (inner_state, loss); got {got}. "
                "Return the new inner state and the step's scalar loss."
            )
        new_state, loss = out
        if jnp.ndim(loss) != 0:
            raise ValueError(
                "`step` must return a scalar loss; got a loss of shape "
                f"{jnp.shape(loss)}. Reduce it (e.g. with .mean()) inside step."
            )
        return new_state, loss

    checked._pes_optax_checked = True
    return checked


def strong(tree: PyTree) -> PyTree:
    """``tree`` without weak types, so that state types never change."""
    return jax.tree.map(lambda x: jnp.asarray(x).astype(jnp.result_type(x)), tree)


def step_weights(loss_reduction: str, truncation_length: int) -> jax.Array:
    """Weights ``w_k`` with which step ``k`` of a truncation enters its loss."""
    if loss_reduction == "sum":
        return jnp.ones((truncation_length,), jnp.float32)
    if loss_reduction == "mean":
        return jnp.full((truncation_length,), 1.0 / truncation_length, jnp.float32)
    return jnp.zeros((truncation_length,), jnp.float32).at[-1].set(1.0)


def step_keys(key: jax.Array, num_steps: int) -> tuple[jax.Array, jax.Array]:
    """The key walk every estimator shares: ``(init_keys, inner_keys)``.

    One key per step, split into the key of a start (used if an inner problem
    starts at that step) and the key of the step itself; both ``[num_steps]``.
    All of them are split at once, before any scan over the steps.
    """
    per_step = jax.vmap(jax.random.split)(jax.random.split(key, num_steps))
    return per_step[:, 0], per_step[:, 1]


def unroll(
    problem: UnrolledProblem,
    theta: PyTree,
    key: jax.Array,
    num_steps: int | None = None,
    data: PyTree | None = None,
) -> jax.Array:
    """Meta-objective of one fresh inner problem run with a fixed ``theta``.

    Starts an inner problem with ``problem.init`` and runs ``num_steps`` steps
    (the horizon by default). The losses are grouped as the estimators group
    them: with ``"sum"`` the result is the sum of every step's loss, with
    ``"mean"`` the mean, and with ``"last"`` the loss of the final step.

    Args:
      problem: The unrolled problem.
      theta: The parameters to evaluate.
      key: A typed PRNG key, split into per-step keys exactly as the
        estimators split theirs, so that an estimator's unperturbed trajectory
        from the same key is this one.
      num_steps: Steps to run; required when ``problem.horizon`` is ``None``.
      data: Optional data with a leading axis of ``num_steps``.

    Returns:
      A float32 scalar, differentiable in ``theta``.
    """
    from pes_optax._src import validation as v  # validation imports this module

    problem = v.check_problem(problem)
    num_steps = problem.horizon if num_steps is None else num_steps
    if num_steps is None:
        raise ValueError(
            "`num_steps` is required for a problem with `horizon=None`; pass "
            "the number of inner steps to run."
        )
    num_steps = v.check_positive_int("num_steps", num_steps)
    key = v.check_key(key)
    if data is not None:
        v.check_data(data, num_steps, "num_steps")
    init_keys, inner_keys = step_keys(key, num_steps)
    inner_state = problem.init(init_keys[0], theta)

    def body(carry, xs):
        step_key, step_data = xs
        new_state, loss = problem.step(theta, carry, step_key, step_data)
        return new_state, jnp.asarray(loss, jnp.float32)

    _, losses = jax.lax.scan(body, inner_state, (inner_keys, data))
    weights = step_weights(problem.loss_reduction, num_steps)
    return jnp.sum(weights * losses)

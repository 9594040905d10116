"""Backpropagation through time, full and truncated, as optax transformations.

* Backpropagation through time (BPTT): Werbos, "Backpropagation through time:
  what it does and how to do it", Proc. IEEE 1990,
  https://doi.org/10.1109/5.58337.
* Truncated BPTT: Williams and Peng, "An efficient gradient-based algorithm
  for on-line training of recurrent network trajectories", Neural Computation
  1990, https://doi.org/10.1162/neco.1990.2.4.490.

These are the exact-gradient references of the PES paper. Their inner
trajectory follows the same key walk as the unperturbed trajectory of
:func:`pes_optax.truncated_es`: the state key is split into
``(rng_key, noise_key, steps_key)`` on every update, ``steps_key`` into one key
per inner step, and each of those into ``(init_key, inner_key)``. An inner
problem starts (``init`` then ``step``) whenever the step counter is 0 and
ends after ``horizon`` steps, possibly in the middle of a truncation.

The module also holds the pieces that :mod:`pes_optax._src.online` shares:
the diagnostics, the non-finite policy and the update-argument checks.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from pes_optax._src import particles
from pes_optax._src import validation as v
from pes_optax._src.estimate import add_estimate
from pes_optax._src.problem import UnrolledProblem, step_keys, step_weights, strong

PyTree = Any


class GradientDiagnostics(NamedTuple):
    """What one update of a backprop or online estimator saw."""

    mean_loss: jax.Array  # float32 []: this update's truncation loss (raw, so
    # non-finite when num_nonfinite is 1)
    num_nonfinite: jax.Array  # int32 []: 1 if this update's estimate was dropped
    total_nonfinite: jax.Array  # int32 []: estimates dropped since init
    num_inner_steps: jax.Array  # int32 []: inner steps taken since init


class BPTTState(NamedTuple):
    """State of :func:`bptt`: every update starts a fresh inner problem."""

    rng_key: jax.Array  # typed PRNG key, split on every update
    diagnostics: GradientDiagnostics


class TBPTTState(NamedTuple):
    """State of :func:`tbptt`."""

    inner_state: PyTree  # the inner problem's state after the last update
    step: jax.Array  # int32 []: inner step within the current inner problem
    rng_key: jax.Array  # typed PRNG key, split on every update
    diagnostics: GradientDiagnostics


# Shared helpers (also used by the online estimators).


def empty_diagnostics() -> GradientDiagnostics:
    zero_i = jnp.zeros((), jnp.int32)
    return GradientDiagnostics(jnp.zeros((), jnp.float32), zero_i, zero_i, zero_i)


def next_diagnostics(
    previous: GradientDiagnostics, loss: jax.Array, finite: jax.Array, steps: int
) -> GradientDiagnostics:
    dropped = jnp.logical_not(finite).astype(jnp.int32)
    return GradientDiagnostics(
        mean_loss=jnp.asarray(loss, jnp.float32),
        num_nonfinite=dropped,
        total_nonfinite=previous.total_nonfinite + dropped,
        num_inner_steps=previous.num_inner_steps + steps,
    )


def horizon_or_max(problem: UnrolledProblem) -> int:
    return particles.NO_END if problem.horizon is None else problem.horizon


def next_step(step: jax.Array, horizon: int) -> jax.Array:
    """The step counter after one inner step; 0 once the inner problem ends."""
    step = step + 1
    return jnp.where(step >= horizon, 0, step).astype(jnp.int32)


def cast_like(tree: PyTree, reference: PyTree) -> PyTree:
    """``tree`` in the (non-weak) dtypes of ``reference``."""
    return jax.tree.map(lambda x, r: jnp.asarray(x).astype(r.dtype), tree, reference)


def scalar_loss(loss: Any) -> jax.Array:
    loss = jnp.asarray(loss, jnp.float32)
    if loss.shape != ():
        raise ValueError(
            f"`step` must return a scalar loss; got a loss of shape {loss.shape}. "
            "Reduce it (e.g. jnp.mean) inside the problem's step."
        )
    return loss


def tree_finite(tree: PyTree) -> jax.Array:
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def drop_nonfinite(loss: jax.Array, estimate: PyTree) -> tuple[PyTree, jax.Array]:
    """Zeros the estimate unless the loss and every estimate entry are finite."""
    finite = jnp.isfinite(loss) & tree_finite(estimate)
    kept = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), estimate)
    return kept, finite


def check_update_args(
    updates: PyTree, state: Any, params: PyTree, data: PyTree, num_steps: int, kind
):
    if not isinstance(state, kind):
        raise TypeError(
            f"`state` must be a {kind.__name__} from this transformation's "
            f"init, got {type(state).__name__}."
        )
    v.check_theta(params, "params")
    v.check_same_structure("updates", updates, params, "the structure of `params`")
    if data is not None:
        v.check_data(data, num_steps)


def run_steps(
    problem: UnrolledProblem,
    theta: PyTree,
    inner_state: PyTree | None,
    step: jax.Array,
    keys: tuple[jax.Array, jax.Array],
    data: PyTree | None,
    checkpoint_every: int | None = None,
) -> tuple[jax.Array, tuple[PyTree, jax.Array]]:
    """Weighted loss of K inner steps, differentiable in ``theta``.

    ``keys`` are the ``(init_keys, inner_keys)`` of :func:`step_keys`.

    ``inner_state=None`` starts a fresh inner problem that the caller knows
    will not end before the last step; otherwise a step counter of 0 starts
    one before stepping. Returns ``(loss, (inner_state, step))``.
    """
    num_steps = keys[1].shape[0]
    weights = step_weights(problem.loss_reduction, num_steps)
    horizon = horizon_or_max(problem)
    fresh = inner_state is None
    if fresh:
        inner_state = strong(problem.init(keys[0][0], theta))

    def body(carry, xs):
        inner_state, step = carry
        init_key, inner_key, weight, step_data = xs
        if not fresh:
            inner_state = jax.lax.cond(
                step == 0,
                lambda s: cast_like(problem.init(init_key, theta), s),
                lambda s: s,
                inner_state,
            )
        new_state, loss = problem.step(theta, inner_state, inner_key, step_data)
        carry = (cast_like(new_state, inner_state), next_step(step, horizon))
        return carry, weight * scalar_loss(loss)

    xs = (*keys, weights, data)
    carry = (inner_state, step)
    if checkpoint_every is None:
        carry, losses = jax.lax.scan(body, carry, xs)
    else:
        # Outer scan over chunks; each chunk is recomputed on the way back.
        def chunk(carry, chunk_xs):
            return jax.lax.scan(body, carry, chunk_xs)

        shape = (num_steps // checkpoint_every, checkpoint_every)
        chunks = jax.tree.map(lambda x: x.reshape((*shape, *x.shape[1:])), xs)
        carry, losses = jax.lax.scan(jax.checkpoint(chunk), carry, chunks)
    return jnp.sum(losses), carry


def _backprop_update(problem, params, inner_state, step, keys, data, every):
    """``(loss, finite, estimate, (inner_state, step))`` of one truncation."""

    def objective(theta):
        return run_steps(problem, theta, inner_state, step, keys, data, every)

    (loss, carry), grad = jax.value_and_grad(objective, has_aux=True)(params)
    estimate, finite = drop_nonfinite(loss, grad)
    return loss, finite, estimate, carry


# Public factories.


def bptt(
    problem: UnrolledProblem,
    *,
    key: jax.Array | int,
    checkpoint_every: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Backpropagation through a whole inner problem, as an optax transformation.

    Each ``update`` starts a fresh inner problem, runs all ``horizon`` steps
    with the given ``theta`` and adds the exact gradient of its meta-objective

    .. math::
      \hat g = \nabla_\theta \sum_{t=1}^{T} w_t\, \ell_t(s_t; \theta), \qquad
      s_t = f(s_{t-1}, x_t; \theta),\ s_0 = \mathrm{init}(\theta),

    with the weights :math:`w_t` of the problem's ``loss_reduction``: the
    meta-objective of :func:`pes_optax.unroll`, differentiated exactly. It is
    unbiased, at the cost of one update per inner problem and memory that
    grows with the horizon. For a problem that does not draw from its keys it
    equals ``jax.grad(pes_optax.unroll)``; with random keys the inner
    problem follows this module's key walk, which splits keys differently
    from ``unroll``.

    Memory: the backward pass keeps every step's residuals, :math:`O(TS)` for
    ``T`` steps of an ``S``-sized state. With ``checkpoint_every=C`` only the
    state at each chunk boundary is kept and a chunk is recomputed when its
    gradient is needed: :math:`O((T/C)\,S + C\,S)` memory (smallest near
    :math:`C=\sqrt T`) for about one extra forward pass.

    Non-finite values: if the loss or any gradient entry is not finite, the
    estimate added is zero and ``state.diagnostics.num_nonfinite`` is 1.

    The steps use the key walk of :func:`tbptt`, so ``tbptt`` with
    ``truncation_length=horizon`` gives the same estimate for the same key.

    Args:
      problem: The unrolled problem; its ``horizon`` must be finite.
      key: Typed PRNG key (or int seed) for the inner problems' randomness.
      checkpoint_every: ``C``, inner steps per rematerialised chunk; must
        divide the horizon. ``None`` keeps every step's residuals.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` takes
      ``params`` (theta) and optionally ``data`` with leaves of leading axis
      ``horizon``.

    Example:
      >>> import jax, jax.numpy as jnp, pes_optax
      >>> problem = pes_optax.UnrolledProblem(
      ...     init=lambda key, theta: jnp.zeros(()),
      ...     step=lambda theta, s, key, data: (s + theta, (s + theta) ** 2),
      ...     horizon=10)
      >>> transform = pes_optax.bptt(problem, key=jax.random.key(0))
      >>> theta = jnp.asarray(1.0)
      >>> grads, state = transform.update(
      ...     jnp.zeros(()), transform.init(theta), theta)
      >>> float(grads)
      770.0

    References:
      Werbos, `Backpropagation through time: what it does and how to do it
      <https://doi.org/10.1109/5.58337>`_, 1990.
    """
    problem = v.check_problem(problem)
    if problem.horizon is None:
        raise ValueError(
            "bptt needs a finite `horizon` on the problem (one update runs a "
            "whole inner problem); got horizon=None. Use tbptt, rtrl or uoro "
            "for an endless problem."
        )
    horizon = problem.horizon
    if checkpoint_every is not None:
        checkpoint_every = v.check_positive_int("checkpoint_every", checkpoint_every)
        if horizon % checkpoint_every:
            divisors = [c for c in range(1, horizon + 1) if horizon % c == 0]
            raise ValueError(
                f"`checkpoint_every` ({checkpoint_every}) must divide the "
                f"problem's `horizon` ({horizon}). Use one of {divisors[:12]}."
            )
    key = v.check_key(key)

    def init_fn(params):
        v.check_theta(params, "params")
        return BPTTState(jax.random.split(key)[1], empty_diagnostics())

    def update_fn(updates, state, params=None, *, data=None, **extra_args):
        del extra_args
        check_update_args(updates, state, params, data, horizon, BPTTState)
        rng_key, _, steps_key = jax.random.split(state.rng_key, 3)
        keys = step_keys(steps_key, horizon)
        start = jnp.zeros((), jnp.int32)
        loss, finite, estimate, _ = _backprop_update(
            problem, params, None, start, keys, data, checkpoint_every
        )
        diagnostics = next_diagnostics(state.diagnostics, loss, finite, horizon)
        return add_estimate(updates, estimate), BPTTState(rng_key, diagnostics)

    return v.tag(
        optax.GradientTransformationExtraArgs(init_fn, update_fn),
        estimator="bptt",
        checkpoint_every=checkpoint_every,
    )


def tbptt(
    problem: UnrolledProblem,
    *,
    truncation_length: int,
    key: jax.Array | int,
) -> optax.GradientTransformationExtraArgs:
    r"""Truncated backpropagation through time, as an optax transformation.

    Keeps one inner trajectory. Each ``update`` runs its next ``K`` steps with
    the given ``theta`` and adds the gradient of the truncation's loss with
    the incoming state :math:`s` held constant,

    .. math::
      \hat g_\tau = \frac{\partial}{\partial\theta}
      \sum_{k=1}^{K} w_k\, \ell_k\big(\theta; \mathrm{sg}(s)\big),

    then carries the new state forward. When an inner problem ends inside the
    truncation, the new inner problem's start, including how ``init`` depends
    on ``theta``, is part of the graph. With ``K`` equal to the horizon every
    truncation is a whole inner problem and the estimate equals :func:`bptt`.

    Warning:
      Biased whenever an inner problem spans more than one truncation: it
      ignores how ``theta`` shaped the incoming state (truncation, or
      short-horizon, bias), and the sign of the bias can make training
      diverge when short- and long-term influences of ``theta`` disagree.

    Memory is :math:`O(KS)` for a state of size ``S``. Non-finite values: if
    the loss or any gradient entry is not finite, the estimate added is zero,
    the next update starts a new inner problem and
    ``state.diagnostics.num_nonfinite`` is 1.

    Args:
      problem: The unrolled problem.
      truncation_length: ``K``, inner steps per update; at most the horizon.
      key: Typed PRNG key (or int seed); the same key walks the same
        trajectory as :func:`pes_optax.truncated_es`'s unperturbed one.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` takes
      ``params`` and optionally ``data`` with leaves of leading axis
      ``truncation_length``.

    Example:
      >>> import jax, jax.numpy as jnp, pes_optax
      >>> problem = pes_optax.UnrolledProblem(
      ...     init=lambda key, theta: jnp.zeros(()),
      ...     step=lambda theta, s, key, data: (s + theta, (s + theta) ** 2),
      ...     horizon=10)
      >>> transform = pes_optax.tbptt(problem, truncation_length=2, key=0)
      >>> theta = jnp.asarray(1.0)
      >>> grads, state = transform.update(
      ...     jnp.zeros(()), transform.init(theta), theta)
      >>> float(grads), int(state.step)
      (10.0, 2)

    References:
      Williams and Peng, `An efficient gradient-based algorithm for on-line
      training of recurrent network trajectories
      <https://doi.org/10.1162/neco.1990.2.4.490>`_, 1990.
    """
    problem = v.check_problem(problem)
    truncation_length = v.check_truncation_length(truncation_length, problem.horizon)
    key = v.check_key(key)

    def init_fn(params):
        v.check_theta(params, "params")
        init_key, rng_key = jax.random.split(key)
        return TBPTTState(
            inner_state=strong(problem.init(init_key, params)),
            step=jnp.zeros((), jnp.int32),
            rng_key=rng_key,
            diagnostics=empty_diagnostics(),
        )

    def update_fn(updates, state, params=None, *, data=None, **extra_args):
        del extra_args
        check_update_args(updates, state, params, data, truncation_length, TBPTTState)
        rng_key, _, steps_key = jax.random.split(state.rng_key, 3)
        keys = step_keys(steps_key, truncation_length)

        # Backprop through this truncation only.
        incoming = jax.lax.stop_gradient(state.inner_state)
        loss, finite, estimate, (inner_state, step) = _backprop_update(
            problem, params, incoming, state.step, keys, data, None
        )

        # A non-finite truncation starts a new inner problem.
        new_state = TBPTTState(
            inner_state=inner_state,
            step=jnp.where(finite, step, 0),
            rng_key=rng_key,
            diagnostics=next_diagnostics(
                state.diagnostics, loss, finite, truncation_length
            ),
        )
        return add_estimate(updates, estimate), new_state

    return v.tag(
        optax.GradientTransformationExtraArgs(init_fn, update_fn),
        estimator="tbptt",
        truncation_length=truncation_length,
    )

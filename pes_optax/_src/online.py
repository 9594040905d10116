"""Online forward-mode gradient estimators: RTRL, and helpers shared with UORO.

* Real-time recurrent learning (RTRL): Williams and Zipser, "A learning
  algorithm for continually running fully recurrent neural networks", Neural
  Computation 1989, https://doi.org/10.1162/neco.1989.1.2.270.
* Unbiased online recurrent optimization (UORO): Tallec and Ollivier, 2017,
  https://arxiv.org/abs/1702.05043.

Both carry forward an influence of ``theta`` on the inner state,
:math:`J_t = ds_t / d\\theta`, exactly (RTRL) or as an unbiased rank-one
estimate (UORO), and add the total derivative of each step's loss. ``theta``
is flattened with ``jax.flatten_util.ravel_pytree`` into ``P`` numbers; only
the floating leaves of the inner state carry an influence. The key walk and
the reset rule are those of :mod:`pes_optax._src.backprop`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from pes_optax._src import backprop as bp
from pes_optax._src import validation as v
from pes_optax._src.estimate import add_estimate
from pes_optax._src.problem import UnrolledProblem, step_keys, step_weights

PyTree = Any


class RTRLState(NamedTuple):
    """State of :func:`rtrl`. ``P`` is the number of entries of theta."""

    inner_state: PyTree  # the inner problem's state after the last update
    jacobian: tuple  # per floating leaf of inner_state: [P, *leaf.shape]
    step: jax.Array  # int32 []: inner step within the current inner problem
    rng_key: jax.Array  # typed PRNG key, split on every update
    diagnostics: bp.GradientDiagnostics


def _split_state(inner_state: PyTree):
    leaves, treedef = jax.tree.flatten(inner_state)
    is_float = tuple(jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in leaves)
    floats = tuple(x for x, f in zip(leaves, is_float, strict=True) if f)
    others = tuple(x for x, f in zip(leaves, is_float, strict=True) if not f)
    return floats, others, (treedef, is_float)


def _merge_state(floats, others, spec) -> PyTree:
    treedef, is_float = spec
    floats_it, others_it = iter(floats), iter(others)
    leaves = [next(floats_it) if f else next(others_it) for f in is_float]
    return jax.tree.unflatten(treedef, leaves)


class _FlatProblem(NamedTuple):
    init: Any  # (theta_flat, key) -> (floats, others)
    step: Any  # (theta_flat, floats, others, key, data) -> ((floats, loss), others)


def _flat_problem(problem, unravel, reference_state) -> _FlatProblem:
    """The problem with flat theta; outputs cast to the stored state's dtypes."""
    _, _, spec = _split_state(reference_state)

    def init(theta_flat, key):
        inner_state = problem.init(key, unravel(theta_flat))
        floats, others, _ = _split_state(bp.cast_like(inner_state, reference_state))
        return floats, others

    def step(theta_flat, floats, others, key, data):
        inner_state = _merge_state(floats, others, spec)
        new, loss = problem.step(unravel(theta_flat), inner_state, key, data)
        new_floats, new_others, _ = _split_state(bp.cast_like(new, inner_state))
        return (new_floats, bp.scalar_loss(loss)), new_others

    return _FlatProblem(init, step)


# Shared factory and update plumbing.


def _check_online_args(updates, state, params, data, truncation_length, kind):
    bp.check_update_args(updates, state, params, data, truncation_length, kind)
    num_params = ravel_pytree(params)[0].shape[0]
    carried = state.jacobian if kind is RTRLState else state.theta_tangent
    try:
        chex.assert_tree_shape_prefix(carried, (num_params,))
    except AssertionError as error:
        raise ValueError(
            f"`params` has {num_params} entries but the state was built for a "
            f"different theta ({error}). Pass the theta given to init, or "
            "re-initialise the state."
        ) from None


def _initial_fields(problem, key, params):
    """``(inner_state, floats, P, rng_key)`` for an estimator's init."""
    v.check_theta(params, "params")
    init_key, rng_key = jax.random.split(key)
    inner_state = bp.strong(problem.init(init_key, params))
    floats, _, _ = _split_state(inner_state)
    return inner_state, floats, ravel_pytree(params)[0].shape[0], rng_key


def _finish(state, unravel, loss, grad_flat, carry, truncation_length):
    """``(estimate, step, diagnostics)`` after the non-finite policy."""
    estimate, finite = bp.drop_nonfinite(loss, unravel(grad_flat))
    step = jnp.where(finite, carry.step, 0)
    diagnostics = bp.next_diagnostics(
        state.diagnostics, loss, finite, truncation_length
    )
    return estimate, step, diagnostics


def _zero_grad(theta_flat: jax.Array) -> jax.Array:
    return jnp.zeros(theta_flat.shape, jnp.float32)


def _check_factory_args(problem, truncation_length, key):
    problem = v.check_problem(problem)
    truncation_length = v.check_truncation_length(truncation_length, problem.horizon)
    return problem, truncation_length, v.check_key(key)


# RTRL.


class _RTRLCarry(NamedTuple):
    floats: tuple
    others: tuple
    jacobian: tuple
    step: jax.Array
    grad: jax.Array  # float32 [P]


def _rtrl_truncation(problem, theta_flat, unravel, state, keys, data):
    """Runs the truncation's steps, carrying ``J`` with forward mode."""
    flat = _flat_problem(problem, unravel, state.inner_state)
    basis = jnp.eye(theta_flat.shape[0], dtype=theta_flat.dtype)
    horizon = bp.horizon_or_max(problem)
    weights = step_weights(problem.loss_reduction, keys[1].shape[0])

    def restart(init_key):
        # J_0 = d init / d theta, one column per basis direction of theta.
        floats, linear, others = jax.linearize(
            lambda th: flat.init(th, init_key), theta_flat, has_aux=True
        )
        return floats, others, jax.vmap(linear)(basis)

    def body(carry: _RTRLCarry, xs):
        init_key, inner_key, weight, step_data = xs
        floats, others, jacobian = jax.lax.cond(
            carry.step == 0,
            lambda c: bp.cast_like(restart(init_key), c),
            lambda c: c,
            (carry.floats, carry.others, carry.jacobian),
        )

        # J_t = F_s J_{t-1} + F_theta and dl/dtheta = l_s J_{t-1} + l_theta.
        (new_floats, loss), linear, new_others = jax.linearize(
            lambda th, fl: flat.step(th, fl, others, inner_key, step_data),
            theta_flat,
            floats,
            has_aux=True,
        )
        jacobian, dloss = jax.vmap(linear)(basis, jacobian)
        grad = carry.grad + weight * dloss
        step = bp.next_step(carry.step, horizon)
        new_carry = _RTRLCarry(new_floats, new_others, jacobian, step, grad)
        return new_carry, weight * loss

    floats, others, _ = _split_state(state.inner_state)
    carry = _RTRLCarry(
        floats, others, state.jacobian, state.step, _zero_grad(theta_flat)
    )
    carry, losses = jax.lax.scan(body, carry, (*keys, weights, data))
    return jnp.sum(losses), carry


def rtrl(
    problem: UnrolledProblem,
    *,
    truncation_length: int = 1,
    key: jax.Array | int,
) -> optax.GradientTransformationExtraArgs:
    r"""Real-time recurrent learning (RTRL), as an optax transformation.

    Carries the full influence matrix :math:`J_t = ds_t/d\theta` forward with
    forward-mode differentiation (one JVP per entry of theta) and adds, for
    each of the ``K`` steps of an update, the total derivative of that step's
    weighted loss:

    .. math::
      \hat g_\tau = \sum_{k=1}^{K} w_k \Big(
      \frac{\partial \ell_k}{\partial s_{k-1}} J_{k-1}
      + \frac{\partial \ell_k}{\partial \theta}\Big), \qquad
      J_k = \frac{\partial f}{\partial s_{k-1}} J_{k-1}
      + \frac{\partial f}{\partial \theta},

    with :math:`J = d\,\mathrm{init}/d\theta` when an inner problem starts
    (also in the middle of a truncation). With ``theta`` fixed over an inner
    problem, the estimates of its truncations sum to the exact gradient that
    :func:`bptt` gives (for ``loss_reduction="sum"``); it is unbiased.
    Updating ``theta`` online makes ``J`` slightly stale, as for every online
    method.

    Memory is :math:`O(SP)` for a state of ``S`` floating entries and ``P``
    entries of theta; compute is ``P`` JVPs per inner step, so keep theta
    small. Non-finite values: if the truncation loss or any estimate entry is
    not finite, the estimate added is zero, the next update starts a new
    inner problem (and a new ``J``) and ``state.diagnostics.num_nonfinite``
    is 1.

    Args:
      problem: The unrolled problem.
      truncation_length: ``K``, inner steps per update; at most the horizon.
      key: Typed PRNG key (or int seed); same key walk as :func:`tbptt`.

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
      >>> transform = pes_optax.rtrl(problem, truncation_length=2, key=0)
      >>> theta = jnp.asarray(1.0)
      >>> state = transform.init(theta)
      >>> _, state = transform.update(jnp.zeros(()), state, theta)
      >>> grads, state = transform.update(jnp.zeros(()), state, theta)
      >>> float(grads)  # d/dtheta of (3 theta)^2 + (4 theta)^2
      50.0

    References:
      Williams and Zipser, `A learning algorithm for continually running
      fully recurrent neural networks
      <https://doi.org/10.1162/neco.1989.1.2.270>`_, 1989.
    """
    problem, truncation_length, key = _check_factory_args(
        problem, truncation_length, key
    )

    def init_fn(params):
        inner_state, floats, num_params, rng_key = _initial_fields(problem, key, params)
        return RTRLState(
            inner_state=inner_state,
            jacobian=tuple(jnp.zeros((num_params, *x.shape), x.dtype) for x in floats),
            step=jnp.zeros((), jnp.int32),
            rng_key=rng_key,
            diagnostics=bp.empty_diagnostics(),
        )

    def update_fn(updates, state, params=None, *, data=None, **extra_args):
        del extra_args
        _check_online_args(updates, state, params, data, truncation_length, RTRLState)
        rng_key, _, steps_key = jax.random.split(state.rng_key, 3)
        keys = step_keys(steps_key, truncation_length)
        theta_flat, unravel = ravel_pytree(params)

        loss, carry = _rtrl_truncation(problem, theta_flat, unravel, state, keys, data)
        estimate, step, diagnostics = _finish(
            state, unravel, loss, carry.grad, carry, truncation_length
        )
        new_state = RTRLState(
            inner_state=_merge_state(
                carry.floats, carry.others, _split_state(state.inner_state)[2]
            ),
            jacobian=carry.jacobian,
            step=step,
            rng_key=rng_key,
            diagnostics=diagnostics,
        )
        return add_estimate(updates, estimate), new_state

    return v.tag(
        optax.GradientTransformationExtraArgs(init_fn, update_fn),
        estimator="rtrl",
        truncation_length=truncation_length,
    )


# UORO.

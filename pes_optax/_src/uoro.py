"""Unbiased online recurrent optimization (UORO) as an optax transform.

Tallec and Ollivier, "Unbiased Online Recurrent Optimization", 2017,
https://arxiv.org/abs/1702.05043. The influence of ``theta`` on the inner
state is carried as a random rank-one estimate, with exact Jacobian-vector
products where the reference code uses finite differences.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from pes_optax._src import backprop as bp
from pes_optax._src import validation as v
from pes_optax._src.estimate import add_estimate
from pes_optax._src.online import (
    _check_factory_args,
    _check_online_args,
    _finish,
    _flat_problem,
    _initial_fields,
    _merge_state,
    _split_state,
    _zero_grad,
)
from pes_optax._src.problem import UnrolledProblem, step_keys, step_weights

PyTree = Any
UORO_DELTA = 1e-7  # keeps UORO's rescaling finite when a norm is zero


class UOROState(NamedTuple):
    """State of :func:`uoro`; ``state_tangent`` times ``theta_tangent`` is J."""

    inner_state: PyTree  # the inner problem's state after the last update
    state_tangent: tuple  # s_tilde, per floating leaf of inner_state
    theta_tangent: jax.Array  # theta_tilde, [P], flattened like theta
    step: jax.Array  # int32 []: inner step within the current inner problem
    rng_key: jax.Array  # typed PRNG key, split on every update
    diagnostics: bp.GradientDiagnostics


# The problem seen as functions of (flat theta, floating state leaves).


class _UOROCarry(NamedTuple):
    floats: tuple
    others: tuple
    state_tangent: tuple
    theta_tangent: jax.Array  # [P]
    step: jax.Array
    grad: jax.Array  # float32 [P]


def _global_norm(tree) -> jax.Array:
    squares = [
        jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)
    ]
    return jnp.sqrt(sum(squares, jnp.zeros((), jnp.float32)))


def _random_signs(key, like: tuple) -> tuple:
    if not like:
        return ()
    keys = jax.random.split(key, len(like))
    return tuple(
        jax.random.rademacher(k, x.shape, x.dtype)
        for k, x in zip(keys, like, strict=True)
    )


def _rank_one(forward, theta_tangent, signs, signs_f_theta):
    """Tallec and Ollivier's variance-balanced rank-one update of (s~, th~)."""
    rho0 = jnp.sqrt(
        (_global_norm(theta_tangent) + UORO_DELTA)
        / (_global_norm(forward) + UORO_DELTA)
    )
    rho1 = jnp.sqrt(
        (_global_norm(signs_f_theta) + UORO_DELTA) / (_global_norm(signs) + UORO_DELTA)
    )
    state_tangent = tuple(
        (rho0 * a + rho1 * n).astype(a.dtype)
        for a, n in zip(forward, signs, strict=True)
    )
    theta_tangent = theta_tangent / rho0 + signs_f_theta / rho1
    return state_tangent, theta_tangent.astype(signs_f_theta.dtype)


def _uoro_truncation(problem, theta_flat, unravel, state, keys, sign_keys, data):
    """Runs the truncation's steps, carrying the rank-one estimate of ``J``."""
    flat = _flat_problem(problem, unravel, state.inner_state)
    horizon = bp.horizon_or_max(problem)
    weights = step_weights(problem.loss_reduction, keys[1].shape[0])
    one = jnp.ones((), jnp.float32)

    def restart(init_key, sign_key):
        # A rank-one unbiased estimate of J_0 = d init / d theta.
        floats, pullback, others = jax.vjp(
            lambda th: flat.init(th, init_key), theta_flat, has_aux=True
        )
        signs = _random_signs(sign_key, floats)
        (signs_j,) = pullback(signs)
        zeros = tuple(jnp.zeros_like(x) for x in floats)
        tangents = _rank_one(zeros, jnp.zeros_like(theta_flat), signs, signs_j)
        return floats, others, *tangents

    def body(carry: _UOROCarry, xs):
        init_key, inner_key, reset_sign_key, sign_key, weight, step_data = xs
        fields = (carry.floats, carry.others, carry.state_tangent, carry.theta_tangent)
        floats, others, state_tangent, theta_tangent = jax.lax.cond(
            carry.step == 0,
            lambda c: bp.cast_like(restart(init_key, reset_sign_key), c),
            lambda c: c,
            fields,
        )

        # Forward: F_s s~ and l_s s~ by one exact JVP.
        def f(th, fl):
            return flat.step(th, fl, others, inner_key, step_data)

        zero_theta = jnp.zeros_like(theta_flat)
        (new_floats, loss), (forward, loss_forward), new_others = jax.jvp(
            f, (theta_flat, floats), (zero_theta, state_tangent), has_aux=True
        )

        # Reverse: nu^T F_theta and l_theta by two VJPs.
        _, pullback, _ = jax.vjp(lambda th: f(th, floats), theta_flat, has_aux=True)
        signs = _random_signs(sign_key, new_floats)
        (signs_f_theta,) = pullback((signs, jnp.zeros((), jnp.float32)))
        zeros = tuple(jnp.zeros_like(x) for x in new_floats)
        (loss_theta,) = pullback((zeros, one))

        # The step's gradient uses the old tangents, then they move on.
        grad = carry.grad + weight * (loss_forward * theta_tangent + loss_theta)
        state_tangent, theta_tangent = _rank_one(
            forward, theta_tangent, signs, signs_f_theta
        )
        step = bp.next_step(carry.step, horizon)
        new_carry = _UOROCarry(
            new_floats, new_others, state_tangent, theta_tangent, step, grad
        )
        return new_carry, weight * loss

    floats, others, _ = _split_state(state.inner_state)
    carry = _UOROCarry(
        floats,
        others,
        state.state_tangent,
        state.theta_tangent,
        state.step,
        _zero_grad(theta_flat),
    )
    xs = (*keys, *sign_keys, weights, data)
    carry, losses = jax.lax.scan(body, carry, xs)
    return jnp.sum(losses), carry


def uoro(
    problem: UnrolledProblem,
    *,
    truncation_length: int = 1,
    key: jax.Array | int,
) -> optax.GradientTransformationExtraArgs:
    r"""Unbiased online recurrent optimization (UORO), as an optax transformation.

    Replaces RTRL's influence matrix by a random rank-one estimate
    :math:`J_t \approx \tilde s_t \tilde\theta_t^\top` whose expectation is
    :math:`J_t`. For each of the ``K`` steps of an update it adds

    .. math::
      \hat g = w_k\Big(\big(\tfrac{\partial \ell_k}{\partial s_{k-1}}
      \tilde s_{k-1}\big)\,\tilde\theta_{k-1}
      + \frac{\partial \ell_k}{\partial\theta}\Big),

    then, with random signs :math:`\nu \in \{\pm 1\}^S`,

    .. math::
      \tilde s_k = \rho_0 F_s \tilde s_{k-1} + \rho_1 \nu, \qquad
      \tilde\theta_k = \tilde\theta_{k-1}/\rho_0 + \nu^\top F_\theta/\rho_1,

    where :math:`\rho_0 = \sqrt{(\|\tilde\theta\|+\delta)/(\|F_s\tilde s\|+
    \delta)}`, :math:`\rho_1 = \sqrt{(\|\nu^\top F_\theta\|+\delta)/
    (\|\nu\|+\delta)}` and :math:`\delta = 10^{-7}`. :math:`F_s \tilde s` is
    an exact JVP (not the reference code's finite difference) and
    :math:`\nu^\top F_\theta` an exact VJP. When an inner problem starts,
    :math:`(\tilde s, \tilde\theta)` restart from zero plus one rank-one draw
    of :math:`d\,\mathrm{init}/d\theta`, so the estimate stays unbiased when
    ``init`` depends on ``theta``.

    With ``theta`` fixed the estimate is unbiased for the same gradient as
    :func:`rtrl`, but its variance is high and grows with the length of an
    inner problem. Memory is :math:`O(S + P)`; compute is about three inner
    steps (one JVP, one VJP) per inner step. Non-finite values are handled as
    in :func:`rtrl`.

    Args:
      problem: The unrolled problem.
      truncation_length: ``K``, inner steps per update; at most the horizon.
      key: Typed PRNG key (or int seed); the inner trajectory follows the
        key walk of :func:`tbptt` and the signs come from the same state key.

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
      >>> transform = pes_optax.uoro(problem, key=0)
      >>> theta = jnp.asarray(1.0)
      >>> grads, state = transform.update(
      ...     jnp.zeros(()), transform.init(theta), theta)
      >>> float(grads)  # J starts at d init / d theta = 0
      2.0

    References:
      Tallec and Ollivier, `Unbiased Online Recurrent Optimization
      <https://arxiv.org/abs/1702.05043>`_, 2017.
    """
    problem, truncation_length, key = _check_factory_args(
        problem, truncation_length, key
    )

    def init_fn(params):
        inner_state, floats, num_params, rng_key = _initial_fields(problem, key, params)
        return UOROState(
            inner_state=inner_state,
            state_tangent=tuple(jnp.zeros_like(x) for x in floats),
            theta_tangent=jnp.zeros((num_params,), ravel_pytree(params)[0].dtype),
            step=jnp.zeros((), jnp.int32),
            rng_key=rng_key,
            diagnostics=bp.empty_diagnostics(),
        )

    def update_fn(updates, state, params=None, *, data=None, **extra_args):
        del extra_args
        _check_online_args(updates, state, params, data, truncation_length, UOROState)
        rng_key, noise_key, steps_key = jax.random.split(state.rng_key, 3)
        keys = step_keys(steps_key, truncation_length)
        sign_keys = step_keys(noise_key, truncation_length)
        theta_flat, unravel = ravel_pytree(params)

        loss, carry = _uoro_truncation(
            problem, theta_flat, unravel, state, keys, sign_keys, data
        )
        estimate, step, diagnostics = _finish(
            state, unravel, loss, carry.grad, carry, truncation_length
        )
        new_state = UOROState(
            inner_state=_merge_state(
                carry.floats, carry.others, _split_state(state.inner_state)[2]
            ),
            state_tangent=carry.state_tangent,
            theta_tangent=carry.theta_tangent,
            step=step,
            rng_key=rng_key,
            diagnostics=diagnostics,
        )
        return add_estimate(updates, estimate), new_state

    return v.tag(
        optax.GradientTransformationExtraArgs(init_fn, update_fn),
        estimator="uoro",
        truncation_length=truncation_length,
    )

"""PES with an analytic gradient and a control variate (PES-A).

Vicol, Metz and Sohl-Dickstein, "Unbiased Gradient Estimation in Unrolled
Computation Graphs with Persistent Evolution Strategies", ICML 2021,
https://arxiv.org/abs/2112.13835 (the variant with an analytic gradient of
the current truncation).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from pes_optax._src import estimate as estimate_lib
from pes_optax._src import particles
from pes_optax._src import validation as v
from pes_optax._src.es import _check_update_args, _next_diagnostics, _zeros_per_particle
from pes_optax._src.estimate import ESDiagnostics
from pes_optax._src.problem import UnrolledProblem, strong
from pes_optax._src.sharding import particle_sharding

PyTree = Any


class PESAState(NamedTuple):
    """State of :func:`pes_a`: particles in lockstep with a mean trajectory."""

    inner_state: PyTree  # leaves [N, ...]: each particle's inner state
    accumulator: PyTree  # theta-shaped leaves [N, ...] float32: sum of e / sigma^2
    mean_inner_state: PyTree  # the trajectory run with the unperturbed theta
    step: jax.Array  # int32 []: inner step shared by the mean and the particles
    rng_key: jax.Array  # typed PRNG key, split on every update
    count: jax.Array  # int32 []: updates so far
    diagnostics: ESDiagnostics


def _tree_dot_per_particle(perturbation: PyTree, direction: PyTree) -> jax.Array:
    """``[N]`` inner products of each particle's perturbation with a vector."""
    products = jax.tree.map(
        lambda e, g: jnp.sum((e * g).reshape(e.shape[0], -1), axis=1),
        perturbation,
        direction,
    )
    return sum(jax.tree.leaves(products))


def _take_first(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: x[0], tree)


def pes_a(
    problem: UnrolledProblem,
    *,
    num_particles: int,
    sigma: v.ScalarOrSchedule,
    truncation_length: int,
    key: jax.Array | int,
    antithetic: bool = True,
    mesh: Mesh | None = None,
    particle_axis: str = "particles",
) -> optax.GradientTransformationExtraArgs:
    r"""PES with an analytic gradient of the current truncation (PES-A).

    Besides the ``N`` PES particles, keeps a trajectory :math:`\bar s` run with
    the unperturbed ``theta``. Each ``update`` backpropagates through the
    current ``K`` steps from :math:`\bar s` (held constant) to get
    :math:`g^A_\tau`, and estimates only the history's influence with PES,
    minus a first-order control variate:

    .. math::
      \hat g_\tau = g^A_\tau + \frac{1}{N} \sum_i \xi^{(i)}_{\tau-1}
      \big(L^{(i)}_\tau - \epsilon^{(i)\top}_\tau g^A_\tau\big),

    where :math:`\xi_{\tau-1}` is the accumulated score before this
    truncation's perturbation is added. The control variate has mean zero, so
    the estimate is unbiased wherever the gradient of the current truncation
    at the mean state equals its mean over the particles' states (exactly so
    for linear dynamics with quadratic losses); with the exact current term
    its variance is lower than plain PES. Needs a differentiable ``step``.

    When the inner problem ends inside a truncation, only the losses before
    the end carry the history term. Particles stay in lockstep with the mean
    trajectory (no staggering). A pair with a non-finite loss is left out and
    restarted from the mean trajectory with an empty accumulator; a
    non-finite mean trajectory gives a zero estimate and restarts everything.

    Args:
      problem: The unrolled problem (differentiable).
      num_particles: ``N``, counting both members of each antithetic pair.
      sigma: Perturbation standard deviation, or a schedule.
      truncation_length: ``K``; at most the horizon.
      key: Typed PRNG key (or int seed).
      antithetic: Sample perturbations in pairs ``(+e, -e)``.
      mesh: Optional ``jax.sharding.Mesh`` over which to split the particles;
        see :func:`pes_optax.pes`.
      particle_axis: Name of the mesh axis that holds particles.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a :class:`PESAState`.

    References:
      Vicol, Metz and Sohl-Dickstein, `Unbiased Gradient Estimation in
      Unrolled Computation Graphs with Persistent Evolution Strategies
      <https://arxiv.org/abs/2112.13835>`_, 2021.
    """
    problem = v.check_problem(problem)
    num_particles = v.check_num_particles(num_particles, antithetic)
    truncation_length = v.check_truncation_length(truncation_length, problem.horizon)
    sigma_fn = v.check_sigma(sigma)
    key = v.check_key(key)
    horizon = particles.NO_END if problem.horizon is None else problem.horizon
    sharding = particle_sharding(mesh, particle_axis, num_particles, antithetic)

    def init_fn(params):
        v.check_theta(params, "params")
        init_key, rng_key = jax.random.split(key)
        zeros = _zeros_per_particle(params, num_particles)
        return PESAState(
            inner_state=strong(
                jax.vmap(problem.init, in_axes=(None, 0))(
                    init_key, particles.perturb(params, zeros)
                )
            ),
            accumulator=zeros,
            mean_inner_state=strong(problem.init(init_key, params)),
            step=jnp.zeros((), jnp.int32),
            rng_key=rng_key,
            count=jnp.zeros((), jnp.int32),
            diagnostics=estimate_lib.empty_diagnostics(),
        )

    def mean_truncation(theta, state, keys, data):
        """The mean trajectory's (loss_old, loss_new) and final carry."""
        carry = particles.initial_carry(
            jax.tree.map(lambda x: x[None], state.mean_inner_state),
            state.step[None],
            jnp.full((1,), horizon, jnp.int32),
            jax.tree.map(lambda t: jnp.zeros((1, *jnp.shape(t)), jnp.float32), theta),
        )
        carry = particles.run_truncation(
            problem, theta, carry, (), False, keys, data, truncation_length
        )
        return (carry.loss_old[0], carry.loss_new[0]), carry

    def update_fn(updates, state, params=None, *, data=None, **extra_args):
        del extra_args
        _check_update_args(
            updates, state, params, data, truncation_length, True, PESAState
        )
        sigma_now = jnp.asarray(sigma_fn(state.count), jnp.float32)
        keys = particles.update_keys(
            state.rng_key, num_particles, antithetic, truncation_length
        )

        # Exact gradient of the current truncation from the mean state.
        (grad_old, grad_new), mean_carry = jax.jacrev(
            lambda t: mean_truncation(t, state, keys, data), has_aux=True
        )(params)
        analytic = jax.tree.map(jnp.add, grad_old, grad_new)

        # PES particles, all at the mean trajectory's step.
        noise = particles.perturbations_from_keys(
            keys.draw, params, sigma_now, antithetic, sharding
        )
        fresh_score = jax.tree.map(lambda e: e / sigma_now**2, noise)
        carry = particles.initial_carry(
            state.inner_state,
            jnp.broadcast_to(state.step, (num_particles,)),
            jnp.full((num_particles,), horizon, jnp.int32),
            noise,
        )
        carry = particles.run_truncation(
            problem,
            params,
            carry,
            noise,
            False,
            keys,
            data,
            truncation_length,
            sharding,
        )

        # History term with the first-order control variate.
        centred = carry.loss_old - _tree_dot_per_particle(noise, grad_old)
        contributions = particles.particle_contributions(
            state.accumulator, state.accumulator, centred, jnp.zeros_like(centred)
        )
        finite = carry.finite
        history, keep, stats = estimate_lib.reduce_estimate(
            contributions,
            carry.loss_old + carry.loss_new,
            finite,
            antithetic,
            "drop_pair",
        )
        mean_ok = mean_carry.finite[0] & jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(analytic)])
        )
        estimate = jax.tree.map(
            lambda a, h: jnp.where(mean_ok, a + h, 0.0), analytic, history
        )

        # Accumulate; restart left-out pairs from the mean trajectory.
        score = jax.tree.map(jnp.add, state.accumulator, fresh_score)
        score = particles.select_particles(carry.started, fresh_score, score)
        keep = keep & mean_ok
        mean_state = _take_first(mean_carry.inner_state)
        restart_state = jax.tree.map(
            lambda m: jnp.broadcast_to(m, (num_particles, *m.shape)), mean_state
        )
        zeros = jax.tree.map(jnp.zeros_like, score)
        new_step = jnp.where(mean_ok, mean_carry.step[0], 0)
        new_state = PESAState(
            inner_state=particles.select_particles(
                keep, carry.inner_state, restart_state
            ),
            accumulator=particles.select_particles(keep, score, zeros),
            mean_inner_state=mean_state,
            step=new_step.astype(jnp.int32),
            rng_key=keys.next_key,
            count=optax.safe_increment(state.count),
            diagnostics=_next_diagnostics(state, stats, truncation_length),
        )
        return estimate_lib.add_estimate(updates, estimate), new_state

    return v.tag(
        optax.GradientTransformationExtraArgs(init_fn, update_fn),
        estimator="pes_a",
        num_particles=num_particles,
        sigma=v.describe_sigma(sigma),
        truncation_length=truncation_length,
        antithetic=antithetic,
    )

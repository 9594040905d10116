"""Truncated evolution strategies, the biased baseline of the PES paper.

Vicol, Metz and Sohl-Dickstein, ICML 2021, https://arxiv.org/abs/2112.13835,
section "Truncated ES".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from pes_optax._src import estimate as estimate_lib
from pes_optax._src import particles
from pes_optax._src import validation as v
from pes_optax._src.es import (
    ESState,
    _check_update_args,
    _is_empty,
    _next_diagnostics,
    _zeros_per_particle,
    map_particle_chunks,
)
from pes_optax._src.problem import UnrolledProblem, strong
from pes_optax._src.sharding import num_particle_devices, particle_sharding


def _broadcast(tree, num: int):
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num, *jnp.shape(x))), tree)


def truncated_es(
    problem: UnrolledProblem,
    *,
    num_particles: int,
    sigma: v.ScalarOrSchedule,
    truncation_length: int,
    key: jax.Array | int,
    antithetic: bool = True,
    nonfinite_policy: str = "drop_pair",
    mesh: Mesh | None = None,
    particle_axis: str = "particles",
    particle_chunk_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Truncated ES as an optax transformation (biased).

    Keeps one unperturbed inner trajectory :math:`s`. Each ``update`` unrolls
    ``N`` particles ``K`` steps from :math:`s` with
    :math:`\theta + \epsilon_i`, adds

    .. math::
      \hat g = \frac{1}{N \sigma^2} \sum_i \epsilon_i L_\tau(\theta +
      \epsilon_i; s),

    then advances :math:`s` by ``K`` steps with the unperturbed ``theta``.
    The estimate ignores how ``theta`` shaped :math:`s`, so it is biased
    towards short-horizon (greedy) behaviour; it is provided as the baseline
    that :func:`pes` corrects.

    Warning:
      Biased whenever the inner problem spans more than one truncation.

    Args:
      problem: The unrolled problem.
      num_particles: ``N``, counting both members of each antithetic pair.
      sigma: Perturbation standard deviation, or a schedule.
      truncation_length: ``K``; at most the horizon.
      key: Typed PRNG key (or int seed).
      antithetic: Sample perturbations in pairs ``(+e, -e)``.
      nonfinite_policy: ``"drop_pair"`` or ``"skip_update"``; see
        :func:`pes_optax.pes`. A non-finite unperturbed trajectory starts a
        new inner problem.
      mesh: Optional ``jax.sharding.Mesh`` over which to split the perturbed
        particles; see :func:`pes_optax.pes`.
      particle_axis: Name of the mesh axis that holds particles.
      particle_chunk_size: Run the particles in sequential blocks of this
        many; see :func:`pes_optax.pes`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state keeps the
      unperturbed trajectory (no particle axis) and an empty accumulator.
    """
    problem = v.check_problem(problem)
    num_particles = v.check_num_particles(num_particles, antithetic)
    truncation_length = v.check_truncation_length(truncation_length, problem.horizon)
    sigma_fn = v.check_sigma(sigma)
    key = v.check_key(key)
    v.check_choice(
        "nonfinite_policy", nonfinite_policy, estimate_lib.NONFINITE_POLICIES
    )
    horizon = particles.NO_END if problem.horizon is None else problem.horizon
    sharding = particle_sharding(mesh, particle_axis, num_particles, antithetic)
    num_devices = num_particle_devices(mesh, particle_axis)
    num_chunks = v.check_chunk_size(
        particle_chunk_size, num_particles, antithetic, num_devices
    )

    def init_fn(params):
        v.check_theta(params, "params")
        init_key, rng_key = jax.random.split(key)
        return ESState(
            inner_state=strong(problem.init(init_key, params)),
            accumulator=(),
            perturbation=(),
            step=jnp.zeros((), jnp.int32),
            episode_end=jnp.asarray(horizon, jnp.int32),
            rng_key=rng_key,
            count=jnp.zeros((), jnp.int32),
            diagnostics=estimate_lib.empty_diagnostics(),
        )

    def update_fn(updates, state, params=None, *, data=None, **extra_args):
        del extra_args
        _check_update_args(updates, state, params, data, truncation_length, False)
        if not _is_empty(state.accumulator):
            raise TypeError(
                "`state` was built by another estimator than truncated_es (it "
                "has per-particle accumulators); pass this estimator's state."
            )
        sigma_now = jnp.asarray(sigma_fn(state.count), jnp.float32)
        keys = particles.update_keys(
            state.rng_key, num_particles, antithetic, truncation_length
        )

        # Perturbed particles and the unperturbed trajectory, all from s.
        def run_from_s(num, perturbation, sharding):
            carry = particles.initial_carry(
                _broadcast(state.inner_state, num),
                jnp.broadcast_to(state.step, (num,)),
                jnp.broadcast_to(state.episode_end, (num,)),
                perturbation,
            )
            return particles.run_truncation(
                problem,
                params,
                carry,
                (),
                False,
                keys,
                data,
                truncation_length,
                sharding,
            )

        def run_chunk(fields, keys):
            noise = particles.perturbations_from_keys(
                keys, params, sigma_now, antithetic, sharding
            )
            carry = run_from_s(jax.tree.leaves(noise)[0].shape[0], noise, sharding)
            losses = carry.loss_old + carry.loss_new
            score = jax.tree.map(lambda e: e / sigma_now**2, noise)
            contributions = particles.particle_contributions(
                score, score, losses, jnp.zeros_like(losses)
            )
            finite = carry.finite
            return fields, estimate_lib.chunk_sums(
                contributions, losses, finite, antithetic
            )

        # Estimate from the perturbed particles only.
        _, sums = map_particle_chunks(run_chunk, (), keys.draw, num_chunks, num_devices)
        estimate, stats = estimate_lib.finalize(sums, antithetic, nonfinite_policy)
        mean = run_from_s(1, _zeros_per_particle(params, 1), None)

        # Advance the unperturbed trajectory; restart it if it blew up.
        mean_ok = mean.finite[0]
        new_state = ESState(
            inner_state=jax.tree.map(lambda x: x[0], mean.inner_state),
            accumulator=(),
            perturbation=(),
            step=jnp.where(mean_ok, mean.step[0], 0),
            episode_end=jnp.where(mean_ok, mean.episode_end[0], horizon),
            rng_key=keys.next_key,
            count=optax.safe_increment(state.count),
            diagnostics=_next_diagnostics(state, stats, truncation_length),
        )
        return estimate_lib.add_estimate(updates, estimate), new_state

    return v.tag(
        optax.GradientTransformationExtraArgs(init_fn, update_fn),
        estimator="truncated_es",
        num_particles=num_particles,
        sigma=v.describe_sigma(sigma),
        truncation_length=truncation_length,
        antithetic=antithetic,
        nonfinite_policy=nonfinite_policy,
        particle_chunk_size=particle_chunk_size,
    )

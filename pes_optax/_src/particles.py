"""The particle engine shared by the evolution-strategies estimators.

One call of :func:`run_truncation` runs ``K`` inner steps of ``N`` perturbed
particles as a single ``lax.scan`` over steps of a ``vmap`` over particles, and
returns, per particle, the two pieces of its truncation loss:

* ``loss_old``: the weighted losses taken before the particle started a new
  inner problem in this truncation, credited to the accumulator it entered
  the truncation with;
* ``loss_new``: the weighted losses taken after it started one, credited only
  to the perturbation that started it.

A truncation never holds more than one start per particle because the
factories require ``truncation_length <= horizon``.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from pes_optax._src.problem import UnrolledProblem, step_keys, step_weights
from pes_optax._src.sharding import constrain

PyTree = Any
NO_END = jnp.iinfo(jnp.int32).max


class ParticleCarry(NamedTuple):
    """What the scan over the steps of one truncation carries."""

    inner_state: PyTree  # leaves [N, ...]
    step: jax.Array  # int32 [N], inner step within the current inner problem
    episode_end: jax.Array  # int32 [N], step at which the inner problem ends
    perturbation: PyTree  # theta-shaped leaves [N, ...], float32
    started: jax.Array  # bool [N], started an inner problem this truncation
    loss_old: jax.Array  # float32 [N]
    loss_new: jax.Array  # float32 [N]
    finite: jax.Array  # bool [N], every loss so far finite


class UpdateKeys(NamedTuple):
    """Every key one update of an ES estimator uses."""

    next_key: jax.Array  # the state's key for the next update
    draw: jax.Array  # [num_draws]: one per antithetic pair (or particle)
    init: jax.Array  # [K]: the key of a start at each step of the truncation
    inner: jax.Array  # [K]: the key of each inner step


def update_keys(
    rng_key: jax.Array, num_particles: int, antithetic: bool, truncation_length: int
) -> UpdateKeys:
    """All the keys of one update, drawn before the unroll starts.

    The state's key splits into the next state key, the root of the draws
    (one key per pair, so a block of particles can be regenerated alone with
    :func:`perturbations_from_keys`) and the root of the steps, walked by
    :func:`~pes_optax._src.problem.step_keys` as every estimator walks it, so
    that estimators given the same key see the same inner steps.
    """
    next_key, noise_key, steps_key = jax.random.split(rng_key, 3)
    num_draws = num_particles // 2 if antithetic else num_particles
    init_keys, inner_keys = step_keys(steps_key, truncation_length)
    return UpdateKeys(
        next_key=next_key,
        draw=jax.random.split(noise_key, num_draws),
        init=init_keys,
        inner=inner_keys,
    )


def perturbations_from_keys(
    keys: jax.Array, theta: PyTree, sigma: jax.Array, antithetic: bool, sharding=None
) -> PyTree:
    """The perturbations of the particles whose draw keys are ``keys``."""
    leaves, treedef = jax.tree.flatten(theta)
    shapes = [jnp.shape(x) for x in leaves]
    sizes = [math.prod(shape) for shape in shapes]

    def draw(one_key):
        # One draw of all P numbers per key, cut into theta's leaves.
        flat = jax.random.normal(one_key, (sum(sizes),), jnp.float32)
        cuts = list(itertools.accumulate(sizes))[:-1]
        pieces = jnp.split(flat, cuts) if cuts else [flat]
        return [
            piece.reshape(shape) for piece, shape in zip(pieces, shapes, strict=True)
        ]

    def spread(noise):
        noise = sigma * noise
        if antithetic:
            noise = jnp.stack([noise, -noise], axis=1)
            noise = noise.reshape((-1, *noise.shape[2:]))
        return noise

    noise = [spread(n) for n in jax.vmap(draw)(keys)]
    return constrain(jax.tree.unflatten(treedef, noise), sharding)


def perturb(theta: PyTree, perturbation: PyTree) -> PyTree:
    """``theta + perturbation`` per particle, in theta's dtypes."""
    return jax.tree.map(
        lambda t, e: (jnp.asarray(t, jnp.float32) + e).astype(jnp.result_type(t)),
        theta,
        perturbation,
    )


def particle_contributions(
    accumulator: PyTree,
    fresh_accumulator: PyTree,
    loss_old: jax.Array,
    loss_new: jax.Array,
) -> PyTree:
    """Per-particle ``acc_old * loss_old + acc_new * loss_new``, float32."""

    def combine(old, new):
        shape = (-1,) + (1,) * (old.ndim - 1)
        return old * loss_old.reshape(shape) + new * loss_new.reshape(shape)

    return jax.tree.map(combine, accumulator, fresh_accumulator)


def select_particles(mask: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    """Leafwise ``where`` with a ``[N]`` mask broadcast over trailing axes."""

    def pick(a, b):
        return jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)

    return jax.tree.map(pick, on_true, on_false)


def run_truncation(
    problem: UnrolledProblem,
    theta: PyTree,
    carry: ParticleCarry,
    fresh_perturbation: PyTree,
    reuse_noise: bool,
    keys: UpdateKeys,
    data: PyTree | None,
    truncation_length: int,
    sharding=None,
    staggered: bool = False,
) -> ParticleCarry:
    """Runs ``truncation_length`` steps of every particle.

    A particle whose ``step`` is 0 starts a new inner problem from
    ``problem.init`` before stepping, with ``fresh_perturbation`` as its
    perturbation from then on when ``reuse_noise`` is set (noise-reuse ES);
    otherwise a particle keeps ``carry.perturbation`` for the whole truncation.
    All particles share the step keys ``keys.init`` and ``keys.inner`` and the
    data (common random numbers).
    With ``sharding``, the particle axis of the carry is kept on its devices.
    Unless ``staggered``, every inner problem has the problem's horizon and
    ``carry.episode_end`` is not consulted.
    """
    weights = step_weights(problem.loss_reduction, truncation_length)
    horizon = NO_END if problem.horizon is None else problem.horizon
    vmapped_init = jax.vmap(problem.init, in_axes=(None, 0))
    vmapped_step = jax.vmap(problem.step, in_axes=(0, 0, None, None))

    def body(carry: ParticleCarry, xs):
        init_key, inner_key, weight, step_data = xs
        start = carry.step == 0

        # Choose each particle's perturbation for this step.
        perturbation = carry.perturbation
        if reuse_noise:
            perturbation = select_particles(start, fresh_perturbation, perturbation)
        particle_theta = perturb(theta, perturbation)

        # Start new inner problems where needed.
        def restart(inner_state):
            fresh = vmapped_init(init_key, particle_theta)
            return select_particles(start, fresh, inner_state)

        inner_state = jax.lax.cond(
            jnp.any(start), restart, lambda s: s, carry.inner_state
        )

        # One inner step of every particle.
        inner_state, loss = vmapped_step(
            particle_theta, inner_state, inner_key, step_data
        )
        loss = jnp.asarray(loss, jnp.float32)

        # Credit the loss to the old or the new inner problem.
        started = carry.started | start
        weighted = weight * loss
        zero = jnp.zeros_like(weighted)
        step = carry.step + 1
        episode_end = carry.episode_end
        if problem.horizon is not None:
            ended = step >= (episode_end if staggered else horizon)
            step = jnp.where(ended, 0, step)
            if staggered:
                episode_end = jnp.where(ended, horizon, episode_end)
        return (
            constrain(
                ParticleCarry(
                    inner_state=inner_state,
                    step=step,
                    episode_end=episode_end,
                    perturbation=perturbation,
                    started=started,
                    loss_old=carry.loss_old + jnp.where(started, zero, weighted),
                    loss_new=carry.loss_new + jnp.where(started, weighted, zero),
                    finite=carry.finite & jnp.isfinite(loss),
                ),
                sharding,
            ),
            None,
        )

    carry = constrain(carry, sharding)
    carry, _ = jax.lax.scan(body, carry, (keys.init, keys.inner, weights, data))
    return carry


def initial_carry(
    inner_state: PyTree,
    step: jax.Array,
    episode_end: jax.Array,
    perturbation: PyTree,
) -> ParticleCarry:
    """A carry at the start of a truncation, with empty loss sums."""
    num_particles = step.shape[0]
    zeros = jnp.zeros((num_particles,), jnp.float32)
    return ParticleCarry(
        inner_state=inner_state,
        step=step,
        episode_end=episode_end,
        perturbation=perturbation,
        started=jnp.zeros((num_particles,), bool),
        loss_old=zeros,
        loss_new=zeros,
        finite=jnp.ones((num_particles,), bool),
    )

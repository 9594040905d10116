"""The persistent evolution-strategies engine behind PES, NRES and full ES.

One ``update`` runs one truncation of every particle, in blocks of particles
when asked (``particle_chunk_size``), and adds the estimate to the incoming
updates. The public factories and the method references are in ``pes.py``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from pes_optax._src import estimate as estimate_lib
from pes_optax._src import particles
from pes_optax._src import validation as v
from pes_optax._src.estimate import ESDiagnostics
from pes_optax._src.problem import UnrolledProblem, strong
from pes_optax._src.sharding import (
    constrain,
    num_particle_devices,
    particle_sharding,
)

PyTree = Any


class ESState(NamedTuple):
    """State of an evolution-strategies estimator.

    ``N`` is the number of particles. Truncated ES keeps a single unperturbed
    trajectory, so its ``inner_state``, ``step`` and ``episode_end`` have no
    particle axis and its ``accumulator`` is empty.
    """

    inner_state: PyTree  # leaves [N, ...]: each particle's inner state
    accumulator: PyTree  # theta-shaped leaves [N, ...] float32: sum of e / sigma^2
    perturbation: PyTree  # NRES: each particle's current e, [N, ...]; else ()
    step: jax.Array  # int32 [N]: inner step within the current inner problem
    episode_end: jax.Array  # int32 [N]: step at which the inner problem ends
    rng_key: jax.Array  # typed PRNG key, split on every update
    count: jax.Array  # int32 []: updates so far (the sigma schedule's input)
    diagnostics: ESDiagnostics


def _horizon_or_max(problem: UnrolledProblem) -> int:
    return particles.NO_END if problem.horizon is None else problem.horizon


def _zeros_per_particle(theta: PyTree, num_particles: int) -> PyTree:
    return jax.tree.map(
        lambda t: jnp.zeros((num_particles, *jnp.shape(t)), jnp.float32), theta
    )


def _scale(tree: PyTree, factor: jax.Array) -> PyTree:
    return jax.tree.map(lambda x: x * factor, tree)


def _is_empty(tree: PyTree) -> bool:
    return isinstance(tree, tuple) and not tree


def _check_update_args(
    updates, state, params, data, truncation_length, persistent, state_type=None
):
    v.check_state_type(state, state_type or ESState, "an ES estimator")
    v.check_theta(params, "params")
    v.check_same_structure("updates", updates, params, "the structure of `params`")
    if persistent:
        if _is_empty(state.accumulator):
            raise TypeError(
                "`state` was built by truncated_es (no per-particle "
                "accumulators); pass the state of this estimator's init."
            )
        first_particle = jax.tree.map(lambda a: a[0], state.accumulator)
        v.check_same_structure(
            "params", params, first_particle, "the theta the state was built for"
        )
    if data is not None:
        v.check_data(data, truncation_length)


def _next_diagnostics(state, stats, truncation_length) -> ESDiagnostics:
    mean_loss, loss_std, num_dropped = stats
    previous = state.diagnostics
    return ESDiagnostics(
        mean_loss=mean_loss,
        loss_std=loss_std,
        num_dropped_pairs=num_dropped,
        total_dropped_pairs=previous.total_dropped_pairs + num_dropped,
        num_inner_steps=previous.num_inner_steps + truncation_length,
    )


class ParticleFields(NamedTuple):
    """The per-particle fields of :class:`ESState`, all with a leading ``N``."""

    inner_state: PyTree
    accumulator: PyTree
    perturbation: PyTree
    step: jax.Array
    episode_end: jax.Array


def map_particle_chunks(fn, fields, draw_keys, num_chunks: int, num_devices: int = 1):
    """Applies ``fn(fields, draw_keys)`` to blocks of particles in sequence.

    ``fn`` returns ``(new_fields, sums)``; the new fields are put back in
    particle order and the :class:`~estimate.ChunkSums` are combined, so that
    the result does not depend on ``num_chunks``. With particles sharded over
    ``num_devices`` devices in contiguous slabs, block ``c`` takes the ``c``-th
    part of every device's slab, so each block is spread over all devices and
    nothing moves between them.
    """
    if num_chunks == 1:
        return fn(fields, draw_keys)

    def split(x):  # [N, ...] -> [num_chunks, N / num_chunks, ...]
        x = x.reshape((num_devices, num_chunks, -1, *x.shape[1:]))
        x = jnp.swapaxes(x, 0, 1)
        return x.reshape((num_chunks, -1, *x.shape[3:]))

    def merge(x):  # the inverse of split
        x = x.reshape((num_chunks, num_devices, -1, *x.shape[2:]))
        x = jnp.swapaxes(x, 0, 1)
        return x.reshape((-1, *x.shape[3:]))

    chunked = jax.tree.map(split, (fields, draw_keys))
    new_fields, sums = jax.lax.map(lambda args: fn(*args), chunked)
    sums = estimate_lib.ChunkSums(
        total=jax.tree.map(lambda t: jnp.sum(t, axis=0), sums.total),
        num_kept=jnp.sum(sums.num_kept),
        keep=merge(sums.keep),
        losses=merge(sums.losses),
    )
    return jax.tree.map(merge, new_fields), sums


def _persistent_es(
    problem,
    *,
    num_particles,
    sigma,
    truncation_length,
    key,
    antithetic,
    reuse_noise,
    stagger,
    nonfinite_policy,
    mesh,
    particle_axis,
    particle_chunk_size,
    name,
) -> optax.GradientTransformationExtraArgs:
    """Shared body of :func:`pes`, :func:`nres` and :func:`full_es`."""
    problem = v.check_problem(problem)
    num_particles = v.check_num_particles(num_particles, antithetic)
    truncation_length = v.check_truncation_length(truncation_length, problem.horizon)
    sigma_fn = v.check_sigma(sigma)
    key = v.check_key(key)
    v.check_choice(
        "nonfinite_policy", nonfinite_policy, estimate_lib.NONFINITE_POLICIES
    )
    if stagger and problem.horizon is None:
        raise ValueError(
            "`stagger=True` needs a finite `horizon`: an endless inner problem "
            "never resets, so there is nothing to stagger."
        )
    horizon = _horizon_or_max(problem)
    pair_size = 2 if antithetic else 1
    sharding = particle_sharding(mesh, particle_axis, num_particles, antithetic)
    num_devices = num_particle_devices(mesh, particle_axis)
    num_chunks = v.check_chunk_size(
        particle_chunk_size, num_particles, antithetic, num_devices
    )

    def place(fields: ParticleFields) -> ParticleFields:
        return constrain(fields, sharding)

    def init_fn(params):
        v.check_theta(params, "params")
        init_key, offset_key, rng_key = jax.random.split(key, 3)
        zeros = _zeros_per_particle(params, num_particles)
        inner_state = strong(
            jax.vmap(problem.init, in_axes=(None, 0))(
                init_key, particles.perturb(params, zeros)
            )
        )
        episode_end = jnp.full((num_particles,), horizon, jnp.int32)
        if stagger:
            # Shorten each pair's first inner problem by a random offset.
            offsets = jax.random.randint(
                offset_key, (num_particles // pair_size,), 0, horizon
            )
            episode_end = episode_end - jnp.repeat(offsets, pair_size)
        fields = place(
            ParticleFields(
                inner_state=inner_state,
                accumulator=zeros,
                perturbation=zeros if reuse_noise else (),
                step=jnp.zeros((num_particles,), jnp.int32),
                episode_end=episode_end.astype(jnp.int32),
            )
        )
        return ESState(
            **fields._asdict(),
            rng_key=rng_key,
            count=jnp.zeros((), jnp.int32),
            diagnostics=estimate_lib.empty_diagnostics(),
        )

    def run_chunk(params, sigma_now, keys, data, fields, draw_keys):
        """One truncation of a block of particles: new fields and sums."""
        noise = particles.perturbations_from_keys(
            draw_keys, params, sigma_now, antithetic, sharding
        )
        fresh_score = _scale(noise, 1.0 / sigma_now**2)
        if reuse_noise:
            score_in, perturbation_in = fields.accumulator, fields.perturbation
        else:
            score_in = jax.tree.map(jnp.add, fields.accumulator, fresh_score)
            perturbation_in = noise

        # Unroll every particle of the block for one truncation.
        carry = particles.initial_carry(
            fields.inner_state, fields.step, fields.episode_end, perturbation_in
        )
        carry = particles.run_truncation(
            problem,
            params,
            carry,
            noise,
            reuse_noise,
            keys,
            data,
            truncation_length,
            sharding,
            stagger,
        )

        # Weight each particle's losses by the scores they depend on.
        contributions = particles.particle_contributions(
            score_in, fresh_score, carry.loss_old, carry.loss_new
        )
        finite = carry.finite
        sums = estimate_lib.chunk_sums(
            contributions, carry.loss_old + carry.loss_new, finite, antithetic
        )

        # Carry the scores forward; restart the pairs that were left out.
        keep = sums.keep
        score = particles.select_particles(carry.started, fresh_score, score_in)
        zeros = jax.tree.map(jnp.zeros_like, score)
        new_fields = ParticleFields(
            inner_state=carry.inner_state,
            accumulator=particles.select_particles(keep, score, zeros),
            perturbation=(
                particles.select_particles(keep, carry.perturbation, zeros)
                if reuse_noise
                else ()
            ),
            step=jnp.where(keep, carry.step, 0),
            episode_end=jnp.where(keep, carry.episode_end, horizon),
        )
        return new_fields, sums

    def update_fn(updates, state, params=None, *, data=None, **extra_args):
        del extra_args
        _check_update_args(updates, state, params, data, truncation_length, True)
        if _is_empty(state.perturbation) == reuse_noise:
            raise TypeError(
                f"`state` was built by another estimator than {name} (its "
                "perturbation field does not fit); pass this estimator's state."
            )
        sigma_now = jnp.asarray(sigma_fn(state.count), jnp.float32)
        keys = particles.update_keys(
            state.rng_key, num_particles, antithetic, truncation_length
        )
        fields = ParticleFields(*(getattr(state, f) for f in ParticleFields._fields))

        new_fields, sums = map_particle_chunks(
            lambda f, k: run_chunk(params, sigma_now, keys, data, f, k),
            fields,
            keys.draw,
            num_chunks,
            num_devices,
        )
        estimate, stats = estimate_lib.finalize(sums, antithetic, nonfinite_policy)
        new_state = ESState(
            **place(new_fields)._asdict(),
            rng_key=keys.next_key,
            count=optax.safe_increment(state.count),
            diagnostics=_next_diagnostics(state, stats, truncation_length),
        )
        return estimate_lib.add_estimate(updates, estimate), new_state

    return v.tag(
        optax.GradientTransformationExtraArgs(init_fn, update_fn),
        estimator=name,
        num_particles=num_particles,
        sigma=v.describe_sigma(sigma),
        truncation_length=truncation_length,
        antithetic=antithetic,
        stagger=bool(stagger),
        nonfinite_policy=nonfinite_policy,
        particle_chunk_size=particle_chunk_size,
    )

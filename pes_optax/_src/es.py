"""Evolution-strategies gradient estimators for unrolled computation graphs.

* Persistent Evolution Strategies (PES): Vicol, Metz and Sohl-Dickstein,
  "Unbiased Gradient Estimation in Unrolled Computation Graphs with Persistent
  Evolution Strategies", ICML 2021, https://arxiv.org/abs/2112.13835.
* Noise-reuse ES (NRES): Li, Harrison, Sohl-Dickstein, Smith and Metz,
  "Variance-Reduced Gradient Estimation via Noise-Reuse in Online Evolution
  Strategies", NeurIPS 2023, https://arxiv.org/abs/2304.12180.
* Truncated and full-unroll ES, as defined in the PES paper.

Every factory returns an ``optax.GradientTransformationExtraArgs`` whose
``update`` runs one truncation of every particle and adds the estimate to the
incoming updates.
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
from pes_optax._src.estimate import ESDiagnostics
from pes_optax._src.problem import UnrolledProblem
from pes_optax._src.sharding import constrain, particle_sharding

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


def _check_update_args(updates, state, params, data, truncation_length, persistent):
    v.check_theta(params, "params")
    v.check_same_structure("updates", updates, params, "the structure of `params`")
    if persistent:
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

    def place(state: ESState) -> ESState:
        return state._replace(
            **constrain(
                {
                    "inner_state": state.inner_state,
                    "accumulator": state.accumulator,
                    "perturbation": state.perturbation,
                    "step": state.step,
                    "episode_end": state.episode_end,
                },
                sharding,
            )
        )

    def init_fn(params):
        v.check_theta(params, "params")
        init_key, offset_key, rng_key = jax.random.split(key, 3)
        zeros = _zeros_per_particle(params, num_particles)
        inner_state = jax.vmap(problem.init, in_axes=(None, 0))(
            init_key, particles.perturb(params, zeros)
        )
        episode_end = jnp.full((num_particles,), horizon, jnp.int32)
        if stagger:
            # Shorten each pair's first inner problem by a random offset.
            offsets = jax.random.randint(
                offset_key, (num_particles // pair_size,), 0, horizon
            )
            episode_end = episode_end - jnp.repeat(offsets, pair_size)
        state = ESState(
            inner_state=inner_state,
            accumulator=zeros,
            perturbation=zeros if reuse_noise else (),
            step=jnp.zeros((num_particles,), jnp.int32),
            episode_end=episode_end.astype(jnp.int32),
            rng_key=rng_key,
            count=jnp.zeros((), jnp.int32),
            diagnostics=estimate_lib.empty_diagnostics(),
        )
        return place(state)

    def update_fn(updates, state, params=None, *, data=None, **extra_args):
        del extra_args
        _check_update_args(updates, state, params, data, truncation_length, True)
        sigma_now = jnp.asarray(sigma_fn(state.count), jnp.float32)
        rng_key, noise_key, steps_key = jax.random.split(state.rng_key, 3)

        # Draw this truncation's perturbations and their scores e / sigma^2.
        noise = particles.sample_perturbations(
            noise_key, params, num_particles, sigma_now, antithetic, sharding
        )
        fresh_score = _scale(noise, 1.0 / sigma_now**2)
        if reuse_noise:
            score_in, perturbation_in = state.accumulator, state.perturbation
        else:
            score_in = jax.tree.map(jnp.add, state.accumulator, fresh_score)
            perturbation_in = noise

        # Unroll every particle for one truncation.
        carry = particles.initial_carry(
            state.inner_state, state.step, state.episode_end, perturbation_in
        )
        carry = particles.run_truncation(
            problem,
            params,
            carry,
            noise,
            reuse_noise,
            steps_key,
            data,
            truncation_length,
            sharding,
        )

        # Weight each particle's losses by the scores they depend on.
        contributions = particles.particle_contributions(
            score_in, fresh_score, carry.loss_old, carry.loss_new
        )
        finite = carry.finite & estimate_lib.tree_all_finite_per_particle(
            contributions, num_particles
        )
        estimate, keep, stats = estimate_lib.reduce_estimate(
            contributions,
            carry.loss_old + carry.loss_new,
            finite,
            antithetic,
            nonfinite_policy,
        )

        # Carry the scores forward; reset the pairs that were left out.
        score = particles.select_particles(carry.started, fresh_score, score_in)
        zeros = jax.tree.map(jnp.zeros_like, score)
        perturbation = (
            particles.select_particles(keep, carry.perturbation, zeros)
            if reuse_noise
            else ()
        )
        new_state = ESState(
            inner_state=carry.inner_state,
            accumulator=particles.select_particles(keep, score, zeros),
            perturbation=perturbation,
            step=jnp.where(keep, carry.step, 0),
            episode_end=jnp.where(keep, carry.episode_end, horizon),
            rng_key=rng_key,
            count=optax.safe_increment(state.count),
            diagnostics=_next_diagnostics(state, stats, truncation_length),
        )
        return estimate_lib.add_estimate(updates, estimate), place(new_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def pes(
    problem: UnrolledProblem,
    *,
    num_particles: int,
    sigma: v.ScalarOrSchedule,
    truncation_length: int,
    key: jax.Array | int,
    antithetic: bool = True,
    stagger: bool = False,
    nonfinite_policy: str = "drop_pair",
    mesh: Mesh | None = None,
    particle_axis: str = "particles",
) -> optax.GradientTransformationExtraArgs:
    r"""Persistent Evolution Strategies (PES) as an optax transformation.

    Each of ``N`` particles keeps its own inner state and the running sum of
    the scores of every perturbation it has seen since its inner problem
    began. One ``update`` draws a fresh perturbation :math:`\epsilon_\tau` per
    particle, unrolls every particle ``K`` steps with
    :math:`\theta + \epsilon_\tau` and adds

    .. math::
      \hat g_\tau = \frac{1}{N} \sum_i \xi^{(i)}_\tau L^{(i)}_\tau, \qquad
      \xi^{(i)}_\tau = \sum_{\tau' \le \tau} \epsilon^{(i)}_{\tau'} /
      \sigma_{\tau'}^2

    to ``updates``. With ``theta`` held fixed over an inner problem this is
    unbiased for the gradient of the Gaussian-smoothed objective, also when
    ``sigma`` follows a schedule (each score uses the sigma it was drawn
    with), where truncated ES and truncated backprop are biased.

    When a particle's inner problem ends inside a truncation, the losses
    before the end are credited to its accumulated scores and the losses after
    it only to the current perturbation, which is where its new accumulator
    starts.

    Non-finite losses: with ``nonfinite_policy="drop_pair"`` an antithetic
    pair with a non-finite loss is left out of the average (which divides by
    the particles kept) and its inner problems and accumulators are reset;
    ``"skip_update"`` instead contributes a zero estimate whenever any pair is
    non-finite. ``state.diagnostics.num_dropped_pairs`` reports the count.

    Args:
      problem: The unrolled problem.
      num_particles: ``N``, counting both members of each antithetic pair.
      sigma: Standard deviation of the perturbations, or a schedule of the
        update count.
      truncation_length: ``K``, inner steps per update; at most the horizon.
      key: Typed PRNG key (or int seed) for all randomness of the estimator.
      antithetic: Sample perturbations in pairs ``(+e, -e)``.
      stagger: Cut each pair's first inner problem short by a random number of
        steps so that the pairs' resets do not line up.
      nonfinite_policy: ``"drop_pair"`` or ``"skip_update"``.
      mesh: Optional ``jax.sharding.Mesh``; particles are split in contiguous
        blocks (antithetic partners together) along its ``particle_axis`` and
        XLA reduces the estimate across devices. ``num_particles`` must be a
        multiple of twice the axis size (antithetic) or of the axis size.
      particle_axis: Name of the mesh axis that holds particles.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` takes
      ``params`` (theta) and optionally ``data`` with leaves of leading axis
      ``truncation_length``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, pes_optax
      >>> problem = pes_optax.UnrolledProblem(
      ...     init=lambda key, theta: jnp.zeros(()),
      ...     step=lambda theta, s, key, data: (s + theta, (s + theta - 1) ** 2),
      ...     horizon=20)
      >>> opt = optax.chain(
      ...     pes_optax.pes(problem, num_particles=8, sigma=0.1,
      ...                   truncation_length=5, key=jax.random.key(0)),
      ...     optax.sgd(1e-3))
      >>> theta = jnp.asarray(0.5)
      >>> state = opt.init(theta)
      >>> grads = jnp.zeros_like(theta)
      >>> updates, state = opt.update(grads, state, theta)
      >>> updates.shape
      ()

    References:
      Vicol, Metz and Sohl-Dickstein, `Unbiased Gradient Estimation in
      Unrolled Computation Graphs with Persistent Evolution Strategies
      <https://arxiv.org/abs/2112.13835>`_, 2021.
    """
    return _persistent_es(
        problem,
        num_particles=num_particles,
        sigma=sigma,
        truncation_length=truncation_length,
        key=key,
        antithetic=antithetic,
        reuse_noise=False,
        stagger=stagger,
        nonfinite_policy=nonfinite_policy,
        mesh=mesh,
        particle_axis=particle_axis,
    )


def nres(
    problem: UnrolledProblem,
    *,
    num_particles: int,
    sigma: v.ScalarOrSchedule,
    truncation_length: int,
    key: jax.Array | int,
    antithetic: bool = True,
    stagger: bool | None = None,
    nonfinite_policy: str = "drop_pair",
    mesh: Mesh | None = None,
    particle_axis: str = "particles",
) -> optax.GradientTransformationExtraArgs:
    r"""Noise-reuse Evolution Strategies (NRES) as an optax transformation.

    Like :func:`pes`, but each particle draws one perturbation when its inner
    problem starts and keeps it until the inner problem ends. The estimate

    .. math::
      \hat g_\tau = \frac{1}{N} \sum_i \frac{\epsilon^{(i)}}{\sigma^2}
      L^{(i)}_\tau

    is unbiased for the gradient of the smoothed objective (with ``theta``
    fixed over an inner problem) and its variance does not grow with the
    number of truncations per inner problem. Staggering is on by default for a
    finite horizon, as the method relies on particles being at different
    steps of their inner problems.

    Args:
      problem: The unrolled problem.
      num_particles: ``N``, counting both members of each antithetic pair.
      sigma: Perturbation standard deviation, or a schedule of the update
        count (each perturbation keeps the sigma it was drawn with).
      truncation_length: ``K``, inner steps per update; at most the horizon.
      key: Typed PRNG key (or int seed).
      antithetic: Sample perturbations in pairs ``(+e, -e)``.
      stagger: Cut each pair's first inner problem short by a random offset;
        ``None`` (default) staggers whenever the horizon is finite.
      nonfinite_policy: ``"drop_pair"`` or ``"skip_update"``; see :func:`pes`.
      mesh: Optional ``jax.sharding.Mesh`` over which to split particles; see
        :func:`pes`.
      particle_axis: Name of the mesh axis that holds particles.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    References:
      Li, Harrison, Sohl-Dickstein, Smith and Metz, `Variance-Reduced Gradient
      Estimation via Noise-Reuse in Online Evolution Strategies
      <https://arxiv.org/abs/2304.12180>`_, 2023.
    """
    problem = v.check_problem(problem)
    if stagger is None:
        stagger = problem.horizon is not None
    return _persistent_es(
        problem,
        num_particles=num_particles,
        sigma=sigma,
        truncation_length=truncation_length,
        key=key,
        antithetic=antithetic,
        reuse_noise=True,
        stagger=stagger,
        nonfinite_policy=nonfinite_policy,
        mesh=mesh,
        particle_axis=particle_axis,
    )


def full_es(
    problem: UnrolledProblem,
    *,
    num_particles: int,
    sigma: v.ScalarOrSchedule,
    key: jax.Array | int,
    antithetic: bool = True,
    nonfinite_policy: str = "drop_pair",
    mesh: Mesh | None = None,
    particle_axis: str = "particles",
) -> optax.GradientTransformationExtraArgs:
    r"""Full-unroll ("vanilla") ES as an optax transformation.

    Every ``update`` runs one whole inner problem of ``horizon`` steps per
    particle from a fresh start with :math:`\theta + \epsilon_i` and adds

    .. math::
      \hat g = \frac{1}{N \sigma^2} \sum_i \epsilon_i L(\theta + \epsilon_i),

    an unbiased estimate of the gradient of the smoothed whole-problem
    objective. One update per inner problem makes it slow; memory does not
    grow with the horizon.

    Args:
      problem: The unrolled problem; its ``horizon`` must be finite.
      num_particles: ``N``, counting both members of each antithetic pair.
      sigma: Perturbation standard deviation, or a schedule.
      key: Typed PRNG key (or int seed).
      antithetic: Sample perturbations in pairs ``(+e, -e)``.
      nonfinite_policy: ``"drop_pair"`` or ``"skip_update"``; see :func:`pes`.
      mesh: Optional ``jax.sharding.Mesh`` over which to split particles; see
        :func:`pes`.
      particle_axis: Name of the mesh axis that holds particles.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    References:
      Salimans, Ho, Chen, Sidor and Sutskever, `Evolution Strategies as a
      Scalable Alternative to Reinforcement Learning
      <https://arxiv.org/abs/1703.03864>`_, 2017.
    """
    problem = v.check_problem(problem)
    if problem.horizon is None:
        raise ValueError(
            "full_es needs a finite `horizon` on the problem (one update runs a "
            "whole inner problem); got horizon=None. Use pes or truncated_es "
            "for an endless problem."
        )
    return _persistent_es(
        problem,
        num_particles=num_particles,
        sigma=sigma,
        truncation_length=problem.horizon,
        key=key,
        antithetic=antithetic,
        reuse_noise=False,
        stagger=False,
        nonfinite_policy=nonfinite_policy,
        mesh=mesh,
        particle_axis=particle_axis,
    )

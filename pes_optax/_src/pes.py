"""Persistent evolution strategies and their relatives as optax transforms.

* Persistent Evolution Strategies (PES): Vicol, Metz and Sohl-Dickstein,
  "Unbiased Gradient Estimation in Unrolled Computation Graphs with Persistent
  Evolution Strategies", ICML 2021, https://arxiv.org/abs/2112.13835.
* Noise-reuse ES (NRES): Li, Harrison, Sohl-Dickstein, Smith and Metz,
  "Variance-Reduced Gradient Estimation via Noise-Reuse in Online Evolution
  Strategies", NeurIPS 2023, https://arxiv.org/abs/2304.12180.
* Full-unroll ES, as used for reference gradients in the PES paper.

Every factory returns an ``optax.GradientTransformationExtraArgs`` whose
``update`` runs one truncation of every particle and adds the estimate to the
incoming updates.
"""

from __future__ import annotations

import jax
import optax
from jax.sharding import Mesh

from pes_optax._src import validation as v
from pes_optax._src.es import _persistent_es
from pes_optax._src.problem import UnrolledProblem


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
    particle_chunk_size: int | None = None,
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
      particle_chunk_size: Run the particles in sequential blocks of this
        many (a divisor of ``num_particles``, even with antithetic sampling)
        to cap the memory of the noise, perturbed parameters and
        contributions at one block; each block regenerates its perturbations
        from per-pair keys, so the estimate equals the unchunked one up to
        the order of the float sum. With ``mesh``, every block is spread over
        the devices, so the size must be a multiple of the axis size (twice
        it with antithetic sampling). ``None`` runs all particles at once.

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
        particle_chunk_size=particle_chunk_size,
        name="pes",
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
    particle_chunk_size: int | None = None,
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
      particle_chunk_size: Run the particles in sequential blocks of this
        many (a divisor of ``num_particles``, even with antithetic sampling)
        to cap the memory of the noise, perturbed parameters and
        contributions at one block; each block regenerates its perturbations
        from per-pair keys, so the estimate equals the unchunked one up to
        the order of the float sum. With ``mesh``, every block is spread over
        the devices, so the size must be a multiple of the axis size (twice
        it with antithetic sampling). ``None`` runs all particles at once.

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
        particle_chunk_size=particle_chunk_size,
        name="nres",
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
    particle_chunk_size: int | None = None,
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
      particle_chunk_size: Run the particles in sequential blocks of this
        many (a divisor of ``num_particles``, even with antithetic sampling)
        to cap the memory of the noise, perturbed parameters and
        contributions at one block; each block regenerates its perturbations
        from per-pair keys, so the estimate equals the unchunked one up to
        the order of the float sum. With ``mesh``, every block is spread over
        the devices, so the size must be a multiple of the axis size (twice
        it with antithetic sampling). ``None`` runs all particles at once.

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
        particle_chunk_size=particle_chunk_size,
        name="full_es",
    )

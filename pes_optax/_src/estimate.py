"""Reduction of per-particle contributions into one gradient estimate.

Implements the non-finite policies shared by the evolution-strategies
estimators:

* ``"drop_pair"`` (default): an antithetic pair (or, without antithetic
  sampling, a particle) with any non-finite loss is left out; the estimate is
  the mean over the particles kept. Its inner problems and accumulators are
  reset.
* ``"skip_update"``: if any pair is non-finite the whole estimate is zero for
  this update; the non-finite pairs are reset as above.

Either way the number of pairs left out is reported in the state, and the
estimate is finite.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any
NONFINITE_POLICIES = ("drop_pair", "skip_update")


class ESDiagnostics(NamedTuple):
    """What one update of an evolution-strategies estimator saw."""

    mean_loss: jax.Array  # float32 [], mean truncation loss of the kept particles
    loss_std: jax.Array  # float32 [], spread of the kept particles' losses
    num_dropped_pairs: jax.Array  # int32 [], pairs left out of this estimate
    total_dropped_pairs: jax.Array  # int32 [], pairs left out since init
    num_inner_steps: jax.Array  # int32 [], inner steps taken since init


def empty_diagnostics() -> ESDiagnostics:
    zero_f = jnp.zeros((), jnp.float32)
    zero_i = jnp.zeros((), jnp.int32)
    return ESDiagnostics(zero_f, zero_f, zero_i, zero_i, zero_i)


def pair_mask(finite: jax.Array, antithetic: bool) -> jax.Array:
    """``[N]`` mask that is False for every member of a non-finite pair."""
    if not antithetic:
        return finite
    pair_ok = finite[0::2] & finite[1::2]
    return jnp.repeat(pair_ok, 2)


def tree_all_finite_per_particle(tree: PyTree, num_particles: int) -> jax.Array:
    flags = [
        jnp.all(jnp.isfinite(leaf.reshape((num_particles, -1))), axis=1)
        for leaf in jax.tree.leaves(tree)
    ]
    return jnp.stack(flags).all(axis=0)


def reduce_estimate(
    contributions: PyTree,
    losses: jax.Array,
    finite: jax.Array,
    antithetic: bool,
    policy: str,
) -> tuple[PyTree, jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """Mean of the kept particles' contributions.

    Args:
      contributions: Theta-shaped leaves ``[N, ...]``, float32.
      losses: ``[N]`` truncation losses.
      finite: ``[N]`` per-particle finiteness of losses and contributions.
      antithetic: Whether particles ``2i`` and ``2i + 1`` are partners.
      policy: One of :data:`NONFINITE_POLICIES`.

    Returns:
      ``(estimate, keep, (mean_loss, loss_std, num_dropped_pairs))``; ``keep``
      is the ``[N]`` mask of particles whose pair was entirely finite.
    """
    keep = pair_mask(finite, antithetic)
    used = keep
    if policy == "skip_update":
        used = keep & jnp.all(keep)
    num_used = jnp.sum(used)
    denominator = jnp.maximum(num_used, 1).astype(jnp.float32)

    def average(leaf):
        mask = used.reshape((-1,) + (1,) * (leaf.ndim - 1))
        return jnp.sum(jnp.where(mask, leaf, 0.0), axis=0) / denominator

    estimate = jax.tree.map(average, contributions)
    safe_losses = jnp.where(keep, losses, 0.0)
    num_kept = jnp.maximum(jnp.sum(keep), 1).astype(jnp.float32)
    mean_loss = jnp.sum(safe_losses) / num_kept
    variance = jnp.sum(jnp.where(keep, (losses - mean_loss) ** 2, 0.0)) / num_kept
    pair_size = 2 if antithetic else 1
    num_dropped = (jnp.sum(~used) // pair_size).astype(jnp.int32)
    return estimate, keep, (mean_loss, jnp.sqrt(variance), num_dropped)


def add_estimate(updates: PyTree, estimate: PyTree) -> PyTree:
    """``updates + estimate`` in the dtypes of ``updates``."""
    return jax.tree.map(
        lambda u, g: (u.astype(jnp.float32) + g).astype(u.dtype), updates, estimate
    )

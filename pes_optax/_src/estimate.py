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
estimate is finite: should finite losses overflow in the weighted sum, the
whole estimate is zero and every pair counts as left out.
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
    pairs = finite.reshape(-1, 2)
    pair_ok = pairs[:, 0] & pairs[:, 1]
    return jnp.stack([pair_ok, pair_ok], axis=1).reshape(-1)


class ChunkSums(NamedTuple):
    """What a block of particles adds to the estimate."""

    total: PyTree  # theta-shaped float32: sum of the kept contributions
    num_kept: jax.Array  # int32 []: particles kept
    keep: jax.Array  # bool [C]: particles whose pair is entirely finite
    losses: jax.Array  # float32 [C]: truncation losses


def chunk_sums(
    contributions: PyTree, losses: jax.Array, finite: jax.Array, antithetic: bool
) -> ChunkSums:
    """Sums the contributions of the finite pairs of one block of particles."""
    keep = pair_mask(finite, antithetic)

    def masked_sum(leaf):
        mask = keep.reshape((-1,) + (1,) * (leaf.ndim - 1))
        return jnp.sum(jnp.where(mask, leaf, 0.0), axis=0)

    total = jax.tree.map(masked_sum, contributions)
    return ChunkSums(total, jnp.sum(keep, dtype=jnp.int32), keep, losses)


def finalize(
    sums: ChunkSums, antithetic: bool, policy: str
) -> tuple[PyTree, tuple[jax.Array, jax.Array, jax.Array]]:
    """The estimate and ``(mean_loss, loss_std, num_dropped_pairs)``.

    ``sums`` holds the totals over every block and the ``[N]`` masks and
    losses. The estimate is the mean over the kept particles; with
    ``"skip_update"`` it is zero as soon as any pair was left out.
    """
    keep, losses = sums.keep, sums.losses
    num_used = sums.num_kept
    if policy == "skip_update":
        num_used = jnp.where(jnp.all(keep), num_used, 0)
    denominator = jnp.maximum(num_used, 1).astype(jnp.float32)
    estimate = jax.tree.map(
        lambda t: jnp.where(num_used > 0, t / denominator, 0.0), sums.total
    )

    num_kept = jnp.maximum(jnp.sum(keep), 1).astype(jnp.float32)
    mean_loss = jnp.sum(jnp.where(keep, losses, 0.0)) / num_kept
    variance = jnp.sum(jnp.where(keep, (losses - mean_loss) ** 2, 0.0)) / num_kept
    pair_size = 2 if antithetic else 1
    num_dropped = (keep.size - sums.num_kept) // pair_size

    # Finite losses can still overflow in the weighted sum: drop it all then.
    overflow = ~jnp.all(
        jnp.stack([jnp.all(jnp.isfinite(t)) for t in jax.tree.leaves(estimate)])
    )
    estimate = jax.tree.map(lambda t: jnp.where(overflow, 0.0, t), estimate)
    num_dropped = jnp.where(overflow, keep.size // pair_size, num_dropped)
    return estimate, (mean_loss, jnp.sqrt(variance), num_dropped.astype(jnp.int32))


def reduce_estimate(
    contributions: PyTree,
    losses: jax.Array,
    finite: jax.Array,
    antithetic: bool,
    policy: str,
) -> tuple[PyTree, jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """:func:`chunk_sums` and :func:`finalize` for all particles at once.

    Returns:
      ``(estimate, keep, (mean_loss, loss_std, num_dropped_pairs))``.
    """
    sums = chunk_sums(contributions, losses, finite, antithetic)
    estimate, stats = finalize(sums, antithetic, policy)
    return estimate, sums.keep, stats


def add_estimate(updates: PyTree, estimate: PyTree) -> PyTree:
    """``updates + estimate`` in the dtypes of ``updates``."""
    return jax.tree.map(
        lambda u, g: (jnp.asarray(u, jnp.float32) + g).astype(jnp.result_type(u)),
        updates,
        estimate,
    )

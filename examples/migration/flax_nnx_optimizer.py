"""A pes_optax estimator inside ``flax.nnx.Optimizer``.

``nnx.Optimizer(model, tx, wrt=nnx.Param)`` calls ``tx.update(grads,
opt_state, params, **kwargs)`` with ``params`` = the model's ``nnx.Param``
values as plain arrays (``nnx.as_pure``), so ``tx = optax.chain(
pes_optax.pes(problem, ...), optax.adam(...))`` works as is, provided the
problem treats theta as that pure ``nnx.State``. Here the problem is built with
``pes_optax.recurrent_problem`` around ``nnx.merge(graphdef, theta)``, which
accepts either form (so does ``pes_optax.from_flax_nnx``). Keyword arguments
of ``optimizer.update(model, grads, data=...)`` reach the estimator too. Pass
zero ``grads``: the estimator adds its estimate to them.

The model: an ``nnx.GRUCell`` with a linear readout reads scikit-learn's 8x8
digits one pixel row at a time, 16 images side by side, and predicts the next
row (mean squared error); the meta-objective is the mean loss over inner
problems of ``horizon`` rows.

Run: python examples/migration/flax_nnx_optimizer.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import pes_optax


def digit_rows(num_streams: int) -> tuple[jax.Array, jax.Array]:
    """``(rows, next rows)`` of shape ``[length, num_streams, 8]``."""
    from sklearn.datasets import load_digits

    rows = np.asarray(load_digits().data, np.float32).reshape(-1, 8) / 16.0
    length = (len(rows) - 1) // num_streams
    inputs = rows[: length * num_streams].reshape(num_streams, length, 8)
    targets = rows[1 : length * num_streams + 1].reshape(num_streams, length, 8)
    return jnp.asarray(inputs.swapaxes(0, 1)), jnp.asarray(targets.swapaxes(0, 1))


class RowPredictor(nnx.Module):
    """GRU over pixel rows, linear readout of the next row."""

    def __init__(self, hidden_size: int, *, rngs: nnx.Rngs):
        self.cell = nnx.GRUCell(8, hidden_size, rngs=rngs)
        self.readout = nnx.Linear(hidden_size, 8, rngs=rngs)

    def __call__(self, carry, row):
        carry, hidden = self.cell(carry, row)
        return carry, self.readout(hidden)


def main(
    num_updates: int = 300,
    num_particles: int = 32,
    hidden_size: int = 16,
    num_streams: int = 16,
    horizon: int = 64,
    truncation_length: int = 8,
    seed: int = 0,
):
    """Trains the model with PES through ``nnx.Optimizer``.

    Args:
      num_updates: ``optimizer.update`` calls.
      num_particles: PES particles.
      hidden_size: GRU units.
      num_streams: Images read side by side.
      horizon: Rows per inner problem.
      truncation_length: Rows per truncation.
      seed: Seed of the model and the estimator.

    Returns:
      ``(initial, final)`` meta-objective (mean squared error per row).
    """
    sequence = digit_rows(num_streams)
    model = RowPredictor(hidden_size, rngs=nnx.Rngs(seed))
    graphdef, _ = nnx.split(model, nnx.Param)

    def apply_fn(theta, carry, row, key):
        del key
        return nnx.merge(graphdef, theta)(carry, row)

    problem = pes_optax.recurrent_problem(
        apply_fn,
        jnp.zeros((num_streams, hidden_size)),
        sequence,
        lambda prediction, target: jnp.mean((prediction - target) ** 2),
        horizon=horizon,
        random_start=True,
    )
    tx = optax.chain(
        pes_optax.pes(
            problem,
            num_particles=num_particles,
            sigma=0.01,
            truncation_length=truncation_length,
            key=jax.random.key(seed),
        ),
        optax.adam(1e-2),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer):
        zeros = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
        optimizer.update(model, zeros)  # PES adds its estimate to the zeros

    def meta_objective(model):
        theta = nnx.as_pure(nnx.state(model, nnx.Param))
        keys = jax.random.split(jax.random.key(seed + 1), 8)
        losses = [pes_optax.unroll(problem, theta, key) for key in keys]
        return float(jnp.mean(jnp.stack(losses)))

    initial = meta_objective(model)
    for _ in range(num_updates):
        train_step(model, optimizer)
    final = meta_objective(model)
    print(
        f"nnx.Optimizer + pes: {int(optimizer.step[...])} updates, mean squared "
        f"error per row {initial:.4f} -> {final:.4f}"
    )
    return initial, final


if __name__ == "__main__":
    main()

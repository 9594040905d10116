"""A pes_optax estimator with ``flax.training.train_state.TrainState``.

``TrainState.apply_gradients(grads=...)`` calls ``tx.update(grads, opt_state,
params)``: it passes ``params``, which is what a pes_optax estimator
differentiates, so ``tx = optax.chain(pes_optax.pes(problem, ...),
optax.adam(...))`` works with zero ``grads`` (the estimator adds its
estimate). It does not forward extra keyword arguments, though (its
``**kwargs`` replace fields of the state), so when the problem takes each
truncation's ``data=`` from the caller, call ``tx.update`` yourself, as
``step_with_data`` below does; both are shown.

The model: a Flax linen ``nn.GRUCell`` with a ``nn.Dense`` readout reads
scikit-learn's 8x8 digits one pixel row at a time, 16 images side by side,
and predicts the next row; built with ``pes_optax.from_flax_linen_rnn``.

Run: python examples/migration/flax_train_state.py
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import pes_optax


def digit_rows(num_streams: int) -> tuple[jax.Array, jax.Array]:
    """``(rows, next rows)`` of shape ``[length, num_streams, 8]``."""
    from sklearn.datasets import load_digits

    rows = np.asarray(load_digits().data, np.float32).reshape(-1, 8) / 16.0
    length = (len(rows) - 1) // num_streams
    inputs = rows[: length * num_streams].reshape(num_streams, length, 8)
    targets = rows[1 : length * num_streams + 1].reshape(num_streams, length, 8)
    return jnp.asarray(inputs.swapaxes(0, 1)), jnp.asarray(targets.swapaxes(0, 1))


class RowPredictor(nn.Module):
    """GRU over pixel rows, linear readout of the next row."""

    hidden_size: int

    @nn.compact
    def __call__(self, carry, row):
        carry, hidden = nn.GRUCell(self.hidden_size)(carry, row)
        return carry, nn.Dense(8)(hidden)


def squared_error(prediction, target):
    return jnp.mean((prediction - target) ** 2)


def main(
    num_updates: int = 300,
    num_particles: int = 32,
    hidden_size: int = 16,
    num_streams: int = 16,
    horizon: int = 64,
    truncation_length: int = 8,
    seed: int = 0,
):
    """Trains with PES through ``TrainState``, then by hand with ``data=``.

    Args:
      num_updates: Updates of each of the two loops.
      num_particles: PES particles.
      hidden_size: GRU units.
      num_streams: Images read side by side.
      horizon: Rows per inner problem.
      truncation_length: Rows per truncation.
      seed: Seed of the model and the estimators.

    Returns:
      ``{"initial", "apply_gradients", "with_data"}``: meta-objectives
      (mean squared error per row) before and after each loop.
    """
    inputs, targets = digit_rows(num_streams)
    model = RowPredictor(hidden_size)
    carry = jnp.zeros((num_streams, hidden_size))
    variables = model.init(jax.random.key(seed), carry, inputs[0])

    def make_tx(problem):
        estimator = pes_optax.pes(
            problem,
            num_particles=num_particles,
            sigma=0.01,
            truncation_length=truncation_length,
            key=jax.random.key(seed),
        )
        return optax.chain(estimator, optax.adam(1e-2))

    # 1. The sequence lives in the problem: apply_gradients is enough.
    problem = pes_optax.from_flax_linen_rnn(
        model,
        variables,
        (inputs, targets),
        squared_error,
        init_carry=carry,
        horizon=horizon,
        random_start=True,
    )
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=make_tx(problem)
    )

    @jax.jit
    def step(state):
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        return state.apply_gradients(grads=zeros)

    for _ in range(num_updates):
        state = step(state)

    # 2. Data from the caller (sequence=None): call tx.update by hand.
    streamed = pes_optax.from_flax_linen_rnn(
        model, variables, None, squared_error, init_carry=carry, horizon=horizon
    )
    by_hand = train_state.TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=make_tx(streamed)
    )

    @jax.jit
    def step_with_data(state, start):
        data = jax.tree.map(
            lambda a: jax.lax.dynamic_slice_in_dim(a, start, truncation_length),
            (inputs, targets),
        )
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        updates, opt_state = state.tx.update(
            zeros, state.opt_state, state.params, data=data
        )
        params = optax.apply_updates(state.params, updates)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state)

    # Walk through the whole stream; inner problems restart every horizon.
    usable = inputs.shape[0] // truncation_length * truncation_length
    for i in range(num_updates):
        start = (i * truncation_length) % usable
        by_hand = step_with_data(by_hand, start)

    def meta_objective(params):
        return float(pes_optax.unroll(problem, params, jax.random.key(seed + 1)))

    result = {
        "initial": meta_objective(variables["params"]),
        "apply_gradients": meta_objective(state.params),
        "with_data": meta_objective(by_hand.params),
    }
    print(
        f"TrainState + pes: mean squared error per row {result['initial']:.4f} "
        f"-> {result['apply_gradients']:.4f} (apply_gradients), "
        f"{result['with_data']:.4f} (tx.update with data=)"
    )
    return result


if __name__ == "__main__":
    main()

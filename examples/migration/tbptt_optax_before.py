"""BEFORE: a hand-written truncated-backprop (TBPTT) loop with optax.

A small tanh RNN reads the first ``horizon + 1`` pixels of scikit-learn's
8x8 digits (``load_digits``, in reading order, scaled to [0, 1]) and predicts
each next pixel. Every pass over the signal starts from a zero hidden state and is cut
into truncations of ``truncation_length`` steps; each truncation takes
``jax.grad`` of its mean squared error through its ``K`` steps, cuts the
graph on the carried hidden state with ``jax.lax.stop_gradient`` and takes
one Adam step. ``tbptt_optax_after.py`` is the same training with
``pes_optax.tbptt`` (and then ``pes_optax.pes``); both give the same
gradients and the same parameters.

Run: python examples/migration/tbptt_optax_before.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def make_signal(horizon: int) -> tuple[jax.Array, jax.Array]:
    """``(inputs, targets)``: the first digits' pixels, in reading order."""
    from sklearn.datasets import load_digits

    pixels = np.asarray(load_digits().data, np.float32).ravel() / 16.0
    signal = jnp.asarray(pixels[: horizon + 1])
    return signal[:-1], signal[1:]


def init_params(key: jax.Array, hidden_size: int) -> dict[str, jax.Array]:
    """Weights of ``h <- tanh(W h + u x + b)``, ``y = v . h + c``."""
    w_key, u_key, v_key = jax.random.split(key, 3)
    scale = 1.0 / jnp.sqrt(hidden_size)
    return {
        "w": scale * jax.random.normal(w_key, (hidden_size, hidden_size)),
        "u": jax.random.normal(u_key, (hidden_size,)),
        "b": jnp.zeros((hidden_size,)),
        "v": scale * jax.random.normal(v_key, (hidden_size,)),
        "c": jnp.zeros(()),
    }


def rnn_step(params, hidden, x):
    """One step: the new hidden state and the prediction of the next value."""
    hidden = jnp.tanh(params["w"] @ hidden + params["u"] * x + params["b"])
    return hidden, params["v"] @ hidden + params["c"]


def truncation_loss(params, hidden, inputs, targets):
    """Mean squared error over one truncation, and the final hidden state."""

    def body(hidden, xy):
        hidden, prediction = rnn_step(params, hidden, xy[0])
        return hidden, (prediction - xy[1]) ** 2

    hidden, losses = jax.lax.scan(body, hidden, (inputs, targets))
    return jnp.mean(losses), hidden


def main(
    num_updates: int = 600,
    horizon: int = 256,
    truncation_length: int = 16,
    hidden_size: int = 8,
    learning_rate: float = 1e-2,
    seed: int = 0,
):
    """Trains with hand-written TBPTT; returns (params, per-update grads, losses).

    Args:
      num_updates: Adam steps (one per truncation).
      horizon: Length of the signal, in steps, after which the hidden state
        resets.
      truncation_length: Steps per truncation; must divide ``horizon``.
      hidden_size: RNN units.
      learning_rate: Adam's learning rate.
      seed: Seed of the parameter initialisation.

    Returns:
      The final parameters, the list of gradients of every update and the
      list of truncation losses.
    """
    inputs, targets = make_signal(horizon)
    params = init_params(jax.random.key(seed), hidden_size)
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, hidden, start):
        xs = jax.lax.dynamic_slice_in_dim(inputs, start, truncation_length)
        ys = jax.lax.dynamic_slice_in_dim(targets, start, truncation_length)
        (loss, hidden), grads = jax.value_and_grad(truncation_loss, has_aux=True)(
            params, hidden, xs, ys
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        # Cut the graph: the next truncation starts from a constant state.
        return params, opt_state, jax.lax.stop_gradient(hidden), loss, grads

    hidden = jnp.zeros((hidden_size,))
    start, all_grads, losses = 0, [], []
    for _ in range(num_updates):
        if start == 0:
            hidden = jnp.zeros((hidden_size,))  # a new pass over the signal
        params, opt_state, hidden, loss, grads = train_step(
            params, opt_state, hidden, start
        )
        start = (start + truncation_length) % horizon
        all_grads.append(grads)
        losses.append(float(loss))
    window = max(1, horizon // truncation_length)
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(f"hand-written TBPTT: mean truncation loss {first:.4f} -> {last:.4f}")
    return params, all_grads, losses


if __name__ == "__main__":
    main()

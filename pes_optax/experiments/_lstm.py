"""A tiny character-level LSTM as an unrolled problem (the variance study's).

One LSTM layer reads one token per inner step and predicts the next one.
``theta`` is every weight of the model (embedding, the input and recurrent
maps, the decoder); the inner state is ``(h, c)``. The step loss is the
cross-entropy of the next token, and a truncation's loss is the sum over its
steps, so the meta-objective of ``T`` tokens is their summed cross-entropy.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

import pes_optax


class LSTMState(NamedTuple):
    """Inner state of the LSTM problem."""

    hidden: jax.Array  # float32 [hidden_size]
    cell: jax.Array  # float32 [hidden_size]


def init_lstm_theta(
    key: jax.Array,
    vocabulary_size: int,
    hidden_size: int = 5,
    embedding_size: int = 5,
) -> dict[str, jax.Array]:
    """Random LSTM weights, float32.

    The embedding is uniform in ``[-0.1, 0.1]``; each linear map is uniform in
    ``+-1/sqrt(fan_in)`` with the same range for its bias, except the decoder
    bias, which starts at zero.

    Args:
      key: Typed PRNG key.
      vocabulary_size: Number of distinct tokens ``V``.
      hidden_size: ``H``.
      embedding_size: ``E``.

    Returns:
      A dict of arrays: ``embedding [V, E]``, ``input_weights [E, 4H]``,
      ``input_bias [4H]``, ``hidden_weights [H, 4H]``, ``hidden_bias [4H]``,
      ``decoder_weights [H, V]``, ``decoder_bias [V]``.
    """
    keys = jax.random.split(key, 6)

    def uniform(key, shape, fan_in):
        bound = 1.0 / jnp.sqrt(fan_in)
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound)

    gates = 4 * hidden_size
    return {
        "embedding": jax.random.uniform(
            keys[0], (vocabulary_size, embedding_size), jnp.float32, -0.1, 0.1
        ),
        "input_weights": uniform(keys[1], (embedding_size, gates), embedding_size),
        "input_bias": uniform(keys[2], (gates,), embedding_size),
        "hidden_weights": uniform(keys[3], (hidden_size, gates), hidden_size),
        "hidden_bias": uniform(keys[4], (gates,), hidden_size),
        "decoder_weights": uniform(
            keys[5], (hidden_size, vocabulary_size), hidden_size
        ),
        "decoder_bias": jnp.zeros((vocabulary_size,), jnp.float32),
    }


def lstm_cell(
    theta: dict[str, jax.Array], state: LSTMState, token: jax.Array
) -> LSTMState:
    """One LSTM step: forget, input and output gates, then the candidate."""
    hidden_size = state.hidden.shape[-1]
    embedded = theta["embedding"][token]
    gates = (
        embedded @ theta["input_weights"]
        + theta["input_bias"]
        + state.hidden @ theta["hidden_weights"]
        + theta["hidden_bias"]
    )
    forget, write, output = jnp.split(jax.nn.sigmoid(gates[: 3 * hidden_size]), 3)
    candidate = jnp.tanh(gates[3 * hidden_size :])
    cell = forget * state.cell + write * candidate
    return LSTMState(hidden=output * jnp.tanh(cell), cell=cell)


def lstm_problem(num_tokens: int, hidden_size: int = 5) -> pes_optax.UnrolledProblem:
    """The next-token problem over one sequence of ``num_tokens`` inputs.

    ``data`` for one step is ``(input_token, target_token)``, int32 scalars;
    pass ``(tokens[:-1], tokens[1:])`` sliced per truncation.

    Args:
      num_tokens: ``T``, the horizon (the inner problem restarts after it).
      hidden_size: ``H``; must match ``theta``.

    Returns:
      An ``UnrolledProblem`` with ``loss_reduction="sum"``.
    """

    def init(key, theta):
        del key, theta
        zeros = jnp.zeros((hidden_size,), jnp.float32)
        return LSTMState(hidden=zeros, cell=zeros)

    def step(theta, state, key, data):
        del key
        token, target = data
        state = lstm_cell(theta, state, token)
        logits = state.hidden @ theta["decoder_weights"] + theta["decoder_bias"]
        loss = -jax.nn.log_softmax(logits)[target]
        return state, loss

    return pes_optax.UnrolledProblem(init=init, step=step, horizon=num_tokens)

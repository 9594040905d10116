"""A character-level Flax (linen) LSTM trained with PES and with truncated BPTT.

The text is real English shipped with Python itself: the docstrings of a fixed
list of standard-library modules and of their public functions and classes
(``inspect.getdoc``), lower-cased and restricted to a 34-character
vocabulary (the same text on every machine with the same Python version).
The first 90% trains, the last 10% is held out. The text is cut
into parallel streams, and the LSTM (theta = its ``params``) reads one
character per stream per inner step and predicts the next one.

Both estimators meet the same unrolled problem, built with
``pes_optax.from_flax_linen_rnn``: inner problems of ``horizon`` characters
from a random place in the training text, cut into truncations of
``truncation_length`` steps. Both run the same number of outer steps through
``pes_optax.Driver``, so each trajectory consumes the same number of inner
steps (``num_inner_steps``); PES runs ``num_particles`` perturbed copies of
it, forward only, where TBPTT runs one copy forward and backward. The script
prints the held-out loss, in bits per character, of both.

The same experiment with Haiku is ``examples/char_lstm_haiku.py``.

Run: python examples/char_lstm_flax.py   (about 2 minutes on 2 CPU cores)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from char_data import (
    VOCAB,
    as_streams,
    bits_per_char,
    compare_pes_and_tbptt,
    encode,
    stdlib_text,
)

import pes_optax


class CharLSTM(nn.Module):
    """One-hot characters -> LSTM -> next-character logits."""

    hidden_size: int

    @nn.compact
    def __call__(self, carry, tokens):
        inputs = jax.nn.one_hot(tokens, len(VOCAB))
        carry, hidden = nn.OptimizedLSTMCell(self.hidden_size)(carry, inputs)
        return carry, nn.Dense(len(VOCAB))(hidden)


def zero_carry(num_streams: int, hidden_size: int):
    return (jnp.zeros((num_streams, hidden_size)),) * 2


def main(
    num_outer_steps: int = 2000,
    num_particles: int = 64,
    hidden_size: int = 32,
    num_streams: int = 16,
    horizon: int = 200,
    truncation_length: int = 20,
    max_chars: int | None = None,
    heldout_steps: int = 500,
    sigma: float = 0.01,
    learning_rate: float = 1e-2,
    seed: int = 0,
) -> dict[str, float]:
    """Trains the LSTM with PES and with TBPTT; returns held-out bits per char.

    Args:
      num_outer_steps: Outer (Adam) steps of each estimator.
      num_particles: PES particles (antithetic pairs count twice).
      hidden_size: LSTM units.
      num_streams: Parallel text streams per inner step (the batch).
      horizon: Characters per inner problem.
      truncation_length: Characters per truncation, ``K``.
      max_chars: Use only the first this many characters of the text.
      heldout_steps: Steps of the held-out evaluation (per stream).
      sigma: PES perturbation scale.
      learning_rate: Adam's learning rate, the same for both estimators.
      seed: Seed of the model initialisation and the estimators.

    Returns:
      ``{"initial": ..., "pes": ..., "tbptt": ..., "pes_seconds": ...,
      "tbptt_seconds": ...}``, losses in bits per character.
    """
    tokens = encode(stdlib_text(max_chars))
    split = int(0.9 * len(tokens))
    train_seq = as_streams(tokens[:split], num_streams)
    heldout_seq = as_streams(tokens[split:], num_streams)
    heldout_steps = min(heldout_steps, heldout_seq[0].shape[0])

    # The model and its params (theta).
    model = CharLSTM(hidden_size)
    carry = zero_carry(num_streams, hidden_size)
    variables = model.init(jax.random.key(seed), carry, train_seq[0][0])
    theta = variables["params"]

    # Training and held-out problems over the same model.
    problem = pes_optax.from_flax_linen_rnn(
        model,
        variables,
        train_seq,
        bits_per_char,
        init_carry=carry,
        horizon=horizon,
        random_start=True,
    )
    heldout = pes_optax.from_flax_linen_rnn(
        model,
        variables,
        heldout_seq,
        bits_per_char,
        init_carry=carry,
        horizon=heldout_steps,
    )

    return compare_pes_and_tbptt(
        problem,
        heldout,
        theta,
        num_chars=len(tokens),
        num_outer_steps=num_outer_steps,
        num_particles=num_particles,
        sigma=sigma,
        truncation_length=truncation_length,
        learning_rate=learning_rate,
        seed=seed,
    )


if __name__ == "__main__":
    main()

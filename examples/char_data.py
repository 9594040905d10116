"""Shared pieces of the character-level LSTM examples.

The text is the docstrings of a fixed list of standard-library modules and
their public functions and classes, lower-cased and cut to a small character
vocabulary, so it is the same on any machine with the same Python version.
Used by ``char_lstm_flax.py`` and ``char_lstm_haiku.py``.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pes_optax

MODULES = (
    "abc argparse collections contextlib csv dataclasses datetime decimal "
    "difflib enum fractions functools heapq inspect itertools json logging os "
    "pathlib pickle random re shutil statistics string tempfile textwrap "
    "threading typing unittest uuid zipfile"
).split()
VOCAB = "\n .,'()-abcdefghijklmnopqrstuvwxyz"


def stdlib_text(max_chars: int | None = None) -> str:
    """Docstrings of ``MODULES`` and their public members, in a fixed order."""
    parts = []
    with warnings.catch_warnings():  # e.g. typing's deprecated submodules
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in MODULES:
            module = importlib.import_module(name)
            parts.append(inspect.getdoc(module) or "")
            for member_name, member in sorted(vars(module).items()):
                own = getattr(member, "__module__", None) == module.__name__
                kind = inspect.isfunction(member) or inspect.isclass(member)
                if own and kind and not member_name.startswith("_"):
                    parts.append(inspect.getdoc(member) or "")

    # Lower case, known characters only, single spaces.
    text = "\n".join(parts).lower()
    text = "".join(c for c in text if c in VOCAB)
    text = re.sub(r" +", " ", text)
    return text[:max_chars]


def encode(text: str) -> np.ndarray:
    """Characters to int32 token ids in ``VOCAB``."""
    lookup = {c: i for i, c in enumerate(VOCAB)}
    return np.asarray([lookup[c] for c in text], np.int32)


def as_streams(tokens: np.ndarray, num_streams: int) -> tuple[jax.Array, jax.Array]:
    """``(inputs, targets)`` of shape ``[length, num_streams]``, next-char."""
    length = (len(tokens) - 1) // num_streams
    inputs = tokens[: length * num_streams].reshape(num_streams, length).T
    targets = tokens[1 : length * num_streams + 1].reshape(num_streams, length).T
    return jnp.asarray(inputs), jnp.asarray(targets)


def bits_per_char(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean cross-entropy in bits over the streams."""
    nats = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return nats.mean() / math.log(2.0)


def train(estimator, optimizer, theta, evaluate, num_outer_steps, eval_every):
    """Runs ``estimator`` through a Driver; returns (driver, seconds)."""
    driver = pes_optax.Driver(
        estimator, optimizer, theta, eval_fn=evaluate, eval_every=eval_every
    )
    start = time.perf_counter()
    driver.run(num_outer_steps, steps_per_call=eval_every, progress=False)
    jax.block_until_ready(driver.theta)
    return driver, time.perf_counter() - start


def compare_pes_and_tbptt(
    problem,
    heldout,
    theta,
    *,
    num_chars,
    num_outer_steps,
    num_particles,
    sigma,
    truncation_length,
    learning_rate,
    seed,
):
    """Trains ``theta`` with PES and with TBPTT on the same inner-step budget.

    Both run ``num_outer_steps`` Adam steps through a ``pes_optax.Driver``;
    ``heldout`` is the problem whose fresh unroll gives the held-out loss.
    Prints one line and returns the held-out losses (bits per character) of
    the initial and both learned thetas, with the training seconds.
    """

    def evaluate(theta, key):
        return pes_optax.unroll(heldout, theta, key)

    eval_every = max(1, num_outer_steps // 10)
    key = jax.random.key(seed + 1)
    pes_driver, pes_seconds = train(
        pes_optax.pes(
            problem,
            num_particles=num_particles,
            sigma=sigma,
            truncation_length=truncation_length,
            key=key,
        ),
        optax.adam(learning_rate),
        theta,
        evaluate,
        num_outer_steps,
        eval_every,
    )
    tbptt_driver, tbptt_seconds = train(
        pes_optax.tbptt(problem, truncation_length=truncation_length, key=key),
        optax.adam(learning_rate),
        theta,
        evaluate,
        num_outer_steps,
        eval_every,
    )

    eval_key = jax.random.key(seed + 2)
    result = {
        "initial": float(evaluate(theta, eval_key)),
        "pes": float(evaluate(pes_driver.theta, eval_key)),
        "tbptt": float(evaluate(tbptt_driver.theta, eval_key)),
        "pes_seconds": pes_seconds,
        "tbptt_seconds": tbptt_seconds,
    }
    steps = pes_driver.metrics[-1]["num_inner_steps"]
    print(
        f"{num_chars} chars, {steps} inner steps per trajectory; held-out "
        f"bits/char: initial {result['initial']:.3f}, "
        f"PES {result['pes']:.3f} ({pes_seconds:.0f} s), "
        f"TBPTT {result['tbptt']:.3f} ({tbptt_seconds:.0f} s)"
    )
    return result

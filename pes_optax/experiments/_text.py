"""Character-level token sequences from text that ships with Python.

The variance study needs real text without a download. The corpus is the Zen
of Python, decoded from the ROT13 string in the standard library's ``this``
module source (read and parsed, not imported, since importing ``this``
prints), followed by the docstrings of a fixed list of standard-library
modules. It is deterministic for a given Python version. Whitespace runs
become single spaces, as in a character-level corpus built from split lines.
"""

from __future__ import annotations

import ast
import codecs
import importlib
import importlib.util
import inspect
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Modules whose docstrings follow the Zen of Python, in this order.
DOCSTRING_MODULES = ("collections", "string", "itertools", "json")
SCENARIOS = ("real", "random", "repeat")
RANDOM_TOKENS_SEED = 5  # as the PES paper's random sequences


class TokenSequence(NamedTuple):
    """Integer tokens and the characters they stand for."""

    tokens: np.ndarray  # int32 [num_tokens + 1]: inputs are [:-1], targets [1:]
    vocabulary: str  # vocabulary[i] is the character of token i


def zen_of_python() -> str:
    """The Zen of Python, decoded from the source of the ``this`` module.

    Returns:
      The text, about 850 characters.
    """
    spec = importlib.util.find_spec("this")
    if spec is None or spec.origin is None:
        raise RuntimeError("The standard-library module `this` was not found.")
    tree = ast.parse(pathlib.Path(spec.origin).read_text(encoding="utf-8"))
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id == "s"
            and isinstance(node.value, ast.Constant)
        ):
            return codecs.decode(node.value.value, "rot13")
    raise RuntimeError(f"No ROT13 string `s` found in {spec.origin}.")


def stdlib_corpus() -> str:
    """The Zen of Python then the :data:`DOCSTRING_MODULES` docstrings.

    Returns:
      One string with every whitespace run replaced by one space (about
      6000 characters on CPython 3.11).
    """
    parts = [zen_of_python()]
    for name in DOCSTRING_MODULES:
        parts.append(inspect.getdoc(importlib.import_module(name)) or "")
    return " ".join(" ".join(parts).split())


def character_tokens(num_tokens: int, scenario: str = "real") -> TokenSequence:
    """``num_tokens + 1`` character tokens for one of :data:`SCENARIOS`.

    The vocabulary is the sorted set of characters of the first
    ``num_tokens + 1`` characters of :func:`stdlib_corpus`, for every
    scenario, so that the model (and ``theta``) is the same across them:

    * ``"real"``: the corpus itself;
    * ``"random"``: tokens uniform over the vocabulary (key 5);
    * ``"repeat"``: the corpus's first character repeated.

    Args:
      num_tokens: ``T``, the number of inputs (and of targets).
      scenario: One of :data:`SCENARIOS`.

    Returns:
      A ``TokenSequence``.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"`scenario` must be one of {SCENARIOS}, got {scenario!r}.")
    text = stdlib_corpus()
    if not 1 <= num_tokens < len(text):
        raise ValueError(
            f"`num_tokens` must be in [1, {len(text) - 1}] (the corpus has "
            f"{len(text)} characters), got {num_tokens}."
        )
    text = text[: num_tokens + 1]
    vocabulary = "".join(sorted(set(text)))
    real = np.array([vocabulary.index(c) for c in text], np.int32)
    if scenario == "real":
        tokens = real
    elif scenario == "random":
        key = jax.random.key(RANDOM_TOKENS_SEED)
        tokens = np.asarray(
            jax.random.randint(key, real.shape, 0, len(vocabulary), jnp.int32)
        )
    else:
        tokens = np.full_like(real, real[0])
    return TokenSequence(tokens, vocabulary)

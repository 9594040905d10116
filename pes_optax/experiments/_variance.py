"""Estimator error against the number of truncations per inner problem.

The PES paper's variance study (section 4): ``theta`` is every weight of a
tiny LSTM, held fixed, and one inner problem is ``T`` tokens. For each
truncation length ``K`` an estimator runs the ``T / K`` truncations of one
inner problem from a fresh start and the **sum** of its per-truncation
estimates is compared with a reference gradient ``g_ref``:

.. math::
  \\mathrm{variance}(K) = \\frac{1}{R} \\sum_{r=1}^{R}
  \\frac{\\|\\hat g_r - g_{\\mathrm{ref}}\\|^2}{\\|g_{\\mathrm{ref}}\\|^2}

over ``R`` repeats with fresh keys. ``g_ref`` is the exact gradient of the
summed cross-entropy from :func:`pes_optax.bptt`; with ``sigma = 1e-3`` the
Gaussian smoothing changes the gradient by a relative ``O(sigma^2)``, far
below the estimators' errors. For the unbiased estimators (PES, NRES, PES-A)
the quantity is their variance; for truncated ES it also holds the squared
bias. NRES runs with ``stagger=False`` so that every particle's truncations
line up with the inner problem.
"""

from __future__ import annotations

import csv
import functools
import json
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import pes_optax
from pes_optax.experiments import _lstm, _plots, _text

Factory = Callable[..., Any]

# Each estimator as ``(problem, num_particles, sigma, truncation_length, key)``.
ESTIMATOR_FACTORIES: dict[str, Factory] = {
    "pes": lambda problem, n, sigma, k, key: pes_optax.pes(
        problem, num_particles=n, sigma=sigma, truncation_length=k, key=key
    ),
    "nres": lambda problem, n, sigma, k, key: pes_optax.nres(
        problem,
        num_particles=n,
        sigma=sigma,
        truncation_length=k,
        key=key,
        stagger=False,
    ),
    "truncated_es": lambda problem, n, sigma, k, key: pes_optax.truncated_es(
        problem, num_particles=n, sigma=sigma, truncation_length=k, key=key
    ),
    "pes_a": lambda problem, n, sigma, k, key: pes_optax.pes_a(
        problem, num_particles=n, sigma=sigma, truncation_length=k, key=key
    ),
}
DEFAULT_TRUNCATION_LENGTHS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class VarianceSettings(NamedTuple):
    """Sizes of the variance study (defaults: the reduced 2-core budget)."""

    num_tokens: int = 1000  # T
    truncation_lengths: tuple[int, ...] = DEFAULT_TRUNCATION_LENGTHS  # divide T
    estimators: tuple[str, ...] = ("pes", "nres", "truncated_es")
    scenarios: tuple[str, ...] = ("real", "random")
    num_particles: int = 100  # N, both members of each antithetic pair
    sigma: float = 1e-3
    num_repeats: int = 8  # R
    hidden_size: int = 5
    embedding_size: int = 5
    seed: int = 0


class VarianceResult(NamedTuple):
    """What :func:`variance_study` returns."""

    rows: list[dict[str, Any]]  # scenario, estimator, K, T/K, variance, sem
    summary: dict[str, Any]  # settings, reference norms, growth, wall time


def check_settings(settings: VarianceSettings) -> VarianceSettings:
    """Validates ``settings``; raises ``ValueError`` naming the bad field."""
    unknown = sorted(set(settings.estimators) - set(ESTIMATOR_FACTORIES))
    if unknown:
        raise ValueError(
            f"`estimators` must be among {sorted(ESTIMATOR_FACTORIES)}, got {unknown}."
        )
    bad = sorted(set(settings.scenarios) - set(_text.SCENARIOS))
    if bad:
        raise ValueError(f"`scenarios` must be among {_text.SCENARIOS}, got {bad}.")
    lengths = settings.truncation_lengths
    if not lengths or any(k < 1 or settings.num_tokens % k for k in lengths):
        divisors = [k for k in range(1, settings.num_tokens + 1)]
        divisors = [k for k in divisors if settings.num_tokens % k == 0]
        raise ValueError(
            f"`truncation_lengths` must divide num_tokens={settings.num_tokens}, "
            f"got {list(lengths)}; pick from {divisors}."
        )
    if settings.num_repeats < 2:
        raise ValueError(f"`num_repeats` must be >= 2, got {settings.num_repeats}.")
    return settings


def summed_estimate(
    transform: Any,
    theta: Any,
    tokens: jax.Array,
    truncation_length: int,
) -> Any:
    """The sum of ``transform``'s estimates over one inner problem.

    Runs the ``T / K`` truncations of ``tokens`` (``T + 1`` ints) from a fresh
    ``transform.init(theta)`` with ``theta`` fixed. Each ``update`` adds its
    estimate to the incoming updates, so the running total is passed in.

    Args:
      transform: An estimator built for the LSTM problem with horizon ``T``.
      theta: The LSTM weights.
      tokens: ``[T + 1]`` int32 tokens.
      truncation_length: ``K``.

    Returns:
      A ``theta``-shaped pytree.
    """
    num_truncations = (tokens.shape[0] - 1) // truncation_length
    shape = (num_truncations, truncation_length)
    data = (tokens[:-1].reshape(shape), tokens[1:].reshape(shape))

    def body(carry, chunk):
        total, state = carry
        total, state = transform.update(total, state, theta, data=chunk)
        return (total, state), None

    zeros = jax.tree.map(jnp.zeros_like, theta)
    (total, _), _ = jax.lax.scan(body, (zeros, transform.init(theta)), data)
    return total


def _reference_gradient(problem, theta, tokens) -> jax.Array:
    """Exact gradient of the summed cross-entropy, flattened."""
    transform = pes_optax.bptt(problem, key=jax.random.key(0))
    zeros = jax.tree.map(jnp.zeros_like, theta)
    grads, _ = jax.jit(transform.update)(
        zeros, transform.init(theta), theta, data=(tokens[:-1], tokens[1:])
    )
    return ravel_pytree(grads)[0]


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _flat_summed_estimate(
    factory, problem, settings, truncation_length, key, theta, tokens
):
    """One repeat's summed estimate, flattened like ``ravel_pytree(theta)``."""
    transform = factory(
        problem, settings.num_particles, settings.sigma, truncation_length, key
    )
    estimate = summed_estimate(transform, theta, tokens, truncation_length)
    return ravel_pytree(estimate)[0]


def _normalised_errors(
    factory, problem, settings, truncation_length, theta, tokens, reference, keys
) -> np.ndarray:
    """``||g_r - g_ref||^2 / ||g_ref||^2`` for each repeat key.

    The repeats run one after another under one compiled function: batching
    them with ``vmap`` roughly triples XLA's compile time on CPU, which
    dominates at these sizes.
    """
    reference = np.asarray(reference, np.float64)
    errors = []
    for key in keys:
        estimate = _flat_summed_estimate(
            factory, problem, settings, truncation_length, key, theta, tokens
        )
        difference = np.asarray(estimate, np.float64) - reference
        errors.append(np.sum(difference**2) / np.sum(reference**2))
    return np.array(errors)


def variance_study(
    settings: VarianceSettings | None = None,
    progress: bool = False,
) -> VarianceResult:
    """Measures each estimator's normalised error against ``T / K``.

    Args:
      settings: Sizes; see :class:`VarianceSettings` (its defaults when
        ``None``).
      progress: Show a tqdm progress bar on stderr.

    Returns:
      A ``VarianceResult`` with one row per (scenario, estimator, ``K``):
      ``variance`` (the mean over repeats), ``standard_error`` and
      ``wall_time_s``.
    """
    settings = check_settings(VarianceSettings() if settings is None else settings)
    start = time.perf_counter()
    problem = _lstm.lstm_problem(settings.num_tokens, settings.hidden_size)
    base_key = jax.random.key(settings.seed)
    configurations = [
        (scenario, name, k)
        for scenario in settings.scenarios
        for name in settings.estimators
        for k in settings.truncation_lengths
    ]
    from tqdm.auto import tqdm

    rows, references = [], {}
    for scenario, name, k in tqdm(
        configurations, disable=not progress, desc="variance"
    ):
        if scenario not in references:
            references[scenario] = _scenario(settings, scenario, problem)
        theta, tokens, reference = references[scenario]
        keys = _repeat_keys(base_key, scenario, name, k, settings.num_repeats)
        began = time.perf_counter()
        errors = _normalised_errors(
            ESTIMATOR_FACTORIES[name],
            problem,
            settings,
            k,
            theta,
            tokens,
            reference,
            keys,
        )
        rows.append(
            {
                "scenario": scenario,
                "estimator": name,
                "truncation_length": k,
                "num_truncations": settings.num_tokens // k,
                "variance": float(np.mean(errors)),
                "standard_error": float(np.std(errors, ddof=1) / np.sqrt(errors.size)),
                "wall_time_s": time.perf_counter() - began,
            }
        )
    summary = {
        "settings": settings._asdict(),
        "reference": "exact gradient of the summed cross-entropy (pes_optax.bptt)",
        "num_parameters": int(references[settings.scenarios[0]][2].size),
        "reference_norms": {
            s: float(jnp.linalg.norm(ref)) for s, (_, _, ref) in references.items()
        },
        "growth": growth(rows),
        "wall_time_s": time.perf_counter() - start,
    }
    return VarianceResult(rows, summary)


def _repeat_keys(base_key, scenario, name, truncation_length, num_repeats):
    """Keys that depend on the configuration only, not on what else runs."""
    key = jax.random.fold_in(base_key, _text.SCENARIOS.index(scenario))
    key = jax.random.fold_in(key, sorted(ESTIMATOR_FACTORIES).index(name))
    key = jax.random.fold_in(key, truncation_length)
    return jax.random.split(key, num_repeats)


def _scenario(settings: VarianceSettings, scenario: str, problem):
    """``theta`` (seed 42, as the paper), tokens and the reference gradient."""
    sequence = _text.character_tokens(settings.num_tokens, scenario)
    theta = _lstm.init_lstm_theta(
        jax.random.key(42),
        len(sequence.vocabulary),
        settings.hidden_size,
        settings.embedding_size,
    )
    tokens = jnp.asarray(sequence.tokens)
    return theta, tokens, _reference_gradient(problem, theta, tokens)


def growth(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Variance at the most truncations over that at the fewest.

    Args:
      rows: Rows of :func:`variance_study`.

    Returns:
      ``{scenario: {estimator: ratio}}``.
    """
    result: dict[str, dict[str, float]] = {}
    for row in rows:
        group = [
            r
            for r in rows
            if r["scenario"] == row["scenario"] and r["estimator"] == row["estimator"]
        ]
        fewest = min(group, key=lambda r: r["num_truncations"])
        most = max(group, key=lambda r: r["num_truncations"])
        result.setdefault(row["scenario"], {})[row["estimator"]] = (
            most["variance"] / fewest["variance"]
        )
    return result


def write_outputs(result: VarianceResult, out_dir: str | pathlib.Path) -> dict:
    """Writes ``variance.csv``, ``variance.md``, ``variance.json`` and the plot.

    Args:
      result: From :func:`variance_study`.
      out_dir: Output folder (created if missing).

    Returns:
      ``{"csv": path, "markdown": path, "json": path, "plot": path}``.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "csv": out_dir / "variance.csv",
        "markdown": out_dir / "variance.md",
        "json": out_dir / "variance.json",
        "plot": out_dir / "variance.png",
    }
    with open(files["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(result.rows[0]))
        writer.writeheader()
        writer.writerows(result.rows)
    files["markdown"].write_text(markdown_table(result.rows))
    payload = {"summary": result.summary, "rows": result.rows}
    files["json"].write_text(json.dumps(payload, indent=2) + "\n")
    settings = result.summary["settings"]
    _plots.plot_variance(
        result.rows,
        files["plot"],
        f"tiny LSTM, T={settings['num_tokens']}, N={settings['num_particles']}, "
        f"sigma={settings['sigma']:g}, {settings['num_repeats']} repeats",
    )
    return files


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per ``K``, one column per (scenario, estimator): mean +- s.e.

    Args:
      rows: Rows of :func:`variance_study`.

    Returns:
      A Markdown table.
    """
    columns = list(dict.fromkeys((r["scenario"], r["estimator"]) for r in rows))
    lengths = sorted({r["truncation_length"] for r in rows})
    cells = {(r["scenario"], r["estimator"], r["truncation_length"]): r for r in rows}
    header = ["K", "T/K"] + [f"{s} {e}" for s, e in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for k in lengths:
        entries = []
        for scenario, name in columns:
            row = cells.get((scenario, name, k))
            entries.append(
                ""
                if row is None
                else f"{row['variance']:.3g} ± {row['standard_error']:.2g}"
            )
        count = next(r["num_truncations"] for r in rows if r["truncation_length"] == k)
        lines.append("| " + " | ".join([str(k), str(count), *entries]) + " |")
    return "\n".join(lines) + "\n"

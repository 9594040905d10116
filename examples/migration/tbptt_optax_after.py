"""AFTER: the loop of ``tbptt_optax_before.py`` with ``pes_optax.tbptt``, then PES.

What moves where:

* the RNN step and the per-step loss become a ``pes_optax.recurrent_problem``
  (``apply_fn(theta, carry, x, key) -> (carry, prediction)`` and
  ``loss_fn``), with ``horizon`` = the length after which the hidden state
  resets;
* slicing the signal, carrying the hidden state, ``stop_gradient`` and the
  reset live in the estimator's state;
* ``jax.grad`` + ``optimizer.update`` become one ``update`` of
  ``optax.chain(estimator, optax.adam(...))``, fed zero gradients (the
  estimator adds its estimate).

Switching the estimator is then a change of one call: ``pes_optax.tbptt(
problem, truncation_length=K, key=key)`` becomes ``pes_optax.pes(problem,
num_particles=N, sigma=s, truncation_length=K, key=key)``, which is unbiased
where truncated backprop is not (it sees how theta shaped the carried state).

Run: python examples/migration/tbptt_optax_after.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pes_optax


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


def make_problem(horizon: int, hidden_size: int) -> pes_optax.UnrolledProblem:
    """The RNN on the signal as an unrolled problem (theta = the weights)."""

    def apply_fn(theta, hidden, x, key):
        del key  # deterministic model
        hidden = jnp.tanh(theta["w"] @ hidden + theta["u"] * x + theta["b"])
        return hidden, theta["v"] @ hidden + theta["c"]

    return pes_optax.recurrent_problem(
        apply_fn,
        jnp.zeros((hidden_size,)),
        make_signal(horizon),
        lambda prediction, target: (prediction - target) ** 2,
        horizon=horizon,  # the hidden state resets after a pass
        loss_reduction="mean",  # mean over a truncation, as before
    )


def make_estimator(name, problem, truncation_length, key, num_particles=64):
    """The one place that names the estimator."""
    if name == "tbptt":
        return pes_optax.tbptt(problem, truncation_length=truncation_length, key=key)
    if name == "pes":
        return pes_optax.pes(
            problem,
            num_particles=num_particles,
            sigma=0.01,
            truncation_length=truncation_length,
            key=key,
        )
    raise ValueError(f"`name` must be 'tbptt' or 'pes', got {name!r}.")


def main(
    num_updates: int = 600,
    horizon: int = 256,
    truncation_length: int = 16,
    hidden_size: int = 8,
    learning_rate: float = 1e-2,
    estimators: tuple[str, ...] = ("tbptt", "pes"),
    num_particles: int = 64,
    seed: int = 0,
):
    """Trains with each estimator; returns ``{name: (params, losses)}``.

    Args:
      num_updates: Adam steps (one per truncation).
      horizon: Steps per pass over the signal.
      truncation_length: Steps per truncation; must divide ``horizon``.
      hidden_size: RNN units.
      learning_rate: Adam's learning rate.
      estimators: Which of ``"tbptt"`` and ``"pes"`` to run.
      num_particles: PES particles.
      seed: Seed of the parameter initialisation.

    Returns:
      For each estimator, the final parameters and the truncation losses
      (``mean_loss`` of the estimator's diagnostics).
    """
    problem = make_problem(horizon, hidden_size)
    initial = init_params(jax.random.key(seed), hidden_size)
    eval_key = jax.random.key(seed + 1)
    results = {}
    for name in estimators:
        optimizer = optax.chain(
            make_estimator(
                name, problem, truncation_length, jax.random.key(0), num_particles
            ),
            optax.adam(learning_rate),
        )

        @jax.jit
        def train_step(params, opt_state, optimizer=optimizer):
            zeros = jax.tree.map(jnp.zeros_like, params)
            updates, opt_state = optimizer.update(zeros, opt_state, params)
            loss = pes_optax.find_diagnostics(opt_state).mean_loss
            return optax.apply_updates(params, updates), opt_state, loss

        params, opt_state, losses = initial, optimizer.init(initial), []
        for _ in range(num_updates):
            params, opt_state, loss = train_step(params, opt_state)
            losses.append(float(loss))
        before = float(pes_optax.unroll(problem, initial, eval_key))
        after = float(pes_optax.unroll(problem, params, eval_key))
        print(f"{name:5s}: mean loss over a pass {before:.4f} -> {after:.4f}")
        results[name] = (params, losses)
    return results


if __name__ == "__main__":
    main()

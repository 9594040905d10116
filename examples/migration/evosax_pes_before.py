"""BEFORE: PES with evosax's ``PersistentES`` ask/tell loop (evosax 0.3).

The meta-problem: tune the learning rate and the momentum (theta = their log
and logit) of full-batch heavy-ball gradient descent on a least-squares fit
to scikit-learn's diabetes data (``load_diabetes``: 442 patients, 10
standardised features); the meta-objective is the sum of the training losses
of ``horizon`` descent steps.

With evosax, the user keeps the inner state of every population member,
unrolls each member ``K`` steps after ``ask``, hands the truncation losses to
``tell`` as fitness and resets the inner states once ``horizon`` steps have
passed (evosax resets its perturbation sums at the same time, from its
``T``/``K`` parameters). ``evosax_pes_after.py`` is the same training with
``pes_optax.pes``.

Needs evosax (``pip install evosax``); the pes_optax version does not.

Run: python examples/migration/evosax_pes_before.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from evosax.algorithms import PersistentES


def load_regression() -> tuple[jax.Array, jax.Array]:
    """Diabetes features and target, standardised."""
    from sklearn.datasets import load_diabetes

    features, target = load_diabetes(return_X_y=True, scaled=False)
    features = (features - features.mean(0)) / features.std(0)
    target = (target - target.mean()) / target.std()
    return jnp.asarray(features, jnp.float32), jnp.asarray(target, jnp.float32)


def make_descent_step(features, target):
    """``(theta, (w, m)) -> ((w, m), loss)``: one heavy-ball step."""

    def loss_fn(w):
        return 0.5 * jnp.mean((features @ w - target) ** 2)

    def descent_step(theta, inner_state):
        w, velocity = inner_state
        velocity = jax.nn.sigmoid(theta[1]) * velocity + jax.grad(loss_fn)(w)
        w = w - jnp.exp(theta[0]) * velocity
        return (w, velocity), loss_fn(w)

    return descent_step


def main(
    num_generations: int = 400,
    population_size: int = 32,
    horizon: int = 100,
    truncation_length: int = 10,
    sigma: float = 0.1,
    learning_rate: float = 0.03,
    seed: int = 0,
):
    """Runs evosax's PersistentES; returns (initial theta, learned theta).

    Args:
      num_generations: ask/tell rounds, one truncation each.
      population_size: Members (antithetic pairs count twice).
      horizon: Descent steps per inner run, ``T``.
      truncation_length: Descent steps per truncation, ``K``; divides ``T``.
      sigma: Perturbation standard deviation.
      learning_rate: Adam's learning rate on theta.
      seed: Seed of the strategy's key.

    Returns:
      The initial and the learned theta, ``[log lr, logit momentum]``.
    """
    features, target = load_regression()
    descent_step = make_descent_step(features, target)
    start = (jnp.zeros(features.shape[1]), jnp.zeros(features.shape[1]))

    def meta_objective(theta):
        body = lambda state, _: descent_step(theta, state)  # noqa: E731
        return float(jnp.sum(jax.lax.scan(body, start, length=horizon)[1]))

    theta = jnp.asarray([jnp.log(0.01), 0.0])
    strategy = PersistentES(
        population_size=population_size,
        solution=theta,
        optimizer=optax.adam(learning_rate),
        std_schedule=optax.constant_schedule(sigma),
    )
    es_params = strategy.default_params.replace(T=horizon, K=truncation_length)
    key = jax.random.key(seed)
    es_state = strategy.init(key, theta, es_params)

    @jax.jit
    def unroll_members(population, inner_states):
        """``K`` steps of every member from its own inner state."""

        def one_member(member, inner_state):
            body = lambda state, _: descent_step(member, state)  # noqa: E731
            inner_state, losses = jax.lax.scan(
                body, inner_state, length=truncation_length
            )
            return inner_state, jnp.sum(losses)

        return jax.vmap(one_member)(population, inner_states)

    # The user's bookkeeping: one inner state per member, and the step count.
    def fresh_inner_states():
        return jax.tree.map(lambda x: jnp.tile(x, (population_size, 1)), start)

    inner_states, inner_step = fresh_inner_states(), 0
    for _ in range(num_generations):
        key, ask_key, tell_key = jax.random.split(key, 3)
        population, es_state = strategy.ask(ask_key, es_state, es_params)
        inner_states, fitness = unroll_members(population, inner_states)
        es_state, _ = strategy.tell(tell_key, population, fitness, es_state, es_params)
        inner_step += truncation_length
        if inner_step >= horizon:  # a new inner run for every member
            inner_states, inner_step = fresh_inner_states(), 0

    learned = strategy.get_mean(es_state)
    print(
        f"evosax PersistentES: lr {float(jnp.exp(theta[0])):.3f} -> "
        f"{float(jnp.exp(learned[0])):.3f}, momentum "
        f"{float(jax.nn.sigmoid(theta[1])):.3f} -> "
        f"{float(jax.nn.sigmoid(learned[1])):.3f}; meta-objective "
        f"{meta_objective(theta):.3f} -> {meta_objective(learned):.3f}"
    )
    return theta, learned


if __name__ == "__main__":
    main()

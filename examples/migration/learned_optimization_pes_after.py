"""AFTER: meta-training a learned optimizer with PES, the pes_optax way.

``learned_optimization_pes_before.py.txt`` sketches how this is set up with
learned_optimization's ``TruncatedPES`` (a task, a learned optimizer, a
truncated step with a truncation schedule, a gradient estimator, worker
weights and a gradient learner). In pes_optax the inner training run is an
``UnrolledProblem`` whose theta is the learned optimizer's weights,
``pes_optax.pes`` is an optax transformation, and ``pes_optax.Driver`` (or
``optax.chain(estimator, optimizer)`` in your loop) does the outer updates.

The learned optimizer: per parameter, momentum ``m <- b m + (1 - b) g`` and
the step ``-lr (m + MLP(g, m))``, with ``lr = exp(theta["log_lr"])``, ``b =
sigmoid(theta["logit_beta"])`` and a tiny MLP (8 tanh units, output weights
starting at zero, so it starts as plain momentum SGD). The inner task: a
least-squares fit to scikit-learn's diabetes data (442 patients, 10
standardised features) on minibatches of 32, scored by the loss on a fresh
minibatch after each step. The script prints the meta-objective (mean inner
loss over ``horizon`` steps) of the initial and the learned optimizer.

Run: python examples/migration/learned_optimization_pes_after.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import pes_optax


def load_regression() -> tuple[jax.Array, jax.Array]:
    """Diabetes features and target, standardised."""
    from sklearn.datasets import load_diabetes

    features, target = load_diabetes(return_X_y=True, scaled=False)
    features = (features - features.mean(0)) / features.std(0)
    target = (target - target.mean()) / target.std()
    return jnp.asarray(features, jnp.float32), jnp.asarray(target, jnp.float32)


def init_learned_optimizer(key: jax.Array, hidden_size: int = 8) -> dict:
    """Theta: the learned optimizer's weights (momentum SGD at the start)."""
    return {
        "log_lr": jnp.log(jnp.asarray(0.01)),
        "logit_beta": jnp.asarray(0.0),
        "w1": 0.5 * jax.random.normal(key, (2, hidden_size)),
        "b1": jnp.zeros((hidden_size,)),
        "w2": jnp.zeros((hidden_size,)),
    }


def learned_update(theta, grads, momentum):
    """The learned optimizer's step for every parameter, and new momentum."""
    beta = jax.nn.sigmoid(theta["logit_beta"])
    momentum = beta * momentum + (1.0 - beta) * grads
    features = jnp.stack([grads, momentum], axis=-1)
    correction = jnp.tanh(features @ theta["w1"] + theta["b1"]) @ theta["w2"]
    return -jnp.exp(theta["log_lr"]) * (momentum + correction), momentum


def make_problem(horizon: int, batch_size: int) -> pes_optax.UnrolledProblem:
    """Inner training on the diabetes fit, driven by the learned optimizer."""
    features, target = load_regression()

    def loss_fn(w, key):
        index = jax.random.randint(key, (batch_size,), 0, target.shape[0])
        return 0.5 * jnp.mean((features[index] @ w - target[index]) ** 2)

    def init(key, theta):
        w = 0.1 * jax.random.normal(key, (features.shape[1],))
        return w, jnp.zeros_like(w)

    def step(theta, inner_state, key, data):
        w, momentum = inner_state
        train_key, eval_key = jax.random.split(key)
        grads = jax.grad(loss_fn)(w, train_key)
        update, momentum = learned_update(theta, grads, momentum)
        w = w + update
        return (w, momentum), loss_fn(w, eval_key)

    return pes_optax.UnrolledProblem(
        init=init, step=step, horizon=horizon, loss_reduction="mean"
    )


def main(
    num_outer_steps: int = 500,
    num_particles: int = 32,
    horizon: int = 100,
    truncation_length: int = 10,
    batch_size: int = 32,
    seed: int = 0,
):
    """Meta-trains the learned optimizer with PES.

    Args:
      num_outer_steps: Outer (Adam) steps on theta.
      num_particles: PES particles.
      horizon: Inner training steps per inner problem.
      truncation_length: Inner steps per truncation.
      batch_size: Minibatch size of the inner task.
      seed: Seed of theta's initialisation and the estimator.

    Returns:
      ``(initial, final)`` meta-objective, averaged over 16 inner runs.
    """
    problem = make_problem(horizon, batch_size)
    theta = init_learned_optimizer(jax.random.key(seed))
    driver = pes_optax.Driver(
        pes_optax.pes(
            problem,
            num_particles=num_particles,
            sigma=0.05,
            truncation_length=truncation_length,
            key=jax.random.key(seed + 1),
        ),
        optax.adam(0.03),
        theta,
    )
    driver.run(num_outer_steps, steps_per_call=50, progress=False)

    @jax.jit
    def meta_objective(theta):
        keys = jax.random.split(jax.random.key(seed + 2), 16)
        return jnp.mean(jax.vmap(lambda k: pes_optax.unroll(problem, theta, k))(keys))

    initial, final = float(meta_objective(theta)), float(meta_objective(driver.theta))
    learned = driver.theta
    print(
        f"learned optimizer: lr {float(jnp.exp(theta['log_lr'])):.3f} -> "
        f"{float(jnp.exp(learned['log_lr'])):.3f}; mean inner loss "
        f"{initial:.4f} -> {final:.4f}"
    )
    return initial, final


if __name__ == "__main__":
    main()

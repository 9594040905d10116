"""AFTER: the evosax ``PersistentES`` loop of ``evosax_pes_before.py`` with pes_optax.

What moves where:

* the descent step the user unrolled for each member becomes the ``step`` of
  a ``pes_optax.UnrolledProblem`` (``init`` starts an inner run, ``horizon``
  is evosax's ``T``);
* the per-member inner states, the step count and the resets that the user
  kept next to ``ask``/``tell`` live in the estimator's state, per particle;
* ``PersistentES(population_size, optimizer, std_schedule)`` with ``T``/``K``
  becomes ``pes_optax.pes(problem, num_particles, sigma, truncation_length)``
  followed by the optimizer, and ask, unroll, tell is one outer step of
  ``pes_optax.Driver`` (or one ``update`` of ``optax.chain(estimator,
  optimizer)`` in your own loop);
* fitness is the truncation's summed loss (``loss_reduction="sum"``, the
  default), and ``sigma`` may be a schedule, like evosax's ``std_schedule``.

The problem is the one of the before script: heavy-ball gradient descent on a
least-squares fit to scikit-learn's diabetes data, theta = ``[log lr, logit
momentum]``.

Run: python examples/migration/evosax_pes_after.py
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


def make_problem(horizon: int) -> pes_optax.UnrolledProblem:
    """Heavy-ball descent on the least-squares fit as an unrolled problem."""
    features, target = load_regression()

    def loss_fn(w):
        return 0.5 * jnp.mean((features @ w - target) ** 2)

    def init(key, theta):
        return jnp.zeros(features.shape[1]), jnp.zeros(features.shape[1])

    def step(theta, inner_state, key, data):
        w, velocity = inner_state
        velocity = jax.nn.sigmoid(theta[1]) * velocity + jax.grad(loss_fn)(w)
        w = w - jnp.exp(theta[0]) * velocity
        return (w, velocity), loss_fn(w)

    return pes_optax.UnrolledProblem(init=init, step=step, horizon=horizon)


def main(
    num_generations: int = 400,
    population_size: int = 32,
    horizon: int = 100,
    truncation_length: int = 10,
    sigma: float = 0.1,
    learning_rate: float = 0.03,
    seed: int = 0,
):
    """Runs PES through the Driver; returns (initial theta, learned theta).

    Args:
      num_generations: Outer steps, one truncation each.
      population_size: Particles (antithetic pairs count twice).
      horizon: Descent steps per inner run.
      truncation_length: Descent steps per truncation.
      sigma: Perturbation standard deviation.
      learning_rate: Adam's learning rate on theta.
      seed: Seed of the estimator's key.

    Returns:
      The initial and the learned theta, ``[log lr, logit momentum]``.
    """
    problem = make_problem(horizon)
    theta = jnp.asarray([jnp.log(0.01), 0.0])
    driver = pes_optax.Driver(
        pes_optax.pes(
            problem,
            num_particles=population_size,
            sigma=sigma,
            truncation_length=truncation_length,
            key=jax.random.key(seed),
        ),
        optax.adam(learning_rate),
        theta,
    )
    driver.run(num_generations, steps_per_call=50, progress=False)

    learned = driver.theta
    key = jax.random.key(0)  # unused: the problem draws nothing

    def meta_objective(theta):
        return float(pes_optax.unroll(problem, theta, key))

    print(
        f"pes_optax.pes: lr {float(jnp.exp(theta[0])):.3f} -> "
        f"{float(jnp.exp(learned[0])):.3f}, momentum "
        f"{float(jax.nn.sigmoid(theta[1])):.3f} -> "
        f"{float(jax.nn.sigmoid(learned[1])):.3f}; meta-objective "
        f"{meta_objective(theta):.3f} -> {meta_objective(learned):.3f}"
    )
    return theta, learned


if __name__ == "__main__":
    main()

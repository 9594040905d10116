"""The README's quickstart: PES dropped into an optax chain.

A scalar theta drives a damped linear system for 20 steps; the meta-objective
is the sum of squared distances to 1. PES estimates its gradient from
truncations of 5 steps, and Adam takes an outer step after each truncation.

Run: python examples/quickstart.py
"""

import jax
import jax.numpy as jnp
import optax

import pes_optax


def make_problem(horizon: int = 20) -> pes_optax.UnrolledProblem:
    """A damped linear system s <- 0.9 s + theta with loss (s - 1)^2."""

    def init(key, theta):
        return jnp.zeros(())

    def step(theta, state, key, data):
        state = 0.9 * state + theta
        return state, (state - 1.0) ** 2

    return pes_optax.UnrolledProblem(init=init, step=step, horizon=horizon)


def main(num_iterations: int = 300, num_particles: int = 32, seed: int = 0):
    """Trains theta with PES and returns (initial, final) meta-objectives."""
    problem = make_problem()
    optimizer = optax.chain(
        pes_optax.pes(
            problem,
            num_particles=num_particles,
            sigma=0.05,
            truncation_length=5,
            key=jax.random.key(seed),
        ),
        optax.adam(1e-2),
    )
    theta = jnp.asarray(0.5, jnp.float32)
    opt_state = optimizer.init(theta)

    @jax.jit
    def train_step(theta, opt_state):
        grads = jnp.zeros_like(theta)  # PES adds its estimate to these
        updates, opt_state = optimizer.update(grads, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state

    eval_key = jax.random.key(seed + 1)
    initial = float(pes_optax.unroll(problem, theta, eval_key))
    for _ in range(num_iterations):
        theta, opt_state = train_step(theta, opt_state)
    final = float(pes_optax.unroll(problem, theta, eval_key))
    print(f"theta = {float(theta):.4f}; meta-objective {initial:.3f} -> {final:.3f}")
    return initial, final


if __name__ == "__main__":
    main()

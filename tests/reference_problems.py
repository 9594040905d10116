"""The problem and helpers shared by the tests of the reference estimators.

``test_backprop.py`` (bptt, tbptt) and ``test_online.py`` (rtrl, uoro) check
their estimators on the same small nonlinear system.
"""

import jax
import jax.numpy as jnp
import numpy as np

import pes_optax

A = jnp.array([[0.9, 0.2, 0.0], [-0.1, 0.8, 0.3], [0.0, 0.2, 0.7]])
B = jnp.array([[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]])
TARGET = jnp.array([1.0, -2.0, 0.5])
THETA = {"w": jnp.array([0.3, -0.2]), "b": jnp.asarray(0.1, jnp.float32)}


def make_problem(horizon, loss_reduction="sum", noisy=False, counter=None):
    """Nonlinear three-unit system; ``noisy`` draws from the keys.

    The state holds an integer step count next to the floating state, and
    ``init`` depends on theta. ``counter`` (a list) counts traces of ``step``.
    """

    def init(key, theta):
        s = jnp.full((3,), 0.5) + 0.2 * theta["b"]
        if noisy:
            s = s + 0.1 * jax.random.normal(key, (3,))
        return {"s": s, "t": jnp.zeros((), jnp.int32)}

    def step(theta, state, key, data):
        if counter is not None:
            counter.append(1)
        drive = 0.0 if data is None else data
        s = jnp.tanh(A @ state["s"] + B @ theta["w"] + theta["b"] + drive)
        if noisy:
            s = s + 0.05 * jax.random.normal(key, (3,))
        loss = 0.5 * jnp.sum((s - TARGET) ** 2)
        return {"s": s, "t": state["t"] + 1}, loss

    return pes_optax.UnrolledProblem(
        init=init, step=step, horizon=horizon, loss_reduction=loss_reduction
    )


def zeros_like_theta(theta=THETA):
    return jax.tree.map(jnp.zeros_like, theta)


def run_updates(transform, num_updates, theta=THETA, data=None):
    """Estimates of ``num_updates`` consecutive updates and the last state."""
    state = transform.init(theta)
    update = jax.jit(transform.update)
    estimates = []
    for index in range(num_updates):
        step_data = None if data is None else data[index]
        estimate, state = update(zeros_like_theta(theta), state, theta, data=step_data)
        estimates.append(estimate)
    return estimates, state


def assert_trees_close(actual, expected, rtol, atol):
    jax.tree.map(
        lambda a, e: np.testing.assert_allclose(a, e, rtol=rtol, atol=atol),
        actual,
        expected,
    )

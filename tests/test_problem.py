"""The unrolled-problem protocol and the fixed-theta unroll."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pes_optax


def _counter_problem(reduction="sum", horizon=4):
    return pes_optax.UnrolledProblem(
        init=lambda key, theta: jnp.zeros(()),
        step=lambda theta, s, key, data: (s + 1.0, theta * (s + 1.0)),
        horizon=horizon,
        loss_reduction=reduction,
    )


@pytest.mark.parametrize(
    ("reduction", "expected"), [("sum", 10.0), ("mean", 2.5), ("last", 4.0)]
)
def test_unroll_reductions(reduction, expected):
    value = pes_optax.unroll(_counter_problem(reduction), 1.0, jax.random.key(0))
    np.testing.assert_allclose(value, expected)


def test_unroll_is_differentiable():
    grad = jax.grad(
        lambda t: pes_optax.unroll(_counter_problem(), t, jax.random.key(0))
    )(jnp.asarray(2.0))
    np.testing.assert_allclose(grad, 10.0)


def test_unroll_passes_data_slices():
    problem = pes_optax.UnrolledProblem(
        init=lambda key, theta: jnp.zeros(()),
        step=lambda theta, s, key, data: (s + data, theta * data),
        horizon=3,
    )
    value = pes_optax.unroll(problem, 2.0, jax.random.key(0), data=jnp.arange(3.0))
    np.testing.assert_allclose(value, 6.0)


def test_unroll_needs_num_steps_for_endless_problems():
    with pytest.raises(ValueError, match="num_steps"):
        pes_optax.unroll(_counter_problem(horizon=None), 1.0, jax.random.key(0))
    value = pes_optax.unroll(
        _counter_problem(horizon=None), 1.0, jax.random.key(0), num_steps=2
    )
    np.testing.assert_allclose(value, 3.0)


def test_problem_rejects_non_callables():
    with pytest.raises(TypeError, match="init"):
        pes_optax.UnrolledProblem(init=3, step=lambda *a: a)
    with pytest.raises(TypeError, match="step"):
        pes_optax.UnrolledProblem(init=lambda *a: a, step=None)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_steps": 0}, "num_steps"),
        ({"num_steps": -3}, "num_steps"),
        ({"num_steps": 3, "data": jnp.zeros(4)}, "data.*num_steps=3"),
    ],
)
def test_unroll_checks_its_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pes_optax.unroll(_counter_problem(), 1.0, 0, **kwargs)


def test_unroll_accepts_an_int_seed():
    np.testing.assert_allclose(pes_optax.unroll(_counter_problem(), 1.0, 0), 10.0)


def test_step_with_a_vector_loss_is_refused():
    problem = pes_optax.UnrolledProblem(
        lambda key, theta: jnp.zeros(()),
        lambda theta, s, key, data: (s, jnp.ones(3)),
        horizon=2,
    )
    with pytest.raises(ValueError, match="scalar loss.*\\(3,\\)"):
        pes_optax.unroll(problem, 1.0, 0)

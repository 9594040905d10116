"""Tests of the online estimators, pes_optax.rtrl and pes_optax.uoro."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_problems import (
    THETA,
    make_problem,
    run_updates,
    zeros_like_theta,
)
from reference_problems import assert_trees_close as _assert_close

import pes_optax

RTOL = 1e-5  # float32 agreement of forward- and reverse-mode exact gradients
ATOL = 1e-5
Z = 3.0  # standard errors allowed in the statistical checks


def assert_trees_close(actual, expected, rtol=RTOL, atol=ATOL):
    _assert_close(actual, expected, rtol, atol)


def tree_sum(trees):
    return jax.tree.map(lambda *xs: sum(xs), *trees)


def _bptt_gradient(problem, data):
    transform = pes_optax.bptt(problem, key=0)
    estimate, _ = transform.update(
        zeros_like_theta(), transform.init(THETA), THETA, data=data
    )
    return estimate


@pytest.mark.parametrize("truncation_length", [1, 4, 6])
def test_rtrl_sums_to_bptt_across_resets(truncation_length):
    # Two inner problems of 6 steps; with K=4 one resets mid-truncation.
    horizon, total_steps = 6, 12
    num_updates = total_steps // truncation_length
    problem = make_problem(horizon)
    data = jax.random.normal(jax.random.key(5), (total_steps, 3))
    transform = pes_optax.rtrl(problem, truncation_length=truncation_length, key=0)
    estimates, state = run_updates(
        transform, num_updates, data=data.reshape(num_updates, truncation_length, 3)
    )
    summed = tree_sum(estimates)
    expected = jax.tree.map(
        jnp.add,
        _bptt_gradient(problem, data[:horizon]),
        _bptt_gradient(problem, data[horizon:]),
    )
    assert_trees_close(summed, expected, rtol=RTOL, atol=ATOL)
    assert int(state.step) == 0
    assert int(state.diagnostics.num_inner_steps) == total_steps


@pytest.mark.parametrize("name", ["rtrl", "uoro"])
def test_full_truncation_walks_the_bptt_keys(name):
    # One truncation per inner problem; the first step has exact tangents for
    # UORO only when init ignores theta, so compare the losses and, for RTRL,
    # the gradient.
    horizon = 5
    problem = make_problem(horizon, noisy=True)
    factory = getattr(pes_optax, name)
    estimates, state = run_updates(
        factory(problem, truncation_length=horizon, key=9), 2
    )
    reference, reference_state = run_updates(pes_optax.bptt(problem, key=9), 2)
    np.testing.assert_allclose(
        state.diagnostics.mean_loss,
        reference_state.diagnostics.mean_loss,
        rtol=RTOL,
        atol=ATOL,
    )
    if name == "rtrl":
        assert_trees_close(estimates, reference, rtol=RTOL, atol=ATOL)


def linear_problem(horizon):
    """A small linear system with quadratic losses; init depends on theta."""
    a = jnp.array([[0.9, 0.2, 0.0], [-0.1, 0.8, 0.3], [0.0, 0.2, 0.7]])
    b = jnp.array([[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]])
    target = jnp.array([1.0, -2.0, 0.5])

    def step(theta, s, key, data):
        s = a @ s + b @ theta["w"] + theta["b"]
        return s, 0.5 * jnp.sum((s - target) ** 2)

    return pes_optax.UnrolledProblem(
        init=lambda key, theta: jnp.full((3,), 0.5) + 0.2 * theta["b"],
        step=step,
        horizon=horizon,
    )


def _uoro_z_scores(horizon, truncation_length, num_seeds):
    """|mean - exact| / SE per component of summed UORO estimates, and SE."""
    problem = linear_problem(horizon)
    num_updates = horizon // truncation_length

    def one_seed(key):
        transform = pes_optax.uoro(
            problem, truncation_length=truncation_length, key=key
        )
        state = transform.init(THETA)
        total = zeros_like_theta()
        for _ in range(num_updates):
            total, state = transform.update(total, state, THETA)
        return jnp.concatenate([total["w"], total["b"][None]])

    keys = jax.random.split(jax.random.key(2024), num_seeds)
    samples = np.asarray(jax.jit(jax.vmap(one_seed))(keys), np.float64)
    exact = jax.grad(pes_optax.unroll, argnums=1)(problem, THETA, jax.random.key(0))
    exact = np.concatenate([exact["w"], exact["b"][None]])
    standard_error = samples.std(axis=0, ddof=1) / np.sqrt(num_seeds)
    return np.abs(samples.mean(axis=0) - exact) / standard_error, standard_error, exact


def test_uoro_is_unbiased():
    # 4000 seeds, two truncations of 3 steps per inner problem: every
    # component within Z=3 standard errors of the exact gradient, and each
    # standard error under 5% of the exact gradient's norm, so the check
    # has the power to see a bias (dropping init's rank-one term fails it).
    z_scores, standard_error, exact = _uoro_z_scores(6, 3, 4000)
    assert np.all(z_scores < Z), (z_scores, standard_error, exact)
    assert np.all(standard_error < 0.05 * np.linalg.norm(exact)), (
        standard_error,
        exact,
    )


@pytest.mark.slow
def test_uoro_is_unbiased_with_one_step_truncations():
    # 20000 seeds, 12 one-step truncations per inner problem.
    z_scores, standard_error, exact = _uoro_z_scores(12, 1, 20000)
    assert np.all(z_scores < Z), (z_scores, standard_error, exact)
    assert np.all(standard_error < 0.05 * np.linalg.norm(exact)), (
        standard_error,
        exact,
    )


def test_uoro_is_noisy_but_rtrl_is_not():
    problem = linear_problem(6)
    exact = jax.grad(pes_optax.unroll, argnums=1)(problem, THETA, jax.random.key(0))
    rtrl, _ = run_updates(pes_optax.rtrl(problem, truncation_length=3, key=0), 2)
    rtrl_sum = tree_sum(rtrl)
    assert_trees_close(rtrl_sum, exact)
    uoro, _ = run_updates(pes_optax.uoro(problem, truncation_length=3, key=0), 2)
    uoro_sum = tree_sum(uoro)
    assert not np.allclose(uoro_sum["w"], exact["w"], rtol=1e-3)


def _estimator(name, problem, key=1):
    return getattr(pes_optax, name)(problem, truncation_length=2, key=key)


@pytest.mark.parametrize("name", ["rtrl", "uoro"])
def test_nonfinite_truncation_is_dropped_and_restarts(name):
    transform = _estimator(name, make_problem(8))
    update = jax.jit(transform.update)
    state = transform.init(THETA)
    updates = {"w": jnp.array([1.0, 2.0]), "b": jnp.asarray(3.0)}
    _, state = update(updates, state, THETA, data=jnp.zeros((2, 3)))

    poisoned = jnp.zeros((2, 3)).at[0, 2].set(jnp.nan)
    out, state = update(updates, state, THETA, data=poisoned)
    assert_trees_close(out, updates, rtol=0, atol=0)
    assert int(state.step) == 0 and int(state.diagnostics.num_nonfinite) == 1

    out, state = update(updates, state, THETA, data=jnp.zeros((2, 3)))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))
    assert int(state.diagnostics.total_nonfinite) == 1
    assert int(state.step) == 2


@pytest.mark.parametrize("name", ["rtrl", "uoro"])
def test_errors(name):
    factory = getattr(pes_optax, name)
    with pytest.raises(ValueError, match="truncation_length"):
        factory(make_problem(3), truncation_length=4, key=0)
    with pytest.raises(TypeError, match="truncation_length"):
        factory(make_problem(3), truncation_length=1.5, key=0)
    # The checks shared with bptt and tbptt are in test_backprop.py
    # (test_update_errors); a theta of another size than the state's J:
    transform = _estimator(name, make_problem(6))
    state = transform.init(THETA)
    bigger = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    with pytest.raises(ValueError, match="params"):
        transform.update(zeros_like_theta(bigger), state, bigger)


@pytest.mark.parametrize("name", ["rtrl", "uoro"])
def test_endless_problem(name):
    # horizon=None: never resets; RTRL's one-step estimates sum to the
    # gradient of a 40-step unroll, and UORO runs and stays finite.
    problem = linear_problem(None)
    transform = getattr(pes_optax, name)(problem, key=3)
    estimates, state = run_updates(transform, 40)
    assert int(state.step) == 40
    if name == "rtrl":
        exact = jax.grad(pes_optax.unroll, argnums=1)(
            problem, THETA, jax.random.key(0), num_steps=40
        )
        assert_trees_close(tree_sum(estimates), exact, rtol=1e-4, atol=ATOL)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(estimates))


@pytest.mark.parametrize("name", ["rtrl", "uoro"])
def test_dtypes_follow_updates(name):
    theta = jax.tree.map(lambda x: x.astype(jnp.bfloat16), THETA)
    transform = _estimator(name, make_problem(4))
    update, state = jax.jit(transform.update), transform.init(theta)
    for _ in range(3):
        out, state = update(zeros_like_theta(theta), state, theta)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))

"""Tests of the backprop references, pes_optax.bptt and pes_optax.tbptt.

The jit, scan and determinism checks here cover rtrl and uoro too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference_problems import (
    THETA,
    make_problem,
    run_updates,
    zeros_like_theta,
)
from reference_problems import assert_trees_close as _assert_close

import pes_optax

RTOL = 1e-5  # float32 agreement of two exact gradients computed differently
ATOL = 1e-6


def assert_trees_close(actual, expected, rtol=RTOL, atol=ATOL):
    _assert_close(actual, expected, rtol, atol)


@pytest.mark.parametrize("loss_reduction", ["sum", "mean", "last"])
@pytest.mark.parametrize("checkpoint_every", [None, 2, 5, 10])
def test_bptt_equals_grad_of_unroll(loss_reduction, checkpoint_every):
    horizon = 10
    problem = make_problem(horizon, loss_reduction)
    data = jax.random.normal(jax.random.key(3), (horizon, 3))
    transform = pes_optax.bptt(problem, key=0, checkpoint_every=checkpoint_every)
    estimate, state = transform.update(
        zeros_like_theta(), transform.init(THETA), THETA, data=data
    )
    exact = jax.grad(pes_optax.unroll, argnums=1)(
        problem, THETA, jax.random.key(7), data=data
    )
    assert_trees_close(estimate, exact)
    expected_loss = pes_optax.unroll(problem, THETA, jax.random.key(7), data=data)
    np.testing.assert_allclose(
        state.diagnostics.mean_loss, expected_loss, rtol=RTOL, atol=ATOL
    )
    assert int(state.diagnostics.num_inner_steps) == horizon


def test_bptt_checkpointing_rematerialises():
    problem = make_problem(8)
    transform = pes_optax.bptt(problem, key=0, checkpoint_every=4)
    state = transform.init(THETA)
    jaxpr = str(jax.make_jaxpr(transform.update)(zeros_like_theta(), state, THETA))
    assert "checkpoint" in jaxpr or "remat" in jaxpr
    plain = str(
        jax.make_jaxpr(pes_optax.bptt(problem, key=0).update)(
            zeros_like_theta(), state, THETA
        )
    )
    assert "checkpoint" not in plain and "remat" not in plain


def test_tbptt_full_truncation_equals_bptt():
    horizon = 6
    problem = make_problem(horizon, noisy=True)
    key = jax.random.key(11)
    full, _ = run_updates(pes_optax.bptt(problem, key=key), 3)
    truncated, state = run_updates(
        pes_optax.tbptt(problem, truncation_length=horizon, key=key), 3
    )
    assert_trees_close(truncated, full, rtol=1e-6, atol=1e-7)
    assert int(state.step) == 0
    assert float(jnp.abs(full[0]["b"] - full[1]["b"])) > 1e-3  # keys differ


def test_bptt_with_checkpointing_equals_plain_under_noise():
    problem = make_problem(12, noisy=True)
    plain, _ = run_updates(pes_optax.bptt(problem, key=5), 2)
    remat, _ = run_updates(pes_optax.bptt(problem, key=5, checkpoint_every=3), 2)
    assert_trees_close(remat, plain)


def test_tbptt_walks_the_truncated_es_trajectory():
    problem = make_problem(6, noisy=True)
    key = jax.random.key(2)
    _, state = run_updates(pes_optax.tbptt(problem, truncation_length=4, key=key), 3)
    reference = pes_optax.truncated_es(
        problem, num_particles=2, sigma=0.1, truncation_length=4, key=key
    )
    _, reference_state = run_updates(reference, 3)
    assert_trees_close(state.inner_state, reference_state.inner_state)
    assert int(state.step) == int(reference_state.step) == 0


def _truncated_reference(problem, theta, data, truncation_length, num_updates):
    """TBPTT by hand for a key-free problem: a list of per-update gradients."""
    horizon = problem.horizon
    state = problem.init(None, theta)
    gradients = []
    for update in range(num_updates):

        def truncation_loss(theta, incoming, update=update):
            s, total = incoming, 0.0
            for k in range(truncation_length):
                global_step = update * truncation_length + k
                if global_step % horizon == 0:
                    s = problem.init(None, theta)
                s, loss = problem.step(theta, s, None, data[global_step])
                total = total + loss
            return total, s

        gradient, state = jax.grad(truncation_loss, has_aux=True)(theta, state)
        gradients.append(gradient)
    return gradients


def test_tbptt_resets_mid_truncation():
    horizon, truncation_length, num_updates = 6, 4, 3
    problem = make_problem(horizon)
    data = jax.random.normal(jax.random.key(4), (num_updates, truncation_length, 3))
    transform = pes_optax.tbptt(problem, truncation_length=truncation_length, key=0)
    estimates, state = run_updates(transform, num_updates, data=data)
    expected = _truncated_reference(
        problem, THETA, data.reshape(-1, 3), truncation_length, num_updates
    )
    assert_trees_close(estimates, expected)
    assert int(state.step) == 0
    assert int(state.inner_state["t"]) == horizon


def influence_balancing(horizon):
    """Influence balancing (Tallec and Ollivier): theta's short-term effect on
    unit 0 is +1 per step, its long-run effect is -6."""
    size = 23
    a = 0.5 * (jnp.eye(size) + jnp.eye(size, k=1))
    b = jnp.concatenate([jnp.ones(10), -jnp.ones(13)])

    def step(theta, s, key, data):
        s = a @ s + theta * b
        return s, 0.5 * (s[0] - 1.0) ** 2

    return pes_optax.UnrolledProblem(
        init=lambda key, theta: jnp.ones(size), step=step, horizon=horizon
    )


def _tbptt_episode_gradient(problem, theta, truncation_length):
    transform = pes_optax.tbptt(
        problem, truncation_length=truncation_length, key=jax.random.key(0)
    )

    def body(state, _):
        estimate, state = transform.update(jnp.zeros(()), state, theta)
        return state, estimate

    num_updates = problem.horizon // truncation_length
    _, estimates = jax.lax.scan(body, transform.init(theta), length=num_updates)
    return jnp.sum(estimates)


def test_tbptt_short_truncations_are_biased():
    problem = influence_balancing(100)
    theta = jnp.asarray(0.0)
    exact = jax.grad(pes_optax.unroll, argnums=1)(problem, theta, jax.random.key(0))
    full = _tbptt_episode_gradient(problem, theta, 100)
    np.testing.assert_allclose(full, exact, rtol=RTOL, atol=1e-4)
    assert float(exact) > 100.0
    for truncation_length in (1, 10):
        biased = _tbptt_episode_gradient(problem, theta, truncation_length)
        # The summed truncated gradients point the wrong way.
        assert float(biased) < -10.0, (truncation_length, float(biased))


REFERENCES = ["bptt", "tbptt", "rtrl", "uoro"]


def _estimator(name, problem, key=1):
    if name == "bptt":
        return pes_optax.bptt(problem, key=key)
    return getattr(pes_optax, name)(problem, truncation_length=3, key=key)


@pytest.mark.parametrize("name", REFERENCES)
def test_jit_without_retrace_and_inside_scan(name):
    counter = []
    problem = make_problem(6, noisy=True, counter=counter)
    transform = optax.chain(_estimator(name, problem), optax.sgd(1e-2))
    update = jax.jit(transform.update)

    # Python loop over a jitted update: traced once.
    theta, state = THETA, transform.init(THETA)
    for index in range(4):
        updates, state = update(zeros_like_theta(), state, theta)
        theta = optax.apply_updates(theta, updates)
        if index == 0:
            traces_after_first = len(counter)
    assert len(counter) == traces_after_first

    # The same iterations inside lax.scan give the same theta.
    def body(carry, _):
        theta, state = carry
        updates, state = transform.update(zeros_like_theta(), state, theta)
        return (optax.apply_updates(theta, updates), state), None

    (scanned, _), _ = jax.jit(
        lambda: jax.lax.scan(body, (THETA, transform.init(THETA)), length=4)
    )()
    # Forward-mode estimators agree to float32 round-off at a looser atol.
    assert_trees_close(scanned, theta, atol=ATOL if name in ("bptt", "tbptt") else 1e-5)


@pytest.mark.parametrize("name", REFERENCES)
def test_deterministic_given_key(name):
    problem = make_problem(6, noisy=True)
    first, _ = run_updates(_estimator(name, problem), 3)
    again, _ = run_updates(_estimator(name, problem), 3)
    jax.tree.map(np.testing.assert_array_equal, first, again)
    different, _ = run_updates(_estimator(name, problem, key=2), 3)
    assert not np.allclose(first[-1]["w"], different[-1]["w"])


def test_nonfinite_truncation_is_dropped_and_restarts():
    problem = make_problem(8)
    transform = pes_optax.tbptt(problem, truncation_length=2, key=0)
    update = jax.jit(transform.update)
    state = transform.init(THETA)
    updates = {"w": jnp.array([1.0, 2.0]), "b": jnp.asarray(3.0)}
    _, state = update(updates, state, THETA, data=jnp.zeros((2, 3)))
    assert int(state.step) == 2

    poisoned = jnp.zeros((2, 3)).at[1, 0].set(jnp.nan)
    out, state = update(updates, state, THETA, data=poisoned)
    assert_trees_close(out, updates, rtol=0, atol=0)
    assert int(state.step) == 0
    assert int(state.diagnostics.num_nonfinite) == 1

    out, state = update(updates, state, THETA, data=jnp.zeros((2, 3)))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))
    assert int(state.step) == 2 and int(state.diagnostics.num_nonfinite) == 0
    assert int(state.diagnostics.total_nonfinite) == 1
    assert int(state.diagnostics.num_inner_steps) == 6


def test_bptt_nonfinite_is_dropped():
    problem = make_problem(4)
    transform = pes_optax.bptt(problem, key=0)
    poisoned = jnp.zeros((4, 3)).at[2, 1].set(jnp.nan)
    out, state = transform.update(
        zeros_like_theta(), transform.init(THETA), THETA, data=poisoned
    )
    assert_trees_close(out, zeros_like_theta(), rtol=0, atol=0)
    assert int(state.diagnostics.num_nonfinite) == 1


def test_dtypes_follow_updates():
    problem = make_problem(4)
    theta = jax.tree.map(lambda x: x.astype(jnp.bfloat16), THETA)
    transform = pes_optax.tbptt(problem, truncation_length=2, key=0)
    out, _ = transform.update(zeros_like_theta(theta), transform.init(theta), theta)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))


def test_factory_errors():
    with pytest.raises(ValueError, match="horizon"):
        pes_optax.bptt(make_problem(None), key=0)
    with pytest.raises(ValueError, match="checkpoint_every"):
        pes_optax.bptt(make_problem(10), key=0, checkpoint_every=3)
    with pytest.raises(ValueError, match="checkpoint_every"):
        pes_optax.bptt(make_problem(10), key=0, checkpoint_every=0)
    with pytest.raises(TypeError, match="checkpoint_every"):
        pes_optax.bptt(make_problem(10), key=0, checkpoint_every=2.0)
    with pytest.raises(ValueError, match="truncation_length"):
        pes_optax.tbptt(make_problem(5), truncation_length=6, key=0)
    with pytest.raises(TypeError, match="problem"):
        pes_optax.tbptt(lambda: None, truncation_length=1, key=0)
    with pytest.raises(TypeError, match="key"):
        pes_optax.tbptt(make_problem(5), truncation_length=1, key="seed")


@pytest.mark.parametrize("name", REFERENCES)
def test_update_errors(name):
    transform = _estimator(name, make_problem(6))
    with pytest.raises(TypeError, match="params"):
        transform.init({"w": jnp.array([1, 2]), "b": jnp.asarray(0.1)})
    state = transform.init(THETA)
    with pytest.raises(ValueError, match="params"):
        transform.update(zeros_like_theta(), state, None)
    with pytest.raises(ValueError, match="data"):
        transform.update(zeros_like_theta(), state, THETA, data=jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="updates"):
        transform.update({"w": jnp.zeros(2)}, state, THETA)
    with pytest.raises(TypeError, match="state"):
        transform.update(zeros_like_theta(), (), THETA)

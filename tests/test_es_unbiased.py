"""Statistical checks of the ES family against exact gradients.

The test problem has linear dynamics and quadratic losses, so the Gaussian-
smoothed objective differs from the plain one by a constant and its gradient
is the exact total derivative, which ``jax.grad`` gives. Each check averages
``NUM_SEEDS`` independent estimates (one antithetic pair each) and requires
every component to lie within ``Z`` standard errors of the exact value; the
seeds are fixed, so a pass or a failure is reproducible.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pes_optax

NUM_SEEDS = 4000
Z = 3.0
A = jnp.array([[0.9, 0.2, 0.0], [-0.1, 0.8, 0.3], [0.0, 0.2, 0.7]])
B = jnp.array([[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]])
TARGET = jnp.array([1.0, -2.0, 0.5])
THETA = {"w": jnp.array([0.3, -0.2]), "b": jnp.asarray(0.1)}


def _make_problem(horizon):
    def init(key, theta):
        return jnp.full((3,), 0.5) + 0.2 * theta["b"]

    def step(theta, s, key, data):
        s = A @ s + B @ theta["w"] + theta["b"]
        return s, 0.5 * jnp.sum((s - TARGET) ** 2)

    return pes_optax.UnrolledProblem(init=init, step=step, horizon=horizon)


def _exact_truncation_gradients(problem, truncation_length, num_updates):
    """d L_tau / d theta for each truncation, theta fixed, resets included."""
    horizon = problem.horizon

    def step_losses(theta):
        s = problem.init(None, theta)
        losses = []
        for global_step in range(truncation_length * num_updates):
            if global_step % horizon == 0:
                s = problem.init(None, theta)
            s, loss = problem.step(theta, s, None, None)
            losses.append(loss)
        return jnp.stack(losses).reshape(num_updates, truncation_length).sum(1)

    jacobian = jax.jacobian(step_losses)(THETA)
    return [jax.tree.map(lambda j, t=tau: j[t], jacobian) for tau in range(num_updates)]


def _estimates(factory, num_updates, **kwargs):
    """Estimates of ``num_updates`` consecutive updates, per seed."""

    def one_seed(key):
        transform = factory(key=key, **kwargs)
        state = transform.init(THETA)
        outputs = []
        for _ in range(num_updates):
            zeros = jax.tree.map(jnp.zeros_like, THETA)
            estimate, state = transform.update(zeros, state, THETA)
            outputs.append(estimate)
        return outputs

    keys = jax.random.split(jax.random.key(1234), NUM_SEEDS)
    return jax.jit(jax.vmap(one_seed))(keys)


def _z_scores(samples, exact):
    """Per-leaf |mean - exact| / standard error."""

    def score(x, e):
        x = np.asarray(x, np.float64)
        standard_error = x.std(axis=0, ddof=1) / np.sqrt(x.shape[0])
        # The floor only matters for exact estimators (zero spread).
        floor = 1e-5 * (np.abs(np.asarray(e)) + 1.0)
        return np.abs(x.mean(axis=0) - np.asarray(e)) / np.maximum(
            standard_error, floor
        )

    return np.concatenate(
        [np.ravel(z) for z in jax.tree.leaves(jax.tree.map(score, samples, exact))]
    )


def _sum_trees(trees):
    return jax.tree.map(lambda *xs: sum(xs), *trees)


HORIZON, TRUNCATION, UPDATES = 5, 2, 5  # resets fall inside truncations 3 and 5


@pytest.mark.parametrize(
    "sigma",
    [0.3, lambda count: jnp.where(count % 2 == 0, 0.5, 0.1)],
    ids=["constant_sigma", "scheduled_sigma"],
)
def test_pes_unbiased_per_truncation_and_summed(sigma):
    problem = _make_problem(HORIZON)
    exact = _exact_truncation_gradients(problem, TRUNCATION, UPDATES)
    samples = _estimates(
        lambda **kw: pes_optax.pes(problem, **kw),
        UPDATES,
        num_particles=2,
        sigma=sigma,
        truncation_length=TRUNCATION,
    )
    for tau in range(UPDATES):
        z = _z_scores(samples[tau], exact[tau])
        assert z.max() < Z, f"truncation {tau}: z-scores {z}"
    z = _z_scores(_sum_trees(samples), _sum_trees(exact))
    assert z.max() < Z, f"summed: z-scores {z}"


def test_nres_unbiased_per_truncation():
    problem = _make_problem(HORIZON)
    exact = _exact_truncation_gradients(problem, TRUNCATION, UPDATES)
    samples = _estimates(
        lambda **kw: pes_optax.nres(problem, stagger=False, **kw),
        UPDATES,
        num_particles=2,
        sigma=0.3,
        truncation_length=TRUNCATION,
    )
    for tau in range(UPDATES):
        assert _z_scores(samples[tau], exact[tau]).max() < Z


def test_pes_a_unbiased_with_lower_variance_than_pes():
    problem = _make_problem(HORIZON)
    exact = _exact_truncation_gradients(problem, TRUNCATION, UPDATES)
    kwargs = dict(num_particles=2, sigma=0.3, truncation_length=TRUNCATION)
    samples = _estimates(lambda **kw: pes_optax.pes_a(problem, **kw), UPDATES, **kwargs)
    for tau in range(UPDATES):
        assert _z_scores(samples[tau], exact[tau]).max() < Z
    assert _z_scores(_sum_trees(samples), _sum_trees(exact)).max() < Z
    plain = _estimates(lambda **kw: pes_optax.pes(problem, **kw), UPDATES, **kwargs)

    def total_variance(trees):
        return sum(np.var(np.asarray(x), axis=0).sum() for x in jax.tree.leaves(trees))

    assert total_variance(samples) < 0.5 * total_variance(plain)


def test_full_es_unbiased_for_whole_problem():
    problem = _make_problem(HORIZON)
    exact = _sum_trees(_exact_truncation_gradients(problem, HORIZON, 1))
    samples = _estimates(
        lambda **kw: pes_optax.full_es(problem, **kw),
        1,
        num_particles=2,
        sigma=0.3,
    )
    assert _z_scores(samples[0], exact).max() < Z


def test_truncated_es_fails_the_same_test():
    """Counter-check: the biased estimator must be caught by the test above."""
    problem = _make_problem(HORIZON)
    exact = _exact_truncation_gradients(problem, TRUNCATION, UPDATES)
    samples = _estimates(
        lambda **kw: pes_optax.truncated_es(problem, **kw),
        UPDATES,
        num_particles=2,
        sigma=0.3,
        truncation_length=TRUNCATION,
    )
    # The first truncation starts fresh, so truncated ES is exact there ...
    assert _z_scores(samples[0], exact[0]).max() < Z
    # ... and later truncations miss theta's influence through the state.
    assert _z_scores(samples[1], exact[1]).max() > 10 * Z
    assert _z_scores(_sum_trees(samples), _sum_trees(exact)).max() > 10 * Z

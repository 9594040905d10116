"""Tests for the built-in tasks in `pes_optax.tasks`."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pes_optax
from pes_optax import tasks
from pes_optax.tasks import digits, influence_balancing, toy_regression


def _train(task, estimator, num_iterations, seed, **estimator_kwargs):
    """Runs the task's outer loop under one jitted scan; returns final theta."""
    transform = estimator(
        task.problem,
        num_particles=estimator_kwargs.pop("num_particles", task.num_particles),
        sigma=estimator_kwargs.pop("sigma", task.sigma),
        truncation_length=task.truncation_length,
        key=jax.random.key(seed),
    )
    outer = optax.chain(transform, task.optimizer(task.learning_rate))

    @jax.jit
    def run(theta):
        def body(carry, _):
            theta, state = carry
            updates, state = outer.update(jnp.zeros_like(theta), state, theta)
            return (optax.apply_updates(theta, updates), state), None

        (theta, _), _ = jax.lax.scan(
            body, (theta, outer.init(theta)), None, length=num_iterations
        )
        return theta

    return run(task.initial_theta)


# --- registry ----------------------------------------------------------------


def test_registry_lists_every_task():
    assert tasks.TASKS == ("digits", "influence_balancing", "toy_regression")
    assert tasks.DEFAULT_TASK in tasks.TASKS


@pytest.mark.parametrize("name", ["influence_balancing", "toy_regression"])
def test_task_fields_are_consistent(name):
    task = tasks.get_task(name)
    assert task.name == name
    assert isinstance(task.problem, pes_optax.UnrolledProblem)
    assert task.estimator == "pes"
    value = task.evaluate(task.initial_theta, jax.random.key(0))
    assert value.shape == ()
    assert np.isfinite(float(value))


def test_get_task_applies_setting_and_construction_overrides():
    task = tasks.get_task("toy_regression", horizon=50, num_particles=8)
    assert task.num_particles == 8
    assert task.problem.horizon == 50


def test_get_task_rejects_unknown_name():
    with pytest.raises(ValueError, match="`name` must be one of"):
        tasks.get_task("mnist")


def test_get_task_rejects_unknown_override():
    with pytest.raises(TypeError, match="Unknown override.*'foo'"):
        tasks.get_task("influence_balancing", foo=1)


SETTINGS = (
    "estimator",
    "num_particles",
    "sigma",
    "truncation_length",
    "optimizer",
    "learning_rate",
    "num_iterations",
    "eval_every",
)


@pytest.mark.parametrize("name", ["influence_balancing", "toy_regression", "digits"])
def test_default_settings_are_the_built_tasks_settings(name):
    defaults = tasks.default_settings(name)
    task = tasks.get_task(name, **({"horizon": 20} if name == "digits" else {}))

    assert set(defaults) == set(SETTINGS)
    assert defaults == {field: getattr(task, field) for field in SETTINGS}
    defaults["sigma"] = -1.0  # a copy: the registry is untouched
    assert tasks.default_settings(name)["sigma"] == task.sigma


def test_default_settings_reject_unknown_name():
    with pytest.raises(ValueError, match="`name` must be one of"):
        tasks.default_settings("mnist")


def test_default_settings_do_not_import_sklearn():
    code = (
        "import sys; from pes_optax import tasks; "
        "assert tasks.default_settings('digits')['num_particles'] == 64; "
        "assert 'sklearn' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_core_and_tasks_import_neither_tasks_nor_sklearn():
    code = (
        "import sys, pes_optax; assert 'pes_optax.tasks' not in sys.modules; "
        "import pes_optax.tasks; assert 'sklearn' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- influence balancing ---------------------------------------------------------


def test_influence_balancing_fixed_point_is_minus_six_theta():
    # Solve (I - A) s = theta b exactly; its first entry is -6 theta.
    matrix = np.asarray(influence_balancing.transition_matrix(), np.float64)
    influence = np.asarray(influence_balancing.influence_vector(), np.float64)
    fixed_point = np.linalg.solve(np.eye(23) - matrix, influence)
    np.testing.assert_allclose(fixed_point[0], -6.0, rtol=1e-12)


def test_influence_balancing_evaluate_matches_the_fixed_point():
    task = tasks.get_task("influence_balancing")
    key = jax.random.key(0)
    at_optimum = task.evaluate(jnp.asarray(influence_balancing.OPTIMAL_THETA), key)
    assert float(at_optimum) < 1e-10
    # After 500 contracting steps s[0] = -6 theta, so the loss is 0.5 (6t + 1)^2.
    for theta in (0.5, -1.0, 2.0):
        expected = 0.5 * (6.0 * theta + 1.0) ** 2
        got = task.evaluate(jnp.asarray(theta, jnp.float32), key)
        np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_influence_balancing_one_step_gradient_has_the_wrong_sign():
    # Below the target (s[0] < 1), one step says "raise theta", because
    # d s_1[0] / d theta = b[0] = 1; the long-run optimum is lower than 0.5.
    problem = influence_balancing.make_problem()
    state = jnp.full((23,), -3.0)  # the fixed point of theta = 0.5

    def one_step_loss(theta):
        return problem.step(theta, state, jax.random.key(0), None)[1]

    assert float(jax.grad(one_step_loss)(jnp.asarray(0.5))) < 0.0
    assert influence_balancing.OPTIMAL_THETA < 0.5


def test_influence_balancing_pes_converges_and_truncated_es_diverges():
    # The paper's settings: K=1, N=1000, sigma=0.1, SGD 1e-4, 3000 iterations.
    task = tasks.get_task("influence_balancing")
    key = jax.random.key(0)

    theta_pes = _train(task, pes_optax.pes, 3000, seed=3)
    assert abs(float(theta_pes) - influence_balancing.OPTIMAL_THETA) < 1e-4
    assert float(task.evaluate(theta_pes, key)) < 1e-8

    theta_tes = _train(task, pes_optax.truncated_es, 3000, seed=3)
    assert float(theta_tes) > 3.0
    assert float(task.evaluate(theta_tes, key)) > 100.0


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_influence_balancing_pes_converges_for_several_seeds(seed):
    task = tasks.get_task("influence_balancing")
    theta = _train(task, pes_optax.pes, 3000, seed=seed)
    assert float(task.evaluate(theta, jax.random.key(0))) < 1e-8


# --- toy regression --------------------------------------------------------------


def test_toy_regression_meta_objective_at_init():
    task = tasks.get_task("toy_regression")
    value = task.evaluate(task.initial_theta, jax.random.key(0))
    np.testing.assert_allclose(float(value), 2488.0, atol=1.0)


def test_toy_regression_schedule_interpolates_between_the_two_rates():
    theta = jnp.log(jnp.asarray([0.5, 0.1]))
    start = toy_regression.learning_rate(theta, jnp.asarray(0), 100)
    middle = toy_regression.learning_rate(theta, jnp.asarray(50), 100)
    end = toy_regression.learning_rate(theta, jnp.asarray(100), 100)
    np.testing.assert_allclose([start, middle, end], [0.5, 0.3, 0.1], rtol=1e-6)


def test_toy_regression_inner_loss_at_known_points():
    np.testing.assert_allclose(
        toy_regression.inner_loss(jnp.asarray([0.0, 100.0])),
        np.sin(100.0) ** 2,
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        toy_regression.inner_loss(jnp.asarray([2.0, 0.0])),
        3.0 - np.sqrt(5.0) + 25.0,
        rtol=1e-6,
    )


def test_toy_regression_pes_reaches_the_good_basin():
    # PES paper settings (N=100, sigma=0.3, Adam 1e-2, b1=0.99) for 1000
    # iterations; exact local gradients stall at the 2423 local minimum.
    task = tasks.get_task("toy_regression")
    theta = _train(task, pes_optax.pes, 1000, seed=3)
    assert float(task.evaluate(theta, jax.random.key(0))) < 700.0
    assert float(theta[0]) > 2.0  # a large initial learning rate


# --- digits ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_data():
    return digits.load_data()


@pytest.fixture(scope="module")
def digits_task():
    return tasks.get_task("digits", horizon=100)


def test_digits_data_shapes_and_ranges(digits_data):
    assert digits_data.train_images.shape == (1437, 64)
    assert digits_data.valid_images.shape == (360, 64)
    assert digits_data.train_labels.shape == (1437,)
    assert digits_data.valid_labels.shape == (360,)
    for images in (digits_data.train_images, digits_data.valid_images):
        assert images.dtype == jnp.float32
        assert float(images.min()) == 0.0
        assert float(images.max()) == 1.0
    assert set(np.unique(digits_data.train_labels)) == set(range(10))


def test_digits_split_is_deterministic(digits_data):
    again = digits.load_data()
    for first, second in zip(digits_data, again, strict=True):
        np.testing.assert_array_equal(first, second)


def test_digits_init_depends_on_key_not_theta(digits_task):
    problem = digits_task.problem
    key = jax.random.key(0)
    first = problem.init(key, digits_task.initial_theta)
    second = problem.init(key, digits_task.initial_theta + 1.0)
    other = problem.init(jax.random.key(1), digits_task.initial_theta)
    chex_equal = jax.tree.map(np.array_equal, first.params, second.params)
    assert all(jax.tree.leaves(chex_equal))
    assert not np.array_equal(
        jax.tree.leaves(first.params)[-1], jax.tree.leaves(other.params)[-1]
    )


def test_digits_inner_loss_decreases_with_a_reasonable_theta(digits_task):
    problem = digits_task.problem
    theta = jnp.log(jnp.asarray([0.1, 0.5]))
    state = problem.init(jax.random.key(0), theta)
    keys = jax.random.split(jax.random.key(1), 100)

    def body(state, key):
        return problem.step(theta, state, key, None)

    _, losses = jax.lax.scan(body, state, keys)
    assert float(losses[:5].mean()) > 1.5  # near log(10) before training
    assert float(losses[-20:].mean()) < 0.5
    assert float(digits_task.validate(theta, jax.random.key(2))) < 0.5


def test_digits_initial_theta_leaves_room_to_improve(digits_task):
    key = jax.random.key(0)
    good = jnp.log(jnp.asarray([0.1, 0.5]))
    initial_value = float(digits_task.evaluate(digits_task.initial_theta, key))
    assert initial_value > 2.0 * float(digits_task.evaluate(good, key))


def test_digits_pes_improves_the_meta_objective(digits_task):
    key = jax.random.key(0)
    theta = _train(digits_task, pes_optax.pes, 60, seed=0, num_particles=16)
    before = float(digits_task.evaluate(digits_task.initial_theta, key))
    after = float(digits_task.evaluate(theta, key))
    assert after < 0.5 * before


def test_digits_rejects_bad_horizon():
    with pytest.raises(ValueError, match="`horizon`"):
        digits.make_task(horizon=0)

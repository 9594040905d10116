"""Tests for the model adapters: recurrent models and inner training loops."""

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import pes_optax

NUM_PARTICLES = 4
TRUNCATION_LENGTH = 3


def _pes_step(problem, theta, *, num_particles=NUM_PARTICLES, data=None):
    """One jitted PES update; returns the estimate and the estimator state."""
    estimator = pes_optax.pes(
        problem,
        num_particles=num_particles,
        sigma=0.1,
        truncation_length=TRUNCATION_LENGTH,
        key=jax.random.key(0),
    )

    @jax.jit
    def run(theta):
        state = estimator.init(theta)
        zeros = jax.tree.map(jnp.zeros_like, theta)
        return estimator.update(zeros, state, theta, data=data)

    return run(theta)


def _all_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def _differs_across_particles(leaf):
    return not np.allclose(np.asarray(leaf[0]), np.asarray(leaf[1]))


# Recurrent models.


class LinenCharRNN(nn.Module):
    vocab_size: int
    hidden_size: int = 8

    @nn.compact
    def __call__(self, carry, token):
        x = nn.Embed(self.vocab_size, 4)(token)
        carry, h = nn.OptimizedLSTMCell(self.hidden_size)(carry, x)
        return carry, nn.Dense(self.vocab_size)(h)


class LinenBatchNormRNN(nn.Module):
    @nn.compact
    def __call__(self, carry, x):
        carry, h = nn.GRUCell(4)(carry, x)
        h = nn.BatchNorm(use_running_average=False)(h)
        h = nn.Dropout(0.5, deterministic=False)(h)
        return carry, nn.Dense(1)(h)[:, 0]


def _cross_entropy(logits, target):
    return optax.softmax_cross_entropy_with_integer_labels(logits, target)


def _tokens(text):
    chars = sorted(set(text))
    return jnp.asarray([chars.index(c) for c in text], jnp.int32), len(chars)


@pytest.fixture(scope="module")
def linen_char_problem():
    tokens, vocab_size = _tokens("hello world! " * 20)
    model = LinenCharRNN(vocab_size)
    carry = nn.OptimizedLSTMCell(8).initialize_carry(jax.random.key(0), (4,))
    variables = model.init(jax.random.key(1), carry, tokens[0])
    problem = pes_optax.from_flax_linen_rnn(
        model,
        variables,
        (tokens[:-1], tokens[1:]),
        _cross_entropy,
        init_carry=carry,
        horizon=24,
        random_start=True,
    )
    return problem, variables["params"]


def test_recurrent_problem_generic_works_with_pes_and_unroll():
    xs = jnp.sin(0.3 * jnp.arange(40.0))

    def apply_fn(theta, carry, x, key):
        carry = jnp.tanh(theta["w"] * carry + theta["u"] * x)
        return carry, carry

    problem = pes_optax.recurrent_problem(
        apply_fn,
        jnp.zeros(()),
        (xs[:-1], xs[1:]),
        lambda out, target: (out - target) ** 2,
        horizon=12,
        example_theta={"w": 0.0, "u": 0.0},
    )
    theta = {"w": jnp.asarray(0.5), "u": jnp.asarray(1.0)}
    estimate, state = _pes_step(problem, theta)
    assert _all_finite(estimate)
    assert state.inner_state.position.shape == (NUM_PARTICLES,)
    np.testing.assert_array_equal(state.inner_state.position, TRUNCATION_LENGTH)
    assert np.isfinite(float(pes_optax.unroll(problem, theta, jax.random.key(1))))


def test_endless_stream_wraps_around_the_sequence():
    xs = jnp.arange(5.0)
    seen = []

    def apply_fn(theta, carry, x, key):
        return carry, x * theta

    problem = pes_optax.recurrent_problem(
        apply_fn, jnp.zeros(()), (xs, xs), lambda out, y: out - y, horizon=None
    )
    state = problem.init(jax.random.key(0), jnp.asarray(1.0))
    for _ in range(7):
        seen.append(int(state.position))
        state, _ = problem.step(jnp.asarray(1.0), state, jax.random.key(0), None)
    assert seen == [0, 1, 2, 3, 4, 0, 1]


def test_sequence_from_data_each_step():
    def apply_fn(theta, carry, x, key):
        carry = theta * carry + x
        return carry, carry

    problem = pes_optax.recurrent_problem(
        apply_fn, jnp.zeros((2,)), None, lambda out, y: jnp.sum((out - y) ** 2)
    )
    data = (jnp.ones((TRUNCATION_LENGTH, 2)), jnp.zeros((TRUNCATION_LENGTH, 2)))
    estimate, _ = _pes_step(problem, jnp.asarray(0.5), data=data)
    assert _all_finite(estimate)
    with pytest.raises(ValueError, match="data="):
        pes_optax.unroll(problem, jnp.asarray(0.5), jax.random.key(0), num_steps=2)


def test_linen_rnn_works_with_pes_and_gradient_is_finite(linen_char_problem):
    problem, theta = linen_char_problem
    estimate, state = _pes_step(problem, theta)
    assert _all_finite(estimate)
    assert jax.tree.structure(estimate) == jax.tree.structure(theta)
    grad = jax.grad(pes_optax.unroll, argnums=1)(problem, theta, jax.random.key(3))
    assert _all_finite(grad)


def test_unroll_gradient_matches_finite_differences():
    # A small GRU problem: directional derivative vs a central difference.
    cell = nn.GRUCell(3)
    carry = jnp.zeros((2, 3))
    xs = jax.random.normal(jax.random.key(0), (10, 2, 2))
    variables = cell.init(jax.random.key(1), carry, xs[0])
    problem = pes_optax.from_flax_linen_rnn(
        cell,
        variables,
        (xs, xs[:, :, 0]),
        lambda h, y: jnp.mean((h[:, 0] - y) ** 2),
        init_carry=carry,
        horizon=10,
    )
    theta, key = variables["params"], jax.random.key(2)
    leaves, treedef = jax.tree.flatten(theta)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    direction = jax.tree.unflatten(
        treedef,
        [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)],
    )
    loss = jax.jit(lambda t: pes_optax.unroll(problem, t, key))
    grad = jax.grad(lambda t: pes_optax.unroll(problem, t, key))(theta)
    pairs = zip(jax.tree.leaves(grad), jax.tree.leaves(direction), strict=True)
    analytic = sum(jnp.vdot(g, d) for g, d in pairs)

    eps = 1e-2
    plus = jax.tree.map(lambda t, d: t + eps * d, theta, direction)
    minus = jax.tree.map(lambda t, d: t - eps * d, theta, direction)
    numeric = (loss(plus) - loss(minus)) / (2 * eps)
    np.testing.assert_allclose(float(analytic), float(numeric), rtol=2e-2, atol=1e-4)


def test_linen_batch_stats_are_kept_per_particle():
    model = LinenBatchNormRNN()
    carry = jnp.zeros((5, 4))
    xs = jax.random.normal(jax.random.key(0), (20, 5, 2))
    variables = model.init(
        {"params": jax.random.key(1), "dropout": jax.random.key(2)}, carry, xs[0]
    )
    problem = pes_optax.from_flax_linen_rnn(
        model,
        variables,
        (xs, xs[:, :, 0]),
        lambda out, y: jnp.mean((out - y) ** 2),
        init_carry=carry,
        horizon=10,
    )
    estimate, state = _pes_step(problem, variables["params"])
    assert _all_finite(estimate)
    means = state.inner_state.model_state["batch_stats"]["BatchNorm_0"]["mean"]
    assert means.shape == (NUM_PARTICLES, 4)
    assert _differs_across_particles(means)
    initial = variables["batch_stats"]["BatchNorm_0"]["mean"]
    assert not np.allclose(np.asarray(means[0]), np.asarray(initial))

    # The "dropout" stream gets a key derived from the step key.
    inner = problem.init(jax.random.key(0), variables["params"])
    losses = [
        float(problem.step(variables["params"], inner, jax.random.key(k), None)[1])
        for k in (5, 5, 6)
    ]
    assert losses[0] == losses[1] and losses[0] != losses[2]


class NNXRecurrent(nnx.Module):
    def __init__(self, rngs):
        self.cell = nnx.LSTMCell(2, 4, rngs=rngs)
        self.norm = nnx.BatchNorm(4, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.readout = nnx.Linear(4, 1, rngs=rngs)

    def __call__(self, carry, x):
        carry, h = self.cell(carry, x)
        return carry, self.readout(self.dropout(self.norm(h)))[:, 0]


def test_nnx_module_params_are_theta_and_other_state_is_per_particle():
    module = NNXRecurrent(nnx.Rngs(0, dropout=1))
    xs = jax.random.normal(jax.random.key(0), (20, 3, 2))
    carry = (jnp.zeros((3, 4)), jnp.zeros((3, 4)))
    problem = pes_optax.from_flax_nnx(
        module,
        (xs, xs[:, :, 0]),
        lambda out, y: jnp.mean((out - y) ** 2),
        init_carry=carry,
        horizon=10,
    )
    theta = nnx.state(module, nnx.Param)
    estimate, state = _pes_step(problem, theta)
    assert isinstance(estimate, nnx.State)
    assert _all_finite(estimate)
    rng_state, rest = state.inner_state.model_state
    counts = [x for x in jax.tree.leaves(rng_state) if x.dtype == jnp.uint32]
    np.testing.assert_array_equal(counts[0], TRUNCATION_LENGTH)
    mean = jax.tree.leaves(rest["norm"]["mean"])[0]
    assert mean.shape == (NUM_PARTICLES, 4)
    assert _differs_across_particles(mean)
    assert _all_finite(jax.grad(pes_optax.unroll, 1)(problem, theta, jax.random.key(1)))


def _haiku_counter_rnn(carry, x):
    out, carry = hk.VanillaRNN(3)(x, carry)
    count = hk.get_state("count", [], jnp.int32, init=jnp.zeros)
    hk.set_state("count", count + 1)
    total = hk.get_state("total", [3], init=jnp.zeros)
    hk.set_state("total", total + out)
    return carry, hk.Linear(1)(hk.dropout(hk.next_rng_key(), 0.5, out))[0]


def test_haiku_state_and_rng_are_handled_per_particle():
    net = hk.transform_with_state(_haiku_counter_rnn)
    xs = jax.random.normal(jax.random.key(0), (20, 2))
    params, hk_state = net.init(jax.random.key(1), jnp.zeros(3), xs[0])
    problem = pes_optax.from_haiku(
        net,
        params,
        (xs, xs[:, 0]),
        lambda out, y: (out - y) ** 2,
        init_carry=jnp.zeros(3),
        state=hk_state,
        horizon=10,
    )
    estimate, state = _pes_step(problem, params)
    assert _all_finite(estimate)
    model_state = state.inner_state.model_state
    counts = model_state["~"]["count"]
    np.testing.assert_array_equal(counts, np.full(NUM_PARTICLES, TRUNCATION_LENGTH))
    assert _differs_across_particles(model_state["~"]["total"])

    # A key per step: the dropout mask follows the step key.
    inner = problem.init(jax.random.key(0), params)
    losses = [
        float(problem.step(params, inner, jax.random.key(k), None)[1])
        for k in (5, 5, 6)
    ]
    assert losses[0] == losses[1] and losses[0] != losses[2]


def test_haiku_without_state_or_rng():
    def f(carry, x):
        out, carry = hk.VanillaRNN(3)(x, carry)
        return carry, hk.Linear(1)(out)[0]

    net = hk.without_apply_rng(hk.transform(f))
    xs = jnp.ones((10, 2))
    params = net.init(jax.random.key(0), jnp.zeros(3), xs[0])
    problem = pes_optax.from_haiku(
        net,
        params,
        (xs, xs[:, 0]),
        lambda out, y: (out - y) ** 2,
        init_carry=jnp.zeros(3),
        horizon=5,
    )
    assert np.isfinite(float(pes_optax.unroll(problem, params, jax.random.key(1))))
    with pytest.raises(ValueError, match="hk.transform_with_state"):
        pes_optax.from_haiku(
            hk.transform_with_state(f),
            params,
            (xs, xs[:, 0]),
            lambda out, y: (out - y) ** 2,
            init_carry=jnp.zeros(3),
        )


def test_mismatched_carry_names_the_leaf_path():
    # A common slip: an initial carry without the batch axis of the inputs.
    cell = nn.LSTMCell(4)
    carry = cell.initialize_carry(jax.random.key(0), (2,))
    xs = jnp.ones((10, 1, 2))
    variables = cell.init(jax.random.key(1), carry, xs[0])
    with pytest.raises(
        ValueError,
        match=r"`carry`.*leaf \[0\] has shape \(1, 4\).*expected shape \(4,\)",
    ):
        pes_optax.from_flax_linen_rnn(
            cell,
            variables,
            (xs, xs[:, :, 0]),
            lambda h, y: jnp.mean((h[:, 0] - y) ** 2),
            init_carry=carry,
        )


def test_mismatched_theta_names_the_leaf_path(linen_char_problem):
    problem, theta = linen_char_problem
    wrong = {k: v for k, v in theta.items() if k != "Dense_0"}
    with pytest.raises(ValueError, match=r"`theta`.*missing leaf \['Dense_0'\]"):
        pes_optax.unroll(problem, wrong, jax.random.key(0))


def test_bad_sequence_raises():
    with pytest.raises(ValueError, match="leading time axis"):
        pes_optax.recurrent_problem(
            lambda t, c, x, k: (c, x),
            jnp.zeros(()),
            (jnp.ones(5), jnp.ones(4)),
            lambda out, y: out,
        )
    with pytest.raises(TypeError, match="pair"):
        pes_optax.recurrent_problem(
            lambda t, c, x, k: (c, x), jnp.zeros(()), jnp.ones(5), lambda o, y: o
        )


def test_short_pes_run_on_char_task_reduces_loss(linen_char_problem):
    problem, theta = linen_char_problem
    optimizer = optax.chain(
        pes_optax.pes(
            problem,
            num_particles=16,
            sigma=0.05,
            truncation_length=8,
            key=jax.random.key(1),
        ),
        optax.adam(3e-2),
    )
    eval_keys = jax.random.split(jax.random.key(7), 8)

    def evaluate(theta):
        losses = jax.vmap(lambda k: pes_optax.unroll(problem, theta, k))(eval_keys)
        return float(jnp.mean(losses))

    @jax.jit
    def train(theta):
        def body(carry, _):
            theta, state = carry
            zeros = jax.tree.map(jnp.zeros_like, theta)
            updates, state = optimizer.update(zeros, state, theta)
            return (optax.apply_updates(theta, updates), state), None

        carry = (theta, optimizer.init(theta))
        return jax.lax.scan(body, carry, None, length=200)[0][0]

    before = evaluate(theta)
    after = evaluate(train(theta))
    # Uniform guessing over the 9 characters costs log(9) = 2.20 nats.
    assert before > 2.0
    assert after < before - 0.5


# Inner training loops.


class LinenRegressor(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1, name="out")(nn.tanh(nn.Dense(8, name="hidden")(x)))[:, 0]


def _regression_batch(key):
    x = jax.random.normal(key, (32, 3))
    return x, jnp.sin(x[:, 0]) + 0.5 * x[:, 1]


def _linen_inner_problem(optimizer_fn=optax.sgd, transform=None, **kwargs):
    model = LinenRegressor()
    x = jnp.zeros((1, 3))

    def loss_fn(params, batch):
        return jnp.mean((model.apply({"params": params}, batch[0]) - batch[1]) ** 2)

    return pes_optax.inner_training_problem(
        lambda key: model.init(key, x)["params"],
        loss_fn,
        optimizer_fn,
        transform,
        _regression_batch,
        **kwargs,
    )


def _run_inner(problem, theta, num_steps):
    def body(state, key):
        return problem.step(theta, state, key, None)

    state = problem.init(jax.random.key(0), theta)
    keys = jax.random.split(jax.random.key(1), num_steps)
    return jax.lax.scan(body, state, keys)


def test_inner_training_reduces_training_loss():
    problem = _linen_inner_problem(horizon=50)
    theta = {"log_learning_rate": jnp.log(0.2), "logit_momentum": jnp.asarray(0.0)}
    _, losses = jax.jit(lambda t: _run_inner(problem, t, 50))(theta)
    assert float(jnp.mean(losses[-5:])) < 0.3 * float(losses[0])
    estimate, _ = _pes_step(problem, theta)
    assert _all_finite(estimate)


def test_particles_get_their_own_learning_rate_under_vmap():
    problem = _linen_inner_problem(horizon=10)
    thetas = {"log_learning_rate": jnp.log(jnp.asarray([0.1, 0.2]))}
    init = problem.init(jax.random.key(0), {"log_learning_rate": jnp.log(0.1)})
    step = jax.vmap(problem.step, in_axes=(0, None, None, None))
    states, _ = step(thetas, init, jax.random.key(1), None)
    for before, after in zip(
        jax.tree.leaves(init.params), jax.tree.leaves(states.params), strict=True
    ):
        # Same init and minibatch: plain SGD moves twice as far with twice the rate.
        np.testing.assert_allclose(
            after[1] - before, 2 * (after[0] - before), rtol=1e-4, atol=1e-7
        )
    _, state = _pes_step(problem, {"log_learning_rate": jnp.log(0.1)})
    assert _differs_across_particles(state.inner_state.params["out"]["kernel"])


def test_per_layer_rates_with_multi_transform_and_a_schedule():
    def optimizer_fn(lr_hidden, lr_out):
        return optax.multi_transform(
            {"hidden": optax.sgd(lr_hidden), "out": optax.sgd(lr_out)},
            lambda params: {
                k: jax.tree.map(lambda _, k=k: k, params[k]) for k in params
            },
        )

    def transform(theta, step):
        # The output layer trains only at step 0; the hidden layer always.
        return {
            "lr_hidden": jnp.exp(theta["log_lr_hidden"]),
            "lr_out": jnp.where(step == 0, jnp.exp(theta["log_lr_out"]), 0.0),
        }

    problem = _linen_inner_problem(optimizer_fn, transform, horizon=10)
    theta = {"log_lr_hidden": jnp.log(0.1), "log_lr_out": jnp.log(0.1)}
    one, _ = _run_inner(problem, theta, 1)
    three, _ = _run_inner(problem, theta, 3)
    np.testing.assert_array_equal(
        one.params["out"]["kernel"], three.params["out"]["kernel"]
    )
    assert not np.allclose(
        one.params["hidden"]["kernel"], three.params["hidden"]["kernel"]
    )
    np.testing.assert_allclose(three.opt_state.hyperparams["lr_hidden"], 0.1, rtol=1e-6)


def test_haiku_inner_training_with_validation_loss():
    net = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([8, 1])(x)[:, 0]))

    def loss_fn(params, batch):
        return jnp.mean((net.apply(params, batch[0]) - batch[1]) ** 2)

    problem = pes_optax.inner_training_problem(
        lambda key: net.init(key, jnp.zeros((1, 3))),
        loss_fn,
        optax.adamw,
        None,
        _regression_batch,
        horizon=20,
        meta_loss="validation",
        sample_validation_batch_fn=lambda key: _regression_batch(
            jax.random.fold_in(key, 1)
        ),
    )
    theta = {"log_learning_rate": jnp.log(0.03), "log_weight_decay": jnp.log(1e-3)}
    _, losses = _run_inner(problem, theta, 20)
    assert float(losses[-1]) < float(losses[0])
    estimate, _ = _pes_step(problem, theta)
    assert _all_finite(estimate)


def test_inner_training_rejects_bad_arguments():
    problem = _linen_inner_problem(horizon=5)
    with pytest.raises(ValueError, match="'learnin_rate'.*does not accept"):
        pes_optax.unroll(problem, {"log_learnin_rate": 0.0}, jax.random.key(0))
    with pytest.raises(ValueError, match="sample_validation_batch_fn"):
        _linen_inner_problem(horizon=5, meta_loss="validation")
    with pytest.raises(ValueError, match="meta_loss"):
        _linen_inner_problem(horizon=5, meta_loss="test")


def test_from_flax_nnx_accepts_plain_arrays_inside_nnx_optimizer():
    """nnx.Optimizer hands its transform plain arrays, not nnx.Param leaves."""
    cell = nnx.GRUCell(2, 3, rngs=nnx.Rngs(0))
    xs = jnp.ones((30, 1, 2))
    problem = pes_optax.from_flax_nnx(
        cell,
        (xs, xs[:, :, 0]),
        lambda h, y: jnp.mean((h[:, 0] - y) ** 2),
        init_carry=jnp.zeros((1, 3)),
        horizon=10,
    )
    tx = optax.chain(
        pes_optax.pes(problem, num_particles=8, sigma=0.05, truncation_length=5, key=0),
        optax.sgd(1e-2),
    )
    optimizer = nnx.Optimizer(cell, tx, wrt=nnx.Param)
    before = jax.tree.leaves(nnx.as_pure(nnx.state(cell, nnx.Param)))
    optimizer.update(cell, jax.tree.map(jnp.zeros_like, nnx.state(cell, nnx.Param)))
    after = jax.tree.leaves(nnx.as_pure(nnx.state(cell, nnx.Param)))
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(np.all(np.isfinite(a)) for a in after)

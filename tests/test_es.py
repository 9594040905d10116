"""Behaviour of the ES family: bookkeeping, policies, errors and composition."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pes_optax

SIGMA = 0.5


def _recording_problem(horizon=3, loss_reduction="sum"):
    """Loss ``(t + 1) * theta_used``; the state records the theta it saw."""

    def init(key, theta):
        return {"t": jnp.zeros(()), "used": jnp.zeros(())}

    def step(theta, state, key, data):
        loss = (state["t"] + 1.0) * theta
        return {"t": state["t"] + 1.0, "used": theta}, loss

    return pes_optax.UnrolledProblem(init, step, horizon, loss_reduction)


def _quadratic_problem(horizon=4):
    def init(key, theta):
        return jnp.zeros(())

    def step(theta, s, key, data):
        s = 0.9 * s + theta["a"] + jnp.sum(theta["b"])
        return s, (s - 1.0) ** 2

    return pes_optax.UnrolledProblem(init, step, horizon)


THETA = {"a": jnp.asarray(0.2), "b": jnp.array([0.1, -0.3])}


def _zeros(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def test_mid_truncation_reset_attribution_matches_hand_computation():
    theta = jnp.asarray(0.7)
    transform = pes_optax.pes(
        _recording_problem(horizon=3),
        num_particles=4,
        sigma=SIGMA,
        truncation_length=2,
        key=jax.random.key(0),
    )
    state = transform.init(theta)

    # Truncation 1: inner steps t=0 and t=1 of the first inner problem.
    g1, state = transform.update(jnp.zeros(()), state, theta)
    eps1 = state.inner_state["used"] - theta
    losses1 = (theta + eps1) * 1.0 + (theta + eps1) * 2.0
    np.testing.assert_allclose(g1, jnp.mean(eps1 / SIGMA**2 * losses1), rtol=1e-5)

    # Truncation 2: step t=2 ends the inner problem, then t=0 of the next.
    g2, state = transform.update(jnp.zeros(()), state, theta)
    eps2 = state.inner_state["used"] - theta
    before = (eps1 + eps2) / SIGMA**2 * (theta + eps2) * 3.0
    after = eps2 / SIGMA**2 * (theta + eps2) * 1.0
    np.testing.assert_allclose(g2, jnp.mean(before + after), rtol=1e-5)
    np.testing.assert_allclose(state.accumulator, eps2 / SIGMA**2, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(state.step, np.ones(4))
    np.testing.assert_array_equal(state.inner_state["t"], np.ones(4))
    # Antithetic partners carry opposite accumulators.
    np.testing.assert_allclose(state.accumulator[0::2], -state.accumulator[1::2])


@pytest.mark.parametrize(
    ("reduction", "weights"), [("sum", [1, 1]), ("mean", [0.5, 0.5]), ("last", [0, 1])]
)
def test_loss_reduction_weights(reduction, weights):
    theta = jnp.asarray(0.3)
    transform = pes_optax.pes(
        _recording_problem(horizon=None, loss_reduction=reduction),
        num_particles=2,
        sigma=SIGMA,
        truncation_length=2,
        key=3,
    )
    estimate, state = transform.update(jnp.zeros(()), transform.init(theta), theta)
    eps = state.inner_state["used"] - theta
    loss = (theta + eps) * (weights[0] * 1.0 + weights[1] * 2.0)
    np.testing.assert_allclose(estimate, jnp.mean(eps / SIGMA**2 * loss), rtol=1e-5)
    np.testing.assert_allclose(state.diagnostics.mean_loss, jnp.mean(loss), rtol=1e-5)


def test_truncated_es_restarts_particles_from_unperturbed_trajectory():
    theta = jnp.asarray(0.7)
    transform = pes_optax.truncated_es(
        _recording_problem(horizon=None),
        num_particles=2,
        sigma=SIGMA,
        truncation_length=2,
        key=0,
    )
    state = transform.init(theta)
    _, state = transform.update(jnp.zeros(()), state, theta)
    # The kept trajectory is unperturbed and two steps in.
    assert state.inner_state["used"] == theta
    assert state.inner_state["t"] == 2.0
    assert int(state.step) == 2


def test_nres_keeps_perturbation_for_a_whole_inner_problem():
    theta = jnp.asarray(0.1)
    transform = pes_optax.nres(
        _recording_problem(horizon=4),
        num_particles=2,
        sigma=SIGMA,
        truncation_length=2,
        key=0,
        stagger=False,
    )
    state = transform.init(theta)
    _, state = transform.update(jnp.zeros(()), state, theta)
    first = state.inner_state["used"]
    _, state = transform.update(jnp.zeros(()), state, theta)
    np.testing.assert_array_equal(state.inner_state["used"], first)
    _, state = transform.update(jnp.zeros(()), state, theta)
    assert not np.any(np.asarray(state.inner_state["used"]) == np.asarray(first))


def test_stagger_spreads_resets_and_keeps_pairs_together():
    transform = pes_optax.pes(
        _quadratic_problem(horizon=50),
        num_particles=64,
        sigma=0.1,
        truncation_length=5,
        key=0,
        stagger=True,
    )
    state = transform.init(THETA)
    ends = np.asarray(state.episode_end)
    np.testing.assert_array_equal(ends[0::2], ends[1::2])
    assert ends.min() >= 1 and ends.max() <= 50
    assert len(np.unique(ends)) > 10
    unstaggered = pes_optax.pes(
        _quadratic_problem(horizon=50),
        num_particles=64,
        sigma=0.1,
        truncation_length=5,
        key=0,
    ).init(THETA)
    np.testing.assert_array_equal(unstaggered.episode_end, np.full(64, 50))


def _nan_above_one_problem():
    def init(key, theta):
        return jnp.zeros(())

    def step(theta, s, key, data):
        loss = jnp.where(theta > 1.0, jnp.nan, theta**2 + 1.0)
        return s + theta, loss

    return pes_optax.UnrolledProblem(init, step, horizon=10)


def test_nonfinite_pairs_are_dropped_reset_and_reported():
    theta = jnp.asarray(0.0)
    transform = pes_optax.pes(
        _nan_above_one_problem(),
        num_particles=64,
        sigma=1.0,
        truncation_length=2,
        key=jax.random.key(7),
    )
    state = transform.init(theta)
    estimate, new_state = transform.update(jnp.zeros(()), state, theta)

    # Recover each particle's perturbation from its inner state (s = 2 theta_p).
    used = np.asarray(new_state.inner_state) / 2.0
    pair_bad = (used[0::2] > 1.0) | (used[1::2] > 1.0)
    assert pair_bad.any() and not pair_bad.all()
    assert int(new_state.diagnostics.num_dropped_pairs) == int(pair_bad.sum())

    # The estimate is the mean over the kept particles, by hand.
    keep = np.repeat(~pair_bad, 2)
    contributions = used / 1.0**2 * 2.0 * (used**2 + 1.0)
    np.testing.assert_allclose(estimate, contributions[keep].mean(), rtol=1e-4)

    # Dropped pairs restart their inner problems with empty accumulators.
    np.testing.assert_array_equal(np.asarray(new_state.step)[~keep], 0)
    np.testing.assert_array_equal(np.asarray(new_state.accumulator)[~keep], 0.0)
    assert np.all(np.asarray(new_state.step)[keep] == 2)


def test_nonfinite_never_reaches_theta():
    theta = jnp.asarray(5.0)  # every particle is non-finite
    opt = optax.chain(
        pes_optax.pes(
            _nan_above_one_problem(),
            num_particles=8,
            sigma=0.1,
            truncation_length=2,
            key=0,
        ),
        optax.sgd(0.1),
    )
    state = opt.init(theta)
    updates, state = opt.update(jnp.zeros(()), state, theta)
    assert float(updates) == 0.0
    assert int(state[0].diagnostics.num_dropped_pairs) == 4
    assert np.isfinite(float(optax.apply_updates(theta, updates)))


def test_skip_update_policy_zeroes_the_whole_estimate():
    theta = jnp.asarray(0.0)
    kwargs = dict(num_particles=64, sigma=1.0, truncation_length=2, key=7)
    skip = pes_optax.pes(
        _nan_above_one_problem(), nonfinite_policy="skip_update", **kwargs
    )
    estimate, state = skip.update(jnp.zeros(()), skip.init(theta), theta)
    assert float(estimate) == 0.0
    # The count is of the non-finite pairs, as with "drop_pair".
    drop = pes_optax.pes(_nan_above_one_problem(), **kwargs)
    _, drop_state = drop.update(jnp.zeros(()), drop.init(theta), theta)
    dropped = int(drop_state.diagnostics.num_dropped_pairs)
    assert 0 < dropped < 32
    assert int(state.diagnostics.num_dropped_pairs) == dropped


def _run(transform, theta, num_updates, jit=True):
    update = jax.jit(transform.update) if jit else transform.update
    state = transform.init(theta)
    outputs = []
    for _ in range(num_updates):
        out, state = update(_zeros(theta), state, theta)
        outputs.append(out)
    return outputs, state


@pytest.mark.parametrize(
    "factory", [pes_optax.pes, pes_optax.nres, pes_optax.truncated_es]
)
def test_same_key_same_bits(factory):
    def make(seed):
        return factory(
            _quadratic_problem(),
            num_particles=6,
            sigma=0.1,
            truncation_length=3,
            key=jax.random.key(seed),
        )

    out_a, state_a = _run(make(0), THETA, 3)
    out_b, state_b = _run(make(0), THETA, 3)
    out_c, _ = _run(make(1), THETA, 3)
    for a, b in zip(jax.tree.leaves(out_a), jax.tree.leaves(out_b), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        jax.random.key_data(state_a.rng_key), jax.random.key_data(state_b.rng_key)
    )
    assert not np.array_equal(out_a[-1]["a"], out_c[-1]["a"])


def test_rng_key_is_split_every_update():
    transform = pes_optax.pes(
        _quadratic_problem(), num_particles=2, sigma=0.1, truncation_length=2, key=0
    )
    _, state1 = _run(transform, THETA, 1)
    _, state2 = _run(transform, THETA, 2)
    first = jax.random.key_data(state1.rng_key)
    second = jax.random.key_data(state2.rng_key)
    assert not np.array_equal(first, second)


def test_jit_traces_once_across_new_values():
    traces = []

    def init(key, theta):
        return jnp.zeros(())

    def step(theta, s, key, data):
        traces.append(1)
        s = s + theta * data
        return s, s**2

    problem = pes_optax.UnrolledProblem(init, step, horizon=6)
    transform = pes_optax.pes(
        problem, num_particles=4, sigma=0.1, truncation_length=3, key=0
    )
    update = jax.jit(transform.update)

    def f32(x):
        return jnp.asarray(x, jnp.float32)

    state = transform.init(f32(1.0))
    _, state = update(f32(0.0), state, f32(1.0), data=f32(jnp.ones(3)))
    after_first = len(traces)
    for value in (2.0, 3.0, -1.0):
        _, state = update(f32(0.0), state, f32(value), data=f32(jnp.full(3, value)))
    assert after_first > 0
    assert len(traces) == after_first
    assert update._cache_size() == 1


def test_data_is_shared_by_all_particles_per_step():
    def init(key, theta):
        return jnp.zeros(())

    def step(theta, s, key, data):
        return s + data, data * 0.0 + theta

    problem = pes_optax.UnrolledProblem(init, step, horizon=None)
    transform = pes_optax.pes(
        problem, num_particles=4, sigma=0.1, truncation_length=3, key=0
    )
    data = jnp.array([1.0, 2.0, 4.0])
    _, state = transform.update(
        jnp.zeros(()), transform.init(jnp.asarray(0.0)), jnp.asarray(0.0), data=data
    )
    np.testing.assert_array_equal(state.inner_state, np.full(4, 7.0))


def test_bfloat16_theta_keeps_float32_accumulators():
    theta = {"a": jnp.asarray(0.2, jnp.bfloat16), "b": jnp.array([0.1, -0.3])}
    transform = pes_optax.pes(
        _quadratic_problem(), num_particles=4, sigma=0.1, truncation_length=2, key=0
    )
    outputs, state = _run(transform, theta, 2)
    assert outputs[-1]["a"].dtype == jnp.bfloat16
    assert outputs[-1]["b"].dtype == jnp.float32
    assert state.accumulator["a"].dtype == jnp.float32


def test_chain_with_adam_minimises_a_quadratic():
    opt = optax.chain(
        pes_optax.pes(
            _quadratic_problem(horizon=4),
            num_particles=64,
            sigma=0.05,
            truncation_length=2,
            key=0,
        ),
        optax.adam(0.05),
    )
    theta = THETA
    state = opt.init(theta)
    step = jax.jit(opt.update)
    start = float(pes_optax.unroll(_quadratic_problem(4), theta, jax.random.key(0)))
    for _ in range(200):
        updates, state = step(_zeros(theta), state, theta)
        theta = optax.apply_updates(theta, updates)
    end = float(pes_optax.unroll(_quadratic_problem(4), theta, jax.random.key(0)))
    assert end < 0.2 * start


@pytest.mark.parametrize(
    "wrap",
    [
        lambda est: optax.chain(est, optax.clip_by_global_norm(0.1), optax.adam(1e-2)),
        lambda est: optax.chain(
            est,
            optax.MultiSteps(
                optax.sgd(1e-2), every_k_schedule=2
            ).gradient_transformation(),
        ),
        lambda est: optax.apply_if_finite(optax.chain(est, optax.sgd(1e-2)), 3),
    ],
    ids=["clip_by_global_norm", "MultiSteps", "apply_if_finite"],
)
def test_composes_with_optax_wrappers(wrap):
    estimator = pes_optax.pes(
        _quadratic_problem(), num_particles=4, sigma=0.1, truncation_length=2, key=0
    )
    opt = wrap(estimator)
    theta = THETA
    state = opt.init(theta)
    step = jax.jit(opt.update)
    moved = False
    for _ in range(4):
        updates, state = step(_zeros(theta), state, theta)
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
        moved |= any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates))
        theta = optax.apply_updates(theta, updates)
    assert moved


def test_clip_by_global_norm_bounds_the_step():
    opt = optax.chain(
        pes_optax.pes(
            _quadratic_problem(),
            num_particles=4,
            sigma=0.1,
            truncation_length=2,
            key=0,
        ),
        optax.clip_by_global_norm(0.1),
    )
    updates, _ = opt.update(_zeros(THETA), opt.init(THETA), THETA)
    assert float(optax.tree.norm(updates)) <= 0.1 + 1e-6


def test_runs_inside_lax_scan():
    transform = pes_optax.pes(
        _quadratic_problem(), num_particles=4, sigma=0.1, truncation_length=2, key=0
    )

    def body(state, _):
        out, state = transform.update(_zeros(THETA), state, THETA)
        return state, out["a"]

    _, outs = jax.lax.scan(body, transform.init(THETA), length=3)
    loop_outs, _ = _run(transform, THETA, 3, jit=False)
    np.testing.assert_allclose(outs, [o["a"] for o in loop_outs], rtol=1e-5)


# ---------------------------------------------------------------- bad input


def _pes(**overrides):
    kwargs = dict(
        num_particles=4, sigma=0.1, truncation_length=2, key=jax.random.key(0)
    )
    kwargs.update(overrides)
    problem = kwargs.pop("problem", _quadratic_problem())
    return pes_optax.pes(problem, **kwargs)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"num_particles": 5}, ValueError, "num_particles.*even.*5"),
        ({"num_particles": 0}, ValueError, "num_particles.*>= 1"),
        ({"num_particles": 2.0}, TypeError, "num_particles"),
        ({"sigma": 0.0}, ValueError, "sigma.*0.0.*> 0"),
        ({"sigma": -1.0}, ValueError, "sigma"),
        ({"sigma": float("nan")}, ValueError, "sigma"),
        ({"sigma": "0.1"}, TypeError, "sigma"),
        ({"sigma": lambda count: -1.0}, ValueError, "sigma.*schedule"),
        ({"truncation_length": 0}, ValueError, "truncation_length.*>= 1"),
        ({"truncation_length": 5}, ValueError, "truncation_length.*5.*horizon.*4"),
        ({"key": "seed"}, TypeError, "key"),
        ({"key": jax.random.PRNGKey(0)}, TypeError, "typed PRNG key"),
        ({"nonfinite_policy": "ignore"}, ValueError, "nonfinite_policy"),
        ({"problem": object()}, TypeError, "UnrolledProblem"),
        ({"stagger": True, "problem": _recording_problem(None)}, ValueError, "stagger"),
    ],
)
def test_bad_construction_arguments(overrides, error, match):
    with pytest.raises(error, match=match):
        _pes(**overrides)


def test_antithetic_false_allows_odd_particle_counts():
    transform = _pes(num_particles=3, antithetic=False)
    outputs, _ = _run(transform, THETA, 1)
    assert np.isfinite(outputs[0]["a"])


def test_full_es_needs_a_finite_horizon():
    with pytest.raises(ValueError, match="horizon"):
        pes_optax.full_es(_recording_problem(None), num_particles=2, sigma=0.1, key=0)


@pytest.mark.parametrize(
    ("horizon", "reduction", "error"),
    [(0, "sum", ValueError), (2.5, "sum", TypeError), (3, "max", ValueError)],
)
def test_bad_problem_definitions(horizon, reduction, error):
    with pytest.raises(error):
        pes_optax.UnrolledProblem(
            lambda k, t: t, lambda t, s, k, d: (s, 0.0), horizon, reduction
        )


def test_integer_theta_leaves_are_rejected():
    with pytest.raises(TypeError, match=r"\['steps'\].*int32.*floating"):
        _pes().init({"a": jnp.asarray(0.1), "steps": jnp.asarray(3)})
    transform = _pes()
    state = transform.init(THETA)
    bad = {"a": jnp.asarray(1), "b": jnp.array([0.1, -0.3])}
    with pytest.raises(TypeError, match="floating"):
        transform.update(_zeros(THETA), state, bad)


def test_missing_params_is_rejected():
    transform = _pes()
    with pytest.raises(ValueError, match="params.*None"):
        transform.update(_zeros(THETA), transform.init(THETA))


def test_theta_structure_must_match_the_state():
    transform = _pes()
    state = transform.init(THETA)
    other = {"a": jnp.asarray(0.2), "c": jnp.array([0.1, -0.3])}
    with pytest.raises(ValueError, match="(?s)params.*built for"):
        transform.update(other, state, other)
    wrong_shape = {"a": jnp.asarray(0.2), "b": jnp.array([0.1, -0.3, 0.0])}
    with pytest.raises(ValueError, match="params"):
        transform.update(wrong_shape, state, wrong_shape)


def test_data_leading_axis_must_be_truncation_length():
    transform = _pes()
    state = transform.init(THETA)
    with pytest.raises(ValueError, match=r"data.*\(3, 2\).*truncation_length=2"):
        transform.update(_zeros(THETA), state, THETA, data=jnp.zeros((3, 2)))


# ---------------------------------------------------------------- chunking


@pytest.mark.parametrize(
    "factory",
    [pes_optax.pes, pes_optax.nres, pes_optax.truncated_es, pes_optax.full_es],
)
def test_chunked_particles_give_the_unchunked_estimate(factory):
    def make(chunk):
        kwargs = dict(num_particles=12, sigma=0.1, key=5, particle_chunk_size=chunk)
        if factory is not pes_optax.full_es:
            kwargs["truncation_length"] = 3
        return factory(_quadratic_problem(horizon=4), **kwargs)

    whole, whole_state = _run(make(None), THETA, 3)
    chunked, chunked_state = _run(make(4), THETA, 3)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked), strict=True):
        # Only the order of the float sum over particles differs.
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(
        jax.tree.leaves(whole_state.accumulator),
        jax.tree.leaves(chunked_state.accumulator),
        strict=True,
    ):
        # Same draws; XLA may fuse the scaling differently (1 ulp).
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("policy", ["drop_pair", "skip_update"])
def test_chunked_nonfinite_policy_matches_unchunked(policy):
    def make(chunk):
        return pes_optax.pes(
            _nan_above_one_problem(),
            num_particles=64,
            sigma=1.0,
            truncation_length=2,
            key=7,
            nonfinite_policy=policy,
            particle_chunk_size=chunk,
        )

    whole, whole_state = _run(make(None), jnp.asarray(0.0), 1)
    chunked, chunked_state = _run(make(8), jnp.asarray(0.0), 1)
    np.testing.assert_allclose(whole[0], chunked[0], rtol=1e-5, atol=1e-6)
    assert int(whole_state.diagnostics.num_dropped_pairs) > 0
    np.testing.assert_array_equal(
        whole_state.diagnostics.num_dropped_pairs,
        chunked_state.diagnostics.num_dropped_pairs,
    )


@pytest.mark.parametrize("chunk", [5, 3, 0])
def test_bad_chunk_sizes_are_refused(chunk):
    with pytest.raises((ValueError, TypeError), match="particle_chunk_size"):
        _pes(num_particles=12, particle_chunk_size=chunk)


@pytest.mark.parametrize(
    ("num_particles", "chunk", "suggested"),
    [(12, 5, 4), (12, 3, 2), (16, 14, 8), (20, 1, 2)],
)
def test_bad_chunk_size_error_suggests_the_nearest_valid_size(
    num_particles, chunk, suggested
):
    with pytest.raises(ValueError, match=f"such as {suggested}\\."):
        _pes(num_particles=num_particles, particle_chunk_size=chunk)


def test_overflowing_weighted_sum_is_dropped_not_propagated():
    problem = pes_optax.UnrolledProblem(
        lambda key, theta: jnp.zeros(()),
        lambda theta, s, key, data: (s, 1e37 + 0.0 * theta),  # finite loss
        horizon=4,
    )
    transform = pes_optax.pes(
        problem, num_particles=8, sigma=1e-3, truncation_length=2, key=0
    )
    estimate, state = transform.update(
        jnp.zeros(()), transform.init(jnp.asarray(0.0)), jnp.asarray(0.0)
    )
    assert float(estimate) == 0.0
    assert int(state.diagnostics.num_dropped_pairs) == 4


# ---------------------------------------------------------------- robustness


ALL_FACTORIES = {
    "pes": lambda p: pes_optax.pes(
        p, num_particles=4, sigma=0.1, truncation_length=2, key=0
    ),
    "nres": lambda p: pes_optax.nres(
        p, num_particles=4, sigma=0.1, truncation_length=2, key=0
    ),
    "full_es": lambda p: pes_optax.full_es(p, num_particles=4, sigma=0.1, key=0),
    "pes_a": lambda p: pes_optax.pes_a(
        p, num_particles=4, sigma=0.1, truncation_length=2, key=0
    ),
    "truncated_es": lambda p: pes_optax.truncated_es(
        p, num_particles=4, sigma=0.1, truncation_length=2, key=0
    ),
    "bptt": lambda p: pes_optax.bptt(p, key=0),
    "tbptt": lambda p: pes_optax.tbptt(p, truncation_length=2, key=0),
    "rtrl": lambda p: pes_optax.rtrl(p, truncation_length=2, key=0),
    "uoro": lambda p: pes_optax.uoro(p, truncation_length=2, key=0),
}


@pytest.mark.parametrize("name", sorted(ALL_FACTORIES))
def test_python_float_theta_is_accepted(name):
    transform = ALL_FACTORIES[name](_recording_problem(horizon=4))
    estimate, _ = transform.update(0.0, transform.init(0.5), 0.5)
    assert np.isfinite(float(estimate))


@pytest.mark.parametrize("name", sorted(ALL_FACTORIES))
def test_step_returning_one_value_gets_a_clear_error(name):
    problem = pes_optax.UnrolledProblem(
        lambda key, theta: jnp.zeros(()), lambda theta, s, key, data: s + theta, 4
    )
    transform = ALL_FACTORIES[name](problem)
    with pytest.raises(TypeError, match=r"`step` must return a pair"):
        transform.update(
            jnp.zeros(()), transform.init(jnp.asarray(0.5)), jnp.asarray(0.5)
        )


@pytest.mark.parametrize("name", sorted(ALL_FACTORIES))
def test_every_estimator_records_its_settings(name):
    config = ALL_FACTORIES[name](_recording_problem(horizon=4)).update.estimator_config
    assert config["estimator"] == name


def test_state_of_another_estimator_is_refused():
    problem = _recording_problem(horizon=4)
    pes_state = ALL_FACTORIES["pes"](problem).init(jnp.asarray(0.5))
    for name in ("nres", "pes_a", "truncated_es"):
        with pytest.raises(TypeError, match="state"):
            ALL_FACTORIES[name](problem).update(
                jnp.zeros(()), pes_state, jnp.asarray(0.5)
            )


@pytest.mark.parametrize(
    "sigma",
    [1e-30, 1e39, optax.linear_schedule(0.1, 0.0, 5), lambda count: 0.1 - count],
)
def test_unusable_sigma_values_and_schedules_are_refused(sigma):
    with pytest.raises(ValueError, match="sigma"):
        _pes(sigma=sigma)


def test_numpy_and_jax_scalars_are_accepted():
    problem = pes_optax.UnrolledProblem(
        lambda key, theta: jnp.zeros(()),
        lambda theta, s, key, data: (s + theta, s**2),
        horizon=np.int64(4),
    )
    assert problem.horizon == 4 and isinstance(problem.horizon, int)
    _pes(problem=problem, sigma=jnp.asarray(0.1))
    _pes(problem=problem, sigma=np.float32(0.1), num_particles=np.int64(4))


def test_seed_must_fit_in_64_bits():
    with pytest.raises(ValueError, match="seed"):
        _pes(key=2**63)

"""The contract every registered estimator passes.

Each estimator in ``REGISTRY`` goes through the same checks: jit and
``lax.scan``, one trace across calls, stable state structure, float32 and
bfloat16 theta, output structure, extra arguments through ``optax.chain`` and
determinism. The unbiased ones must match ``bptt`` on a small linear-quadratic
unroll within ``Z`` standard errors over ``NUM_SEEDS`` seeds, with resets
inside truncations; RTRL and TBPTT with ``K = T`` must match it exactly; and
TBPTT with a short window and truncated ES must fail that match on a system
whose short- and long-term influences have opposite signs.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pes_optax

HORIZON, K = 5, 2  # resets fall inside truncations
NUM_SEEDS, Z = 2000, 3.0
A = jnp.array([[0.9, 0.2, 0.0], [-0.1, 0.8, 0.3], [0.0, 0.2, 0.7]])
B = jnp.array([[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]])
TARGET = jnp.array([1.0, -2.0, 0.5])
THETA = {"w": jnp.array([0.3, -0.2]), "b": jnp.asarray(0.1)}


class Entry(NamedTuple):
    make: object  # (problem, key) -> transform
    kind: str  # "unbiased", "exact", "biased" or "reference"


def _es(factory, **kwargs):
    def make(problem, key):
        return factory(
            problem, num_particles=4, sigma=0.3, truncation_length=K, key=key, **kwargs
        )

    return make


REGISTRY = {
    "pes": Entry(_es(pes_optax.pes), "unbiased"),
    "pes_stagger": Entry(_es(pes_optax.pes, stagger=True), "behaviour"),
    "nres": Entry(_es(pes_optax.nres, stagger=False), "unbiased"),
    "pes_a": Entry(_es(pes_optax.pes_a), "unbiased"),
    "truncated_es": Entry(_es(pes_optax.truncated_es), "biased"),
    "full_es": Entry(
        lambda p, k: pes_optax.full_es(p, num_particles=4, sigma=0.3, key=k),
        "whole_problem",
    ),
    "tbptt": Entry(
        lambda p, k: pes_optax.tbptt(p, truncation_length=K, key=k), "biased"
    ),
    "rtrl": Entry(lambda p, k: pes_optax.rtrl(p, truncation_length=K, key=k), "exact"),
    "uoro": Entry(
        lambda p, k: pes_optax.uoro(p, truncation_length=K, key=k), "unbiased"
    ),
    "bptt": Entry(lambda p, k: pes_optax.bptt(p, key=k), "reference"),
}
NAMES = sorted(REGISTRY)


def linear_quadratic_problem(traces=None):
    def init(key, theta):
        return jnp.full((3,), 0.5) + 0.2 * theta["b"]

    def step(theta, s, key, data):
        if traces is not None:
            traces.append(1)
        s = A @ s + B @ theta["w"] + theta["b"]
        return s, 0.5 * jnp.sum((s - TARGET) ** 2)

    return pes_optax.UnrolledProblem(init, step, horizon=HORIZON)


def _zeros(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def _updates_per_problem(name):
    return 1 if name in ("bptt", "full_es") else HORIZON // np.gcd(HORIZON, K)


def _run(transform, theta, num_updates, extra=None):
    update = jax.jit(transform.update)
    state = transform.init(theta)
    outputs = []
    for _ in range(num_updates):
        out, state = update(_zeros(theta), state, theta, **(extra or {}))
        outputs.append(out)
    return outputs, state


# ------------------------------------------------------------------ mechanics


@pytest.mark.parametrize("name", NAMES)
def test_jit_one_trace_and_stable_state(name):
    traces = []
    transform = REGISTRY[name].make(linear_quadratic_problem(traces), 0)
    update = jax.jit(transform.update)
    state = transform.init(THETA)
    _, state = update(_zeros(THETA), state, THETA)
    first_traces, structure = len(traces), jax.tree.structure(state)
    shapes = [(x.shape, x.dtype) for x in jax.tree.leaves(state)]
    for scale in (2.0, -1.0, 0.5):
        theta = jax.tree.map(lambda t, s=scale: t * s, THETA)
        out, state = update(_zeros(theta), state, theta)
        assert jax.tree.structure(out) == jax.tree.structure(THETA)
    assert len(traces) == first_traces > 0
    assert jax.tree.structure(state) == structure
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(state)] == shapes


@pytest.mark.parametrize("name", NAMES)
def test_inside_lax_scan_matches_python_loop(name):
    transform = REGISTRY[name].make(linear_quadratic_problem(), 3)

    def body(state, _):
        out, state = transform.update(_zeros(THETA), state, THETA)
        return state, out

    _, scanned = jax.lax.scan(body, transform.init(THETA), length=3)
    looped, _ = _run(transform, THETA, 3)
    for step in range(3):
        for a, b in zip(
            jax.tree.leaves(jax.tree.map(lambda x, s=step: x[s], scanned)),
            jax.tree.leaves(looped[step]),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_theta(name):
    theta = {"w": THETA["w"].astype(jnp.bfloat16), "b": THETA["b"]}
    transform = REGISTRY[name].make(linear_quadratic_problem(), 0)
    outputs, state = _run(transform, theta, 2)
    assert outputs[-1]["w"].dtype == jnp.bfloat16
    assert outputs[-1]["b"].dtype == jnp.float32
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(outputs))
    accumulator = getattr(state, "accumulator", ())
    for leaf in jax.tree.leaves(accumulator):
        assert leaf.dtype == jnp.float32


@pytest.mark.parametrize("name", NAMES)
def test_extra_args_pass_through_optax_chain(name):
    opt = optax.chain(
        REGISTRY[name].make(linear_quadratic_problem(), 0), optax.adam(1e-2)
    )
    state = opt.init(THETA)
    updates, state = opt.update(
        _zeros(THETA), state, THETA, data=None, unrelated=jnp.ones(3)
    )
    assert jax.tree.structure(updates) == jax.tree.structure(THETA)
    assert pes_optax.find_diagnostics(state) is not None


@pytest.mark.parametrize("name", NAMES)
def test_determinism(name):
    def outputs(seed):
        transform = REGISTRY[name].make(linear_quadratic_problem(), seed)
        return jax.tree.leaves(_run(transform, THETA, 3)[0])

    for a, b in zip(outputs(1), outputs(1), strict=True):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ gradients


def _exact_whole_problem_gradient():
    problem = linear_quadratic_problem()
    return jax.grad(lambda t: pes_optax.unroll(problem, t, jax.random.key(0)))(THETA)


def _summed_estimates(name, num_seeds):
    """Per seed, the estimates summed over one inner problem (theta fixed)."""
    make = REGISTRY[name].make
    num_updates = _updates_per_problem(name)
    num_problems = num_updates * K // HORIZON if name not in ("bptt", "full_es") else 1

    def one_seed(key):
        transform = make(linear_quadratic_problem(), key)
        state = transform.init(THETA)
        total = _zeros(THETA)
        for _ in range(num_updates):
            total, state = transform.update(total, state, THETA)
        return jax.tree.map(lambda t: t / num_problems, total)

    keys = jax.random.split(jax.random.key(99), num_seeds)
    return jax.jit(jax.vmap(one_seed))(keys)


def _max_z(samples, exact):
    scores = []
    for x, e in zip(jax.tree.leaves(samples), jax.tree.leaves(exact), strict=True):
        x = np.asarray(x, np.float64)
        standard_error = x.std(axis=0, ddof=1) / np.sqrt(x.shape[0])
        floor = 1e-5 * (np.abs(np.asarray(e)) + 1.0)
        scores.append(np.abs(x.mean(axis=0) - e) / np.maximum(standard_error, floor))
    return float(np.max(np.concatenate([np.ravel(s) for s in scores])))


def test_bptt_is_the_exact_gradient():
    samples = _summed_estimates("bptt", 1)
    exact = _exact_whole_problem_gradient()
    for a, b in zip(jax.tree.leaves(samples), jax.tree.leaves(exact), strict=True):
        np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name", [n for n in NAMES if REGISTRY[n].kind in ("unbiased", "whole_problem")]
)
def test_unbiased_estimators_match_bptt(name):
    exact = _exact_whole_problem_gradient()
    assert _max_z(_summed_estimates(name, NUM_SEEDS), exact) < Z


def test_rtrl_and_full_window_tbptt_match_bptt_exactly():
    exact = _exact_whole_problem_gradient()
    rtrl = _summed_estimates("rtrl", 1)
    full_window = pes_optax.tbptt(
        linear_quadratic_problem(), truncation_length=HORIZON, key=0
    )
    tbptt_out, _ = _run(full_window, THETA, 1)
    for estimate in (jax.tree.map(lambda x: x[0], rtrl), tbptt_out[0]):
        for a, b in zip(jax.tree.leaves(estimate), jax.tree.leaves(exact), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _opposite_influence_problem():
    """Influence balancing: short windows see the wrong sign of the gradient."""
    size = 23
    matrix = 0.5 * (jnp.eye(size) + jnp.eye(size, k=1))
    drive = jnp.concatenate([jnp.ones(10), -jnp.ones(13)])

    def init(key, theta):
        return jnp.ones(size)

    def step(theta, s, key, data):
        s = matrix @ s + theta["w"] * drive
        return s, 0.5 * (s[0] - 1.0) ** 2

    return pes_optax.UnrolledProblem(init, step, horizon=100)


def test_short_window_tbptt_and_truncated_es_are_biased():
    problem = _opposite_influence_problem()
    theta = {"w": jnp.asarray(0.0)}
    exact = jax.grad(lambda t: pes_optax.unroll(problem, t, jax.random.key(0)))(theta)[
        "w"
    ]

    # TBPTT(K=1) summed over the inner problem: the wrong sign.
    tbptt = pes_optax.tbptt(problem, truncation_length=1, key=0)
    outputs, _ = _run(tbptt, theta, 100)
    tbptt_total = sum(float(o["w"]) for o in outputs)
    assert np.sign(tbptt_total) != np.sign(float(exact))

    def summed_estimates(factory, seed):
        """The estimate summed over 10 updates, for 500 keys."""

        def one_seed(key):
            transform = factory(
                problem, num_particles=4, sigma=0.01, truncation_length=10, key=key
            )
            state = transform.init(theta)
            total = _zeros(theta)
            for _ in range(10):
                total, state = transform.update(total, state, theta)
            return total["w"]

        keys = jax.random.split(jax.random.key(seed), 500)
        return np.asarray(jax.jit(jax.vmap(one_seed))(keys), np.float64)

    # Truncated ES, mean over seeds: many standard errors from the exact value.
    samples = summed_estimates(pes_optax.truncated_es, 0)
    standard_error = samples.std(ddof=1) / np.sqrt(samples.size)
    assert abs(samples.mean() - float(exact)) > 10 * Z * standard_error

    # PES passes the same check on the same system.
    pes = summed_estimates(pes_optax.pes, 1)
    pes_error = pes.std(ddof=1) / np.sqrt(pes.size)
    assert abs(pes.mean() - float(exact)) < Z * pes_error

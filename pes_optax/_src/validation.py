"""Argument checks shared by the estimator factories and their updates.

Every check raises at construction or trace time, never inside the compiled
program, and its message names the argument, the value received and the fix.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pes_optax._src.problem import UnrolledProblem

PyTree = Any
ScalarOrSchedule = float | Callable[[jax.Array], jax.Array]


def check_problem(problem: Any) -> UnrolledProblem:
    if not isinstance(problem, UnrolledProblem):
        raise TypeError(
            "`problem` must be a pes_optax.UnrolledProblem, got "
            f"{type(problem).__name__}. Build one with "
            "pes_optax.UnrolledProblem(init=..., step=..., horizon=...)."
        )
    return problem


def check_state_type(state: Any, expected: type, estimator: str) -> None:
    """Requires ``state`` to be the state this estimator's ``init`` builds."""
    if not isinstance(state, expected):
        raise TypeError(
            f"`state` must be the {expected.__name__} built by this "
            f"estimator's init ({estimator}), got {type(state).__name__}. Pass "
            "the state returned by the same transform's init or update."
        )


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be a positive int, got {value!r}.")
    if value < 1:
        raise ValueError(f"`{name}` must be >= 1, got {value}.")
    return int(value)


def check_num_particles(num_particles: Any, antithetic: bool) -> int:
    num_particles = check_positive_int("num_particles", num_particles)
    if antithetic and num_particles % 2:
        raise ValueError(
            f"`num_particles` must be even with antithetic sampling, got "
            f"{num_particles}. Use {num_particles + 1} (or "
            f"{max(num_particles - 1, 2)}), or pass antithetic=False."
        )
    return num_particles


def check_truncation_length(truncation_length: Any, horizon: int | None) -> int:
    truncation_length = check_positive_int("truncation_length", truncation_length)
    if horizon is not None and truncation_length > horizon:
        raise ValueError(
            f"`truncation_length` ({truncation_length}) must not exceed the "
            f"problem's `horizon` ({horizon}). Use a truncation length of at "
            f"most {horizon}, or full_es for one truncation per inner problem."
        )
    return truncation_length


# sigma^2 must stay a normal float32 number: 1e-18 <= sigma <= 1e18.
SIGMA_RANGE = (1e-18, 1e18)
# Steps at which a sigma schedule is checked when the estimator is built.
SIGMA_CHECK_STEPS = (0, 1, 2, 3, 10, 30, 100, 300, 1_000, 10_000, 100_000, 1_000_000)


def _sigma_problem(value: Any) -> str | None:
    """Why ``value`` is not a usable sigma, or ``None`` when it is."""
    low, high = SIGMA_RANGE
    if np.shape(value) != ():
        return f"a value of shape {np.shape(value)} (it must be a scalar)"
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        return f"{value} (it must be a finite number > 0)"
    if not low <= value <= high:
        return f"{value} (its square under- or overflows float32; use {low}..{high})"
    return None


def check_sigma(sigma: Any) -> Callable[[jax.Array], jax.Array]:
    """Returns ``sigma`` as a schedule of the outer step count.

    A schedule is evaluated at :data:`SIGMA_CHECK_STEPS`, so one that decays
    to zero or below is refused when the estimator is built.
    """
    if callable(sigma):
        for step in SIGMA_CHECK_STEPS:
            with jax.ensure_compile_time_eval():
                problem = _sigma_problem(np.asarray(sigma(step)))
            if problem is not None:
                raise ValueError(
                    f"`sigma` schedule returned {problem} at outer step {step}. "
                    "A perturbation scale must stay > 0: give the schedule a "
                    "positive floor, e.g. optax.linear_schedule(0.1, 0.01, ...)."
                )
        return sigma
    if isinstance(sigma, bool) or not (
        isinstance(sigma, numbers.Real)
        or (isinstance(sigma, np.ndarray | jax.Array) and np.shape(sigma) == ())
    ):
        raise TypeError(
            f"`sigma` must be a positive float or a schedule (callable of the "
            f"outer step), got {sigma!r}."
        )
    problem = _sigma_problem(sigma)
    if problem is not None:
        raise ValueError(
            f"`sigma` (the perturbation standard deviation) got {problem}. "
            "Typical values are 1e-3 to 1.0."
        )
    value = float(sigma)
    return lambda count: jnp.asarray(value, jnp.float32)


def describe_sigma(sigma: Any) -> Any:
    """A JSON-ready description of ``sigma`` that is stable across processes."""
    if not callable(sigma):
        return float(sigma)
    with jax.ensure_compile_time_eval():
        values = [float(np.asarray(sigma(step))) for step in SIGMA_CHECK_STEPS]
    return {"schedule_at_steps": list(SIGMA_CHECK_STEPS), "values": values}


def tag(transform: Any, **config: Any) -> Any:
    """Records an estimator's settings on its ``update`` function.

    The driver puts ``transform.update.estimator_config`` in its checkpoint
    fingerprint, so that a checkpoint is only restored into the same
    estimator with the same settings.
    """
    transform.update.estimator_config = config
    return transform


def check_key(key: Any) -> jax.Array:
    """Returns a typed PRNG key from a typed key or an int seed."""
    if isinstance(key, numbers.Integral) and not isinstance(key, bool):
        if not -(2**63) <= int(key) < 2**63:
            raise ValueError(
                f"`key` seed {key} does not fit in 64 bits; use a seed in "
                "[0, 2**63) or pass jax.random.key(seed)."
            )
        return jax.random.key(int(key))
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(
                f"`key` must be a single typed key, got a key array of shape "
                f"{key.shape}. Pass one key, e.g. jax.random.key(0)."
            )
        return key
    raise TypeError(
        f"`key` must be a typed PRNG key from jax.random.key(seed) or an int "
        f"seed, got {key!r}. Legacy uint32 keys from jax.random.PRNGKey can "
        "be converted with jax.random.wrap_key_data."
    )


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")
    return value


def check_theta(theta: PyTree, name: str = "params") -> None:
    """Requires a non-empty pytree of floating arrays."""
    if theta is None:
        raise ValueError(
            f"`{name}` is None. The estimator needs the current parameters: "
            "call update(updates, state, params) with params=theta."
        )
    leaves_with_path = jax.tree_util.tree_leaves_with_path(theta)
    if not leaves_with_path:
        raise ValueError(f"`{name}` has no array leaves; got {theta!r}.")
    for path, leaf in leaves_with_path:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"`{name}` leaf {jax.tree_util.keystr(path)} has dtype {dtype}; "
                "every leaf of theta must be floating. Cast it, e.g. "
                "jnp.asarray(x, jnp.float32), or keep integer constants out "
                "of theta (close over them in the problem's functions)."
            )


def check_same_structure(name: str, tree: PyTree, reference: PyTree, what: str):
    """Requires ``tree`` to have ``reference``'s structure and leaf shapes."""
    tree, reference = jax.tree.map(jnp.asarray, (tree, reference))
    try:
        chex.assert_trees_all_equal_structs(tree, reference)
        chex.assert_trees_all_equal_shapes(tree, reference)
    except AssertionError as error:
        raise ValueError(
            f"`{name}` does not match {what}: {error}. Pass the same theta "
            "structure that was given to init, or re-initialise the state."
        ) from None


def _leaf_name(path) -> str:
    return f"leaf {jax.tree_util.keystr(path)} " if path else ""


def check_data(
    data: PyTree, truncation_length: int, length_name: str = "truncation_length"
) -> None:
    """Requires every data leaf to have a leading axis of ``truncation_length``."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(data):
        shape = jnp.shape(leaf)
        if not shape or shape[0] != truncation_length:
            raise ValueError(
                f"`data` {_leaf_name(path)}has shape {shape}; "
                f"every leaf needs a leading axis of {length_name}="
                f"{truncation_length} (one slice per inner step)."
            )


def check_chunk_size(
    particle_chunk_size: Any, num_particles: int, antithetic: bool, num_devices: int
) -> int:
    """Returns the number of particle blocks (1 without chunking).

    With particles sharded over ``num_devices`` devices, every block takes the
    same number of particles from each device, so a block size must be a
    multiple of ``num_devices`` (times 2 with antithetic pairs).
    """
    if particle_chunk_size is None:
        return 1
    size = check_positive_int("particle_chunk_size", particle_chunk_size)
    multiple = num_devices * (2 if antithetic else 1)
    if num_particles % size or size % multiple:
        needs = []
        if antithetic:
            needs.append("antithetic pairs stay together")
        if num_devices > 1:
            needs.append(f"each of the {num_devices} devices gets an equal share")
        raise ValueError(
            f"`particle_chunk_size` ({size}) must divide `num_particles` "
            f"({num_particles})"
            + (f" and be a multiple of {multiple}" if multiple > 1 else "")
            + (f" ({', and '.join(needs)})" if needs else "")
            + ". Pick a divisor such as "
            + f"{_largest_divisor(num_particles, size, multiple)}."
        )
    return num_particles // size


def _largest_divisor(num_particles: int, at_most: int, multiple_of: int) -> int:
    """The valid block size nearest ``at_most``: the largest one not above it,
    else the smallest one above it (``num_particles`` itself is always valid).
    """
    valid = [
        c
        for c in range(multiple_of, num_particles + 1, multiple_of)
        if num_particles % c == 0
    ]
    below = [c for c in valid if c <= at_most]
    return below[-1] if below else valid[0]


def check_transformation(name: str, value: Any) -> None:
    """An optax transformation (the driver's estimator or optimizer)."""
    if not isinstance(value, optax.GradientTransformation):
        raise TypeError(
            f"`{name}` must be an optax gradient transformation (e.g. "
            f"pes_optax.pes(...) or optax.adam(1e-2)), got {value!r}."
        )


def check_eval(eval_fn: Any, eval_every: Any) -> int | None:
    """``eval_every`` as an int when ``eval_fn`` is given, else ``None``."""
    if eval_fn is None and eval_every is None:
        return None
    if eval_fn is None or not callable(eval_fn):
        raise TypeError(
            f"`eval_fn` must be a callable (theta, key) -> scalar when "
            f"`eval_every` is given, got {eval_fn!r}."
        )
    if eval_every is None:
        raise ValueError(
            "`eval_every` is None but `eval_fn` was given; pass the number of "
            "outer steps between evaluations, e.g. eval_every=100."
        )
    return check_positive_int("eval_every", eval_every)


def check_num_steps(num_steps: Any) -> int:
    """A count of outer steps, 0 allowed."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral):
        raise TypeError(f"`num_steps` must be an int >= 0, got {num_steps!r}.")
    if num_steps < 0:
        raise ValueError(f"`num_steps` must be an int >= 0, got {num_steps!r}.")
    return int(num_steps)

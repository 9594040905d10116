"""Shared pieces of the benchmarks: settings, timing and memory measurement.

The benchmark scripts in this folder import this module by file location
(``python benchmarks/<script>.py`` puts the folder on ``sys.path``). Nothing
here is part of the ``pes_optax`` package.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pes_optax

PyTree = Any


# Settings.


@dataclasses.dataclass(frozen=True)
class Setting:
    """One benchmarked problem with its estimator and loop sizes."""

    name: str
    problem: pes_optax.UnrolledProblem
    theta: jax.Array
    num_particles: int
    truncation_length: int
    sigma: float
    learning_rate: float
    steps_fused: int  # outer steps per fused call (one timed repeat)
    steps_one_call: int  # outer steps per timed repeat, one call per step
    # Outer steps per timed repeat, separate dispatches. With a finite horizon
    # a multiple of T / K, so that every repeat of a loop that restarts its
    # particles in Python (eagerly) holds the same number of restarts.
    steps_dispatched: int
    description: str


def influence_balancing_problem() -> pes_optax.UnrolledProblem:
    """The 23-d influence-balancing system of the PES paper (section 2)."""
    try:
        from pes_optax.tasks import influence_balancing
    except ImportError:  # the tasks subpackage is optional for the benchmark
        influence_balancing = None
    if influence_balancing is not None:
        return influence_balancing.make_problem()

    size = 23
    matrix = 0.5 * (jnp.eye(size) + jnp.eye(size, k=1))
    influence = jnp.where(jnp.arange(size) < 10, 1.0, -1.0)

    def init(key, theta):
        del key, theta
        return jnp.ones((size,), jnp.float32)

    def step(theta, state, key, data):
        del key, data
        state = matrix @ state + theta * influence
        return state, 0.5 * (state[0] - 1.0) ** 2

    return pes_optax.UnrolledProblem(init, step, None, "last")


def recurrent_problem(
    state_size: int, theta_size: int, horizon: int
) -> pes_optax.UnrolledProblem:
    """``s <- tanh(W s + V theta)`` with a fixed ``W``; loss ``mean(s^2)``."""
    w_key, v_key = jax.random.split(jax.random.key(1234))
    matrix = 0.9 * jax.random.normal(w_key, (state_size, state_size))
    matrix = matrix / math.sqrt(state_size)
    projection = jax.random.normal(v_key, (state_size, theta_size))

    def init(key, theta):
        del key, theta
        return jnp.full((state_size,), 0.1, jnp.float32)

    def step(theta, state, key, data):
        del key, data
        state = jnp.tanh(matrix @ state + projection @ theta)
        return state, jnp.mean(state**2)

    return pes_optax.UnrolledProblem(init, step, horizon, "sum")


def mlp_problem(
    hidden: int, batch_size: int, input_size: int, horizon: int
) -> pes_optax.UnrolledProblem:
    """A Flax MLP trained by SGD on synthetic regression; theta = log lr."""
    import flax.linen as nn  # only this setting needs Flax

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.tanh(nn.Dense(hidden)(x))
            x = nn.tanh(nn.Dense(hidden)(x))
            return nn.Dense(1)(x)[..., 0]

    model = MLP()
    teacher = jax.random.normal(jax.random.key(7), (input_size,))

    def batch(key):
        x = jax.random.normal(key, (batch_size, input_size))
        return x, jnp.sin(x @ teacher)

    def init(key, theta):
        del theta
        return model.init(key, jnp.zeros((1, input_size)))

    def step(theta, params, key, data):
        del data
        x, y = batch(key)

        def mse(p):
            return jnp.mean((model.apply(p, x) - y) ** 2)

        loss, grads = jax.value_and_grad(mse)(params)
        learning_rate = jnp.exp(theta)
        params = jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)
        return params, loss

    return pes_optax.UnrolledProblem(init, step, horizon, "mean")


def throughput_settings(quick: bool) -> list[Setting]:
    """The three throughput settings (tiny sizes with ``quick``)."""
    return [
        influence_balancing_setting(quick),
        compute_bound_setting(quick),
        flax_mlp_setting(quick),
    ]


def influence_balancing_setting(quick: bool) -> Setting:
    """The paper's influence balancing: state 23, N=1000, K=1, endless."""
    num_particles = 16 if quick else 1000
    return Setting(
        name="influence_balancing",
        problem=influence_balancing_problem(),
        theta=jnp.asarray(0.5, jnp.float32),
        num_particles=num_particles,
        truncation_length=1,
        sigma=0.1,
        learning_rate=1e-4,
        steps_fused=20 if quick else 1000,
        steps_one_call=20 if quick else 300,
        steps_dispatched=5 if quick else 60,
        description=f"state 23, N={num_particles}, K=1, endless (dispatch-bound)",
    )


def pes_estimator(setting: Setting) -> optax.GradientTransformationExtraArgs:
    """``pes_optax.pes`` with the setting's particles, sigma and K (key 0)."""
    return pes_optax.pes(
        setting.problem,
        num_particles=setting.num_particles,
        sigma=setting.sigma,
        truncation_length=setting.truncation_length,
        key=jax.random.key(0),
    )


def compute_bound_setting(quick: bool) -> Setting:
    """``tanh(W s + V theta)``: state 1000, theta 32, N=256, K=10, T=100."""
    state_size, theta_size = (32, 4) if quick else (1000, 32)
    num_particles, length, horizon = (8, 2, 8) if quick else (256, 10, 100)
    return Setting(
        name="compute_bound",
        problem=recurrent_problem(state_size, theta_size, horizon),
        theta=jnp.zeros((theta_size,), jnp.float32),
        num_particles=num_particles,
        truncation_length=length,
        sigma=0.1,
        learning_rate=1e-3,
        steps_fused=8 if quick else 10,
        steps_one_call=8 if quick else 10,
        steps_dispatched=4 if quick else 10,
        description=(
            f"tanh(W s + V theta), state {state_size}, theta {theta_size}, "
            f"T={horizon}, N={num_particles}, K={length}"
        ),
    )


def flax_mlp_setting(quick: bool) -> Setting:
    """A Flax MLP inner loop: theta = log learning rate, T=100, N=128, K=10."""
    hidden, batch_size = (8, 8) if quick else (32, 32)
    num_particles, length, horizon = (8, 2, 8) if quick else (128, 10, 100)
    return Setting(
        name="flax_mlp",
        problem=mlp_problem(hidden, batch_size, input_size=8, horizon=horizon),
        theta=jnp.asarray(math.log(0.05), jnp.float32),
        num_particles=num_particles,
        truncation_length=length,
        sigma=0.1,
        learning_rate=1e-3,
        steps_fused=8 if quick else 50,
        steps_one_call=8 if quick else 50,
        steps_dispatched=4 if quick else 10,
        description=(
            f"Flax MLP 8-{hidden}-{hidden}-1 trained by SGD, batch {batch_size}, "
            f"T={horizon}, N={num_particles}, K={length}"
        ),
    )


# Measurement.


def block(tree: PyTree) -> PyTree:
    return jax.block_until_ready(tree)


def time_samples(
    runners: dict[str, tuple[Callable[[], PyTree], int]], repeats: int
) -> dict[str, list[float]]:
    """Outer iterations per second of each runner, one sample per repeat.

    ``runners`` maps a name to ``(run, num_steps)``: ``run()`` advances that
    implementation ``num_steps`` outer steps and returns something to block
    on. Each runner is warmed up twice (compilation; the second call catches
    a recompilation when a state's weak types settle after the first), then
    the runners take turns, one repeat each, so that a change in machine load
    hits them all.
    """
    for run, _ in runners.values():
        block(run())
        block(run())
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, (run, num_steps) in runners.items():
            start = time.perf_counter()
            block(run())
            rates[name].append(num_steps / (time.perf_counter() - start))
    return rates


def time_interleaved(
    runners: dict[str, tuple[Callable[[], PyTree], int]], repeats: int
) -> dict[str, float]:
    """Median of :func:`time_samples` for each runner."""
    samples = time_samples(runners, repeats)
    return {name: statistics.median(values) for name, values in samples.items()}


def compiled_footprint(compiled) -> int | None:
    """Bytes an executable needs: arguments + outputs + temporaries - aliases."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if stats is None:
        return None
    total = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )
    return int(total)


def device_peak_bytes() -> int | None:
    """The device allocator's process-wide peak, where the backend keeps one."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None
    if not stats:
        return None
    return stats.get("peak_bytes_in_use")


def max_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mib(num_bytes: int | None) -> str:
    """Bytes as MiB, with enough digits for kilobyte-sized programs."""
    if num_bytes is None:
        return "n/a"
    value = num_bytes / 2**20
    return f"{value:.2f}" if value >= 1 else f"{value:.4f}"


def machine_lines() -> list[str]:
    """Device, host and load average, for the head of every report."""
    load = os.getloadavg()
    return [
        f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"devices {jax.devices()}",
        f"host: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs visible to the OS",
        "load average (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in load),
    ]


def load_line() -> str:
    return "load average now: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return (
            "| "
            + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
            + " |"
        )

    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))


def finite_positive(value: float) -> bool:
    return bool(np.isfinite(value) and value > 0)

"""Memory against the horizon and compile cost against the truncation length.

(a) The compiled footprint of one ``optax.chain(estimator, sgd).update`` of
    ``pes``, ``nres``, ``truncated_es`` (same ``K``) and ``full_es`` (which
    unrolls the whole horizon) at horizon ``T=100`` and ``T=100000``: it
    should be flat in ``T`` (ratio within 10%).
(b) Lowering and compile time, the size of the lowered (StableHLO) and
    compiled (HLO) program text, and the footprint, for ``K=10`` against
    ``K=1000``: none of them should grow with ``K``.
(c) If ``bptt`` is available: its footprint against the horizon, keeping
    every step's residuals and with rematerialisation
    (``checkpoint_every`` near ``sqrt(T)``).
(d) Large theta (about a million parameters) with many particles: the
    footprint and the temporaries of one update with all particles at once
    and with ``particle_chunk_size``, and the largest difference between the
    two updates, ``sgd(1e-3)`` of the estimates (one update each, same key).

Footprint = arguments + outputs + temporaries - aliased buffers, from the
compiled executable's ``memory_analysis()`` (static: what XLA allocates for
one call, on any backend).

Run: ``python benchmarks/memory_compile.py [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax
from _common import (
    compiled_footprint,
    load_line,
    machine_lines,
    mib,
    print_table,
    recurrent_problem,
)

import pes_optax

FLAT_TARGET = 1.10  # footprint at the long horizon at most 10% above the short one
ESTIMATORS = ("pes", "nres", "truncated_es", "full_es")


def build(name: str, problem, num_particles: int, truncation_length: int):
    """``optax.chain(estimator, sgd)`` for estimator ``name``."""
    common = dict(num_particles=num_particles, sigma=0.1, key=jax.random.key(0))
    if name == "full_es":
        estimator = pes_optax.full_es(problem, **common)
    else:
        factory = getattr(pes_optax, name)
        estimator = factory(problem, truncation_length=truncation_length, **common)
    return optax.chain(estimator, optax.sgd(1e-3))


def lower_update(optimizer, theta):
    """A fresh ``jax.jit`` of one update (a new function, so no cache hit)."""

    def train_step(theta, state):
        updates, state = optimizer.update(jnp.zeros_like(theta), state, theta)
        return optax.apply_updates(theta, updates), state

    state = optimizer.init(theta)
    start = time.perf_counter()
    lowered = jax.jit(train_step).lower(theta, state)
    lower_seconds = time.perf_counter() - start
    return lowered, lower_seconds


def compile_stats(optimizer, theta, repeats: int) -> dict[str, float]:
    lower_times, compile_times = [], []
    for _ in range(repeats):
        lowered, lower_seconds = lower_update(optimizer, theta)
        start = time.perf_counter()
        compiled = lowered.compile()
        compile_times.append(time.perf_counter() - start)
        lower_times.append(lower_seconds)
    return {
        "lower_s": statistics.median(lower_times),
        "compile_s": statistics.median(compile_times),
        "stablehlo_chars": len(lowered.as_text()),
        "hlo_chars": len(compiled.as_text()),
        "footprint_bytes": compiled_footprint(compiled),
    }


def footprint(optimizer, theta) -> int | None:
    lowered, _ = lower_update(optimizer, theta)
    return compiled_footprint(lowered.compile())


def horizon_memory(quick: bool) -> list[dict]:
    """(a) Footprint of one update at a short and a long horizon."""
    state_size, num_particles, length = (16, 8, 10) if quick else (256, 256, 10)
    theta = jnp.zeros((8,), jnp.float32)
    horizons = (100, 100_000)
    print(
        f"## (a) footprint vs horizon: tanh(W s + V theta), state {state_size}, "
        f"theta 8, N={num_particles}, K={length} (full_es: K=T)"
    )
    rows = []
    for name in ESTIMATORS:
        sizes = []
        for horizon in horizons:
            problem = recurrent_problem(state_size, 8, horizon)
            optimizer = build(name, problem, num_particles, length)
            sizes.append(footprint(optimizer, theta))
        ratio = sizes[1] / sizes[0] if None not in sizes else float("nan")
        rows.append(
            {
                "estimator": name,
                "short_T": horizons[0],
                "long_T": horizons[1],
                "short_bytes": sizes[0],
                "long_bytes": sizes[1],
                "ratio": ratio,
            }
        )
    print_table(
        ["estimator", "T=100 MiB", "T=100000 MiB", "ratio", "flat (<=1.10)"],
        [
            [
                r["estimator"],
                mib(r["short_bytes"]),
                mib(r["long_bytes"]),
                f"{r['ratio']:.3f}",
                "PASS" if r["ratio"] <= FLAT_TARGET else "FAIL",
            ]
            for r in rows
        ],
    )
    print(load_line())
    print()
    return rows


def truncation_compile(quick: bool) -> list[dict]:
    """(b) Compile time and program size for K=10 against K=1000."""
    state_size, num_particles = (16, 8) if quick else (256, 64)
    repeats = 1 if quick else 3
    theta = jnp.zeros((8,), jnp.float32)
    lengths = (10, 1000)
    print(
        f"## (b) compile cost vs K: tanh(W s + V theta), state {state_size}, "
        f"N={num_particles}, horizon 1000 (full_es: K=T in (10, 1000)); median "
        f"of {repeats} fresh compiles"
    )
    rows = []
    for name in ESTIMATORS:
        for length in lengths:
            problem = recurrent_problem(state_size, 8, 1000)
            if name == "full_es":
                problem = recurrent_problem(state_size, 8, length)
            optimizer = build(name, problem, num_particles, length)
            stats = compile_stats(optimizer, theta, repeats)
            rows.append({"estimator": name, "K": length, **stats})
    table = [
        [
            r["estimator"],
            str(r["K"]),
            f"{r['lower_s']:.3f}",
            f"{r['compile_s']:.3f}",
            str(r["stablehlo_chars"]),
            str(r["hlo_chars"]),
            mib(r["footprint_bytes"]),
        ]
        for r in rows
    ]
    print_table(
        ["estimator", "K", "lower s", "compile s", "StableHLO chars", "HLO chars"]
        + ["MiB"],
        table,
    )
    for name in ESTIMATORS:
        small, large = [r for r in rows if r["estimator"] == name]
        size_ratio = large["hlo_chars"] / small["hlo_chars"]
        time_ratio = large["compile_s"] / small["compile_s"]
        ok = size_ratio <= FLAT_TARGET
        print(
            f"{'PASS' if ok else 'FAIL'} {name}: HLO size K=1000/K=10 = "
            f"{size_ratio:.3f} (target <= {FLAT_TARGET}); compile time ratio "
            f"{time_ratio:.2f} (noisy, for information)"
        )
    print(load_line())
    print()
    return rows


def find_bptt():
    """``(bptt, where)``: the public ``pes_optax.bptt`` or the private one."""
    if hasattr(pes_optax, "bptt"):
        return pes_optax.bptt, "pes_optax.bptt"
    try:
        from pes_optax._src.backprop import bptt
    except ImportError:
        return None, "not available"
    return bptt, "pes_optax._src.backprop.bptt (not exported yet)"


def nearest_divisor(horizon: int) -> int:
    root = math.sqrt(horizon)
    divisors = [c for c in range(1, horizon + 1) if horizon % c == 0]
    return min(divisors, key=lambda c: abs(c - root))


def bptt_memory(quick: bool) -> list[dict]:
    """(c) BPTT footprint against the horizon, with and without remat."""
    bptt, where = find_bptt()
    if bptt is None:
        print("## (c) SKIP bptt: pes_optax has no bptt")
        return []
    state_size = 16 if quick else 256
    horizons = (100, 1000) if quick else (100, 1000, 10_000)
    theta = jnp.zeros((8,), jnp.float32)
    print(
        f"## (c) bptt footprint vs horizon ({where}): state {state_size}, "
        "checkpoint_every = divisor of T nearest sqrt(T)"
    )
    rows = []
    for horizon in horizons:
        problem = recurrent_problem(state_size, 8, horizon)
        every = nearest_divisor(horizon)
        plain = footprint(optax.chain(bptt(problem, key=0), optax.sgd(1e-3)), theta)
        remat = footprint(
            optax.chain(bptt(problem, key=0, checkpoint_every=every), optax.sgd(1e-3)),
            theta,
        )
        rows.append(
            {
                "horizon": horizon,
                "checkpoint_every": every,
                "plain_bytes": plain,
                "remat_bytes": remat,
            }
        )
    print_table(
        ["T", "no remat MiB", "checkpoint_every", "remat MiB"],
        [
            [
                str(r["horizon"]),
                mib(r["plain_bytes"]),
                str(r["checkpoint_every"]),
                mib(r["remat_bytes"]),
            ]
            for r in rows
        ],
    )
    first, last = rows[0], rows[-1]
    growth = last["horizon"] / first["horizon"]
    print(
        f"growth over {growth:.0f}x horizon: no remat "
        f"{last['plain_bytes'] / first['plain_bytes']:.1f}x, remat "
        f"{last['remat_bytes'] / first['remat_bytes']:.1f}x"
    )
    print(load_line())
    print()
    return rows


def large_theta_problem(theta_size: int, horizon: int) -> pes_optax.UnrolledProblem:
    """A 16-unit state driven by every parameter: ``s <- tanh(0.9 s + u(theta))``.

    ``u`` averages ``sin(theta)`` over 16 equal slices of theta, so each
    particle's perturbed theta and noise are ``theta_size`` floats while the
    inner state stays tiny, as for a large learned optimizer.
    """

    def init(key, theta):
        del key, theta
        return jnp.zeros((16,), jnp.float32)

    def step(theta, state, key, data):
        del key, data
        drive = jnp.mean(jnp.sin(theta).reshape(16, -1), axis=1)
        state = jnp.tanh(0.9 * state + drive)
        return state, jnp.mean((state - 0.5) ** 2)

    return pes_optax.UnrolledProblem(init, step, horizon, "sum")


def chunked_memory(quick: bool) -> list[dict]:
    """(d) All particles at once against blocks of particles, large theta."""
    sizes = (16 * 256, 16, 4) if quick else (2**20, 64, 8)
    theta_size, num_particles, chunk = sizes
    problem = large_theta_problem(theta_size, horizon=10)
    theta = 0.01 * jnp.arange(theta_size, dtype=jnp.float32) / theta_size
    print(
        f"## (d) particle_chunk_size: theta of {theta_size} floats, "
        f"N={num_particles}, K=2, one update"
    )
    rows = []
    for name in ("pes", "truncated_es"):
        results = {}
        for size in (None, chunk):
            factory = getattr(pes_optax, name)
            optimizer = optax.chain(
                factory(
                    problem,
                    num_particles=num_particles,
                    sigma=0.01,
                    truncation_length=2,
                    key=jax.random.key(0),
                    particle_chunk_size=size,
                ),
                optax.sgd(1e-3),
            )

            def estimate(theta, state, optimizer=optimizer):
                return optimizer.update(jnp.zeros_like(theta), state, theta)

            state = optimizer.init(theta)
            compiled = jax.jit(estimate).lower(theta, state).compile()
            updates, _ = compiled(theta, state)
            stats = compiled.memory_analysis()
            results[size] = (
                compiled_footprint(compiled),
                None if stats is None else int(stats.temp_size_in_bytes),
                updates,
            )
        whole, blocks = results[None], results[chunk]
        difference = float(jnp.max(jnp.abs(whole[2] - blocks[2])))
        scale = float(jnp.max(jnp.abs(whole[2])))
        for size, (total, temp, _) in results.items():
            rows.append(
                {
                    "estimator": name,
                    "particle_chunk_size": size,
                    "footprint_bytes": total,
                    "temp_bytes": temp,
                    "max_abs_diff_vs_unchunked": difference if size else 0.0,
                    "update_scale": scale,
                }
            )
    print_table(
        [
            "estimator",
            "particle_chunk_size",
            "footprint MiB",
            "temporaries MiB",
            "max |update diff| vs all at once",
            "max |update|",
        ],
        [
            [
                r["estimator"],
                str(r["particle_chunk_size"]),
                mib(r["footprint_bytes"]),
                mib(r["temp_bytes"]),
                f"{r['max_abs_diff_vs_unchunked']:.2e}",
                f"{r['update_scale']:.2e}",
            ]
            for r in rows
        ],
    )
    per_particle = theta_size * 4 / 2**20
    print(
        f"one particle's theta-sized array: {per_particle:.2f} MiB; pes keeps "
        f"an N x P accumulator in its state whatever the block size"
    )
    print(load_line())
    print()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    parser.add_argument("--json", default=None, help="also write results here")
    args = parser.parse_args(argv)

    print("# pes_optax memory and compile benchmark" + (" (--quick)" * args.quick))
    for line in machine_lines():
        print(line)
    print(
        "memory: compiled footprint from memory_analysis() (arguments + outputs "
        "+ temporaries - aliases) of one jitted chain(estimator, sgd) update"
    )
    print()
    results = {
        "horizon_memory": horizon_memory(args.quick),
        "truncation_compile": truncation_compile(args.quick),
        "bptt_memory": bptt_memory(args.quick),
        "chunked_memory": chunked_memory(args.quick),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_lines(), **results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where the time of a dispatch-bound PES step goes: the floor, piece by piece.

On influence balancing (state 23, N=1000, K=1) an outer step is tens of
microseconds, so what costs is the number of kernels XLA runs per step, not
arithmetic. This script times, fused over many outer steps in one call:

* the hand-written floor of ``throughput.py``;
* the floor plus one feature of ``pes_optax.pes`` at a time (interleaved
  antithetic pairs, one key per pair, the per-inner-step restart check,
  the non-finite policy, the diagnostics), and all of them together;
* ``pes_optax.pes`` in a plain ``lax.scan`` of ``chain(pes, sgd).update``
  (no Driver) and through ``pes_optax.Driver``;

and counts, in each compiled program, the fusions (kernels), copies and
while loops. Run: ``python benchmarks/profile_gap.py [--quick]``.
"""

from __future__ import annotations

import argparse
import re
import sys

import jax
import jax.numpy as jnp
import optax
from _common import (
    influence_balancing_setting,
    load_line,
    machine_lines,
    pes_estimator,
    print_table,
    time_interleaved,
)

import pes_optax

FEATURES = ("interleave", "pair_keys", "restart_check", "nonfinite", "diagnostics")
# The pair mask as pes_optax built it before (strided slices and a repeat),
# kept to show what the reshape in ``estimate.pair_mask`` saves.
OLD_FEATURES = ("nonfinite_strided",)


def floor_with(setting, features: frozenset[str], length: int):
    """The fused floor with the listed ``pes`` features added."""
    problem = setting.problem
    n, sigma, lr = setting.num_particles, setting.sigma, setting.learning_rate
    vinit = jax.vmap(problem.init, in_axes=(None, 0))
    vstep = jax.vmap(problem.step, in_axes=(0, 0, None, None))

    def sample(key):
        if "pair_keys" in features:
            keys = jax.random.split(key, n // 2)
            half = jax.vmap(lambda k: jax.random.normal(k, ()))(keys)
        else:
            half = jax.random.normal(key, (n // 2,))
        half = sigma * half
        if "interleave" in features:
            return jnp.stack([half, -half], axis=1).reshape(n)
        return jnp.concatenate([half, -half])

    def step(carry):
        theta, states, accumulator, counters, key = carry
        key, noise_key, init_key, step_key = jax.random.split(key, 4)
        noise = sample(noise_key)
        particle_theta = theta + noise
        accumulator = accumulator + noise / sigma**2

        if "restart_check" in features:
            start = counters == 0
            states = jax.lax.cond(
                jnp.any(start),
                lambda s: jnp.where(start[:, None], vinit(init_key, particle_theta), s),
                lambda s: s,
                states,
            )
            counters = counters + 1
        states, loss = vstep(particle_theta, states, step_key, None)
        contributions = accumulator * loss

        if "nonfinite" in features or "nonfinite_strided" in features:
            finite = jnp.isfinite(loss) & jnp.isfinite(contributions)
            if "nonfinite_strided" in features:
                keep = jnp.repeat(finite[0::2] & finite[1::2], 2)
            else:
                pairs = finite.reshape(-1, 2)
                pair_ok = pairs[:, 0] & pairs[:, 1]
                keep = jnp.stack([pair_ok, pair_ok], axis=1).reshape(-1)
            num_kept = jnp.maximum(jnp.sum(keep), 1)
            grad = jnp.sum(jnp.where(keep, contributions, 0.0)) / num_kept
            accumulator = jnp.where(keep, accumulator, 0.0)
            counters = jnp.where(keep, counters, 0)
        else:
            grad = jnp.sum(contributions) / n
        if "diagnostics" in features:
            mean = jnp.mean(loss)
            spread = jnp.sqrt(jnp.mean((loss - mean) ** 2))
            grad = grad + 0.0 * spread  # keep the statistic alive
        return theta - lr * grad, states, accumulator, counters, key

    @jax.jit
    def fused(carry):
        carry, _ = jax.lax.scan(lambda c, _: (step(c), None), carry, length=length)
        return carry

    thetas = jnp.full((n,), setting.theta)
    holder = {
        "carry": (
            setting.theta,
            vinit(jax.random.key(1), thetas),
            jnp.zeros((n,), jnp.float32),
            jnp.ones((n,), jnp.int32),
            jax.random.key(0),
        )
    }

    def run():
        holder["carry"] = fused(holder["carry"])
        return holder["carry"]

    return run, lambda: fused.lower(holder["carry"]).compile().as_text()


def pes_scan(setting, length: int):
    """``chain(pes, sgd).update`` in a plain ``lax.scan``, no Driver."""
    optimizer = optax.chain(
        pes_estimator(setting),
        optax.sgd(setting.learning_rate),
    )

    def one(carry, _):
        theta, state = carry
        updates, state = optimizer.update(jnp.zeros_like(theta), state, theta)
        return (optax.apply_updates(theta, updates), state), None

    @jax.jit
    def fused(carry):
        return jax.lax.scan(one, carry, length=length)[0]

    holder = {"carry": (setting.theta, optimizer.init(setting.theta))}

    def run():
        holder["carry"] = fused(holder["carry"])
        return holder["carry"]

    return run, lambda: fused.lower(holder["carry"]).compile().as_text()


def driver_run(setting, length: int):
    driver = pes_optax.Driver(
        pes_estimator(setting),
        optax.sgd(setting.learning_rate),
        setting.theta,
    )

    def run():
        driver.run(length, steps_per_call=length, progress=False)
        return driver.theta, driver.state

    return run, None


def kernel_counts(text: str) -> tuple[int, int, int]:
    fusions = len(re.findall(r" fusion\(", text))
    copies = len(re.findall(r" copy\(", text))
    loops = len(re.findall(r" while\(", text))
    return fusions, copies, loops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 7)
    setting = influence_balancing_setting(args.quick)
    length = setting.steps_fused

    print("# where the time of a PES outer step goes (influence balancing)")
    for line in machine_lines():
        print(line)
    print(
        f"{setting.description}; {length} outer steps per call, median of "
        f"{repeats} interleaved repeats"
    )
    variants = {"floor": floor_with(setting, frozenset(), length)}
    for feature in FEATURES + OLD_FEATURES:
        variants[f"floor + {feature}"] = floor_with(
            setting, frozenset({feature}), length
        )
    variants["floor + all of them"] = floor_with(setting, frozenset(FEATURES), length)
    variants["pes_optax lax.scan(update)"] = pes_scan(setting, length)
    variants["pes_optax Driver"] = driver_run(setting, length)

    rates = time_interleaved({k: (v[0], length) for k, v in variants.items()}, repeats)
    base = 1e6 / rates["floor"]
    rows = []
    for name, (_, text) in variants.items():
        micro = 1e6 / rates[name]
        counts = kernel_counts(text()) if text is not None else ("-",) * 3
        rows.append(
            [name, f"{micro:.1f}", f"{micro - base:+.1f}", *[str(c) for c in counts]]
        )
    print_table(
        ["variant", "us/step", "vs floor", "fusions", "copies", "while loops"], rows
    )
    print("fusions/copies/while loops: counted in the compiled HLO of the whole call")
    print(load_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())

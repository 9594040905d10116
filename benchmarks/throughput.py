"""Outer-step throughput of PES: pes_optax against a floor and other drivers.

For each setting, one process measures side by side (interleaved repeats,
median):

* ``floor``: a hand-written single ``jax.jit`` of one PES outer step
  (antithetic noise, vmapped K-step ``lax.scan`` unroll of N particles with
  their own states, accumulated perturbations, weighted sum, SGD), one call per
  outer step; ``floor fused``: the same step under ``lax.scan`` over many outer
  steps in one call;
* ``pes_optax jit(update)``: ``jax.jit`` of ``optax.chain(pes, sgd).update``
  plus ``optax.apply_updates``, one call per outer step;
* ``pes_optax Driver``: ``Driver(...).run(n, steps_per_call=n)``;
* ``evosax PersistentES``: ask, unroll and tell in one ``jax.jit`` per outer
  step (and fused under ``lax.scan``), when evosax is importable;
* ``python dispatch``: a Python loop that dispatches every piece (noise,
  perturbation, each of the K inner steps, accumulation, reduction, SGD) as
  its own jitted call;
* ``research-style driver``: the structure of the paper's research driver
  (``persistent_es/gradient_estimators.py`` and ``influence_balancing.py`` in
  google-research): particle states and keys held by a Python object, three
  eager key splits per step, one jitted estimate, a host read of the inner
  step counter for the reset check, and ``jax.jit(opt.update)`` and
  ``jax.jit(optax.apply_updates)`` wrapped anew every step. The research
  script's per-step evaluation unroll, printing and CSV logging are left out.

Memory is the compiled executable's footprint (``memory_analysis()``:
arguments + outputs + temporaries - aliased buffers) of the program one call
runs; for the Python loop, the largest of its programs; for the research-style
driver, its jitted estimate.

Run: ``python benchmarks/throughput.py [--quick] [--repeats R] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

import jax
import jax.numpy as jnp
import optax
from _common import (
    Setting,
    compiled_footprint,
    device_peak_bytes,
    finite_positive,
    load_line,
    machine_lines,
    max_rss_bytes,
    mib,
    pes_estimator,
    print_table,
    throughput_settings,
    time_samples,
)

import pes_optax

FUSED_TARGET = 1.10  # fused: time per step at most 10% above the fused floor
ONE_CALL_TARGET = 1.20  # one call per step: at most 20% above the one-call floor
DISPATCH_TARGET = 10.0  # at least 10x the separately dispatched loop


def _step_weights(problem: pes_optax.UnrolledProblem, length: int) -> jax.Array:
    if problem.loss_reduction == "sum":
        return jnp.ones((length,), jnp.float32)
    if problem.loss_reduction == "mean":
        return jnp.full((length,), 1.0 / length, jnp.float32)
    return jnp.zeros((length,), jnp.float32).at[-1].set(1.0)


class Implementation:
    """A runner that advances ``num_steps`` outer steps per ``run()``."""

    def __init__(self, name, run, num_steps, footprint, floor):
        self.name = name
        self.run = run
        self.num_steps = num_steps
        self.footprint = footprint  # () -> bytes or None, measured after timing
        self.floor = floor  # the name of the floor row it is compared with


# The floor: PES written by hand as one jitted step.


def _antithetic_noise(key, sigma, num_particles, theta_shape):
    """``[+e; -e]`` for ``num_particles // 2`` Gaussian draws ``e``."""
    half = sigma * jax.random.normal(key, (num_particles // 2, *theta_shape))
    return jnp.concatenate([half, -half])


def _unroll_particles(vstep, weights, particle_theta, states, key):
    """K steps of every particle; returns the states and the weighted loss."""

    def body(inner, xs):
        step_key, weight = xs
        inner, loss = vstep(particle_theta, inner, step_key, None)
        return inner, weight * loss

    keys = jax.random.split(key, weights.shape[0])
    states, losses = jax.lax.scan(body, states, (keys, weights))
    return states, losses.sum(0)


def _floor_parts(setting: Setting):
    problem = setting.problem
    n, k, sigma = setting.num_particles, setting.truncation_length, setting.sigma
    weights = _step_weights(problem, k)
    vinit = jax.vmap(problem.init, in_axes=(None, 0))
    vstep = jax.vmap(problem.step, in_axes=(0, 0, None, None))
    theta_shape = jnp.shape(setting.theta)

    def step(carry):
        theta, states, accumulator, inner_step, key = carry
        key, noise_key, init_key, unroll_key = jax.random.split(key, 4)
        noise = _antithetic_noise(noise_key, sigma, n, theta_shape)
        particle_theta = theta + noise

        # Fresh inner problems at a horizon boundary (K divides T here).
        if problem.horizon is not None:
            states, accumulator = jax.lax.cond(
                inner_step % problem.horizon == 0,
                lambda: (vinit(init_key, particle_theta), jnp.zeros_like(noise)),
                lambda: (states, accumulator),
            )
        accumulator = accumulator + noise
        states, loss = _unroll_particles(
            vstep, weights, particle_theta, states, unroll_key
        )
        grad = jnp.tensordot(loss, accumulator, axes=1) / (n * sigma**2)
        theta = theta - setting.learning_rate * grad
        return theta, states, accumulator, inner_step + k, key

    def initial():
        thetas = jnp.broadcast_to(setting.theta, (n, *theta_shape))
        states = vinit(jax.random.key(1), thetas)
        accumulator = jnp.zeros((n, *theta_shape), jnp.float32)
        return (
            setting.theta,
            states,
            accumulator,
            jnp.zeros((), jnp.int32),
            (jax.random.key(0)),
        )

    return step, initial


def _one_call(name, step, initial, num_steps, floor) -> Implementation:
    """``step`` jitted on its own, called once per outer step."""
    jitted = jax.jit(step)
    holder = {"carry": initial()}

    def run():
        carry = holder["carry"]
        for _ in range(num_steps):
            carry = jitted(carry)
        holder["carry"] = carry
        return carry

    def footprint():
        return compiled_footprint(jitted.lower(holder["carry"]).compile())

    return Implementation(name, run, num_steps, footprint, floor)


def _fused(name, step, initial, length, floor) -> Implementation:
    """``length`` outer steps of ``step`` under ``lax.scan`` in one call."""

    @jax.jit
    def fused(carry):
        carry, _ = jax.lax.scan(lambda c, _: (step(c), None), carry, length=length)
        return carry

    holder = {"carry": initial()}

    def run():
        holder["carry"] = fused(holder["carry"])
        return holder["carry"]

    def footprint():
        return compiled_footprint(fused.lower(holder["carry"]).compile())

    return Implementation(name, run, length, footprint, floor)


def floor_one_call(setting: Setting) -> Implementation:
    step, initial = _floor_parts(setting)
    return _one_call("floor", step, initial, setting.steps_one_call, None)


def floor_fused(setting: Setting) -> Implementation:
    step, initial = _floor_parts(setting)
    return _fused("floor fused", step, initial, setting.steps_fused, None)


# pes_optax.


def ours_one_call(setting: Setting) -> Implementation:
    optimizer = optax.chain(pes_estimator(setting), optax.sgd(setting.learning_rate))

    @jax.jit
    def train_step(theta, state):
        updates, state = optimizer.update(jnp.zeros_like(theta), state, theta)
        return optax.apply_updates(theta, updates), state

    holder = {"carry": (setting.theta, optimizer.init(setting.theta))}

    def run():
        theta, state = holder["carry"]
        for _ in range(setting.steps_one_call):
            theta, state = train_step(theta, state)
        holder["carry"] = (theta, state)
        return holder["carry"]

    def footprint():
        return compiled_footprint(train_step.lower(*holder["carry"]).compile())

    return Implementation(
        "pes_optax jit(update)", run, setting.steps_one_call, footprint, "floor"
    )


def ours_driver(setting: Setting) -> Implementation:
    length = setting.steps_fused
    driver = pes_optax.Driver(
        pes_estimator(setting), optax.sgd(setting.learning_rate), setting.theta
    )

    def run():
        driver.run(length, steps_per_call=length, progress=False)
        return driver.theta, driver.state

    def footprint():
        # The Driver keeps its compiled loop private; read it if it is there.
        compiled = getattr(driver, "_compiled", {}).get(length)
        if compiled is None:
            return None
        step = jnp.asarray(driver.step, jnp.int32)
        return compiled_footprint(
            compiled.lower(driver.theta, driver.state, step).compile()
        )

    return Implementation("pes_optax Driver", run, length, footprint, "floor fused")


# evosax.


def _evosax_parts(setting: Setting):
    from evosax.algorithms import PersistentES

    problem = setting.problem
    n, k = setting.num_particles, setting.truncation_length
    weights = _step_weights(problem, k)
    vinit = jax.vmap(problem.init, in_axes=(None, 0))
    vstep = jax.vmap(problem.step, in_axes=(0, 0, None, None))
    strategy = PersistentES(
        population_size=n,
        solution=setting.theta,
        optimizer=optax.sgd(setting.learning_rate),
        std_schedule=optax.constant_schedule(setting.sigma),
    )
    horizon = problem.horizon if problem.horizon is not None else 2**30
    params = strategy.default_params.replace(T=horizon, K=k)

    def step(carry):
        es_state, states, key = carry
        key, ask_key, init_key, unroll_key, tell_key = jax.random.split(key, 5)
        population, es_state = strategy.ask(ask_key, es_state, params)

        # evosax leaves the inner states to the user: restart at the horizon.
        if problem.horizon is not None:
            states = jax.lax.cond(
                es_state.inner_step_counter == 0,
                lambda: vinit(init_key, population),
                lambda: states,
            )

        states, loss = _unroll_particles(vstep, weights, population, states, unroll_key)
        es_state, _ = strategy.tell(tell_key, population, loss, es_state, params)
        return es_state, states, key

    def initial():
        es_state = strategy.init(jax.random.key(2), setting.theta, params)
        thetas = jnp.broadcast_to(setting.theta, (n, *jnp.shape(setting.theta)))
        states = vinit(jax.random.key(1), thetas)
        return es_state, states, jax.random.key(0)

    return step, initial


def evosax_one_call(setting: Setting) -> Implementation:
    step, initial = _evosax_parts(setting)
    name = "evosax PersistentES jit"
    return _one_call(name, step, initial, setting.steps_one_call, "floor")


def evosax_fused(setting: Setting) -> Implementation:
    step, initial = _evosax_parts(setting)
    name = "evosax PersistentES fused"
    return _fused(name, step, initial, setting.steps_fused, "floor fused")


# The separately dispatched loop of research code.


class _Recorded:
    """A jitted function that remembers its first arguments for lowering."""

    def __init__(self, fn):
        self.jitted = jax.jit(fn)
        self.args = None

    def __call__(self, *args):
        if self.args is None:
            self.args = args
        return self.jitted(*args)

    def footprint(self):
        if self.args is None:
            return None
        return compiled_footprint(self.jitted.lower(*self.args).compile())


def python_dispatch(setting: Setting) -> Implementation:
    problem = setting.problem
    n, k, sigma = setting.num_particles, setting.truncation_length, setting.sigma
    theta_shape = jnp.shape(setting.theta)
    weights = [float(w) for w in _step_weights(problem, k)]
    vinit = jax.vmap(problem.init, in_axes=(None, 0))
    vstep = jax.vmap(problem.step, in_axes=(0, 0, None, None))

    def sample(key):
        return _antithetic_noise(key, sigma, n, theta_shape)

    pieces = {
        "split": _Recorded(lambda key: tuple(jax.random.split(key, 4))),
        "split_steps": _Recorded(lambda key: tuple(jax.random.split(key, k))),
        "sample": _Recorded(sample),
        "perturb": _Recorded(lambda theta, noise: theta + noise),
        "init": _Recorded(vinit),
        "zeros": _Recorded(jnp.zeros_like),
        "accumulate": _Recorded(lambda acc, noise: acc + noise),
        "step": _Recorded(lambda th, s, key: vstep(th, s, key, None)),
        "add_loss": _Recorded(lambda total, w, loss: total + w * loss),
        "reduce": _Recorded(
            lambda total, acc: jnp.tensordot(total, acc, axes=1) / (n * sigma**2)
        ),
        "sgd": _Recorded(lambda theta, g: theta - setting.learning_rate * g),
    }
    p = pieces
    thetas = jnp.broadcast_to(setting.theta, (n, *theta_shape))
    holder = {
        "theta": setting.theta,
        "states": vinit(jax.random.key(1), thetas),
        "accumulator": jnp.zeros((n, *theta_shape), jnp.float32),
        "inner_step": 0,
        "key": jax.random.key(0),
    }

    def outer_step(h):
        key, noise_key, init_key, unroll_key = p["split"](h["key"])
        noise = p["sample"](noise_key)
        particle_theta = p["perturb"](h["theta"], noise)
        states, accumulator = h["states"], h["accumulator"]
        if problem.horizon is not None and h["inner_step"] % problem.horizon == 0:
            states = p["init"](init_key, particle_theta)
            accumulator = p["zeros"](accumulator)
        accumulator = p["accumulate"](accumulator, noise)
        total = jnp.zeros((n,), jnp.float32)
        for step_key, weight in zip(p["split_steps"](unroll_key), weights, strict=True):
            states, loss = p["step"](particle_theta, states, step_key)
            total = p["add_loss"](total, weight, loss)
        grad = p["reduce"](total, accumulator)
        h.update(
            theta=p["sgd"](h["theta"], grad),
            states=states,
            accumulator=accumulator,
            inner_step=h["inner_step"] + k,
            key=key,
        )

    def run():
        for _ in range(setting.steps_dispatched):
            outer_step(holder)
        return holder["theta"], holder["states"]

    def footprint():
        sizes = [piece.footprint() for piece in pieces.values()]
        sizes = [s for s in sizes if s is not None]
        return max(sizes) if sizes else None

    return Implementation(
        "python dispatch", run, setting.steps_dispatched, footprint, "floor"
    )


# The structure of the paper's research driver.


def research_driver(setting: Setting) -> Implementation:
    problem = setting.problem
    n, k, sigma = setting.num_particles, setting.truncation_length, setting.sigma
    theta_shape = jnp.shape(setting.theta)
    weights = _step_weights(problem, k)
    vinit = jax.vmap(problem.init, in_axes=(None, 0))
    vstep = jax.vmap(problem.step, in_axes=(0, 0, None, None))
    horizon = float("inf") if problem.horizon is None else problem.horizon
    optimizer = optax.sgd(setting.learning_rate)

    @jax.jit
    def estimate(noise_key, unroll_key, theta, states, accumulator, inner_step):
        noise = _antithetic_noise(noise_key, sigma, n, theta_shape)
        states, loss = _unroll_particles(
            vstep, weights, theta + noise, states, unroll_key
        )
        accumulator = accumulator + noise
        grad = jnp.tensordot(loss, accumulator, axes=1) / (n * sigma**2)
        return grad, states, accumulator, inner_step + k

    class ParticleChunk:
        """Particles, their accumulators and keys, held in Python."""

        def __init__(self, key):
            self.key, self.unroll_key, self.eval_key = jax.random.split(key, 3)
            self.reset(setting.theta)

        def reset(self, theta):
            thetas = jnp.broadcast_to(theta, (n, *theta_shape))
            self.states = vinit(self.key, thetas)
            self.accumulator = jnp.zeros((n, *theta_shape), jnp.float32)
            self.inner_step = jnp.zeros((n,), jnp.int32)

        def grad_estimate(self, theta):
            key, noise_key = jax.random.split(self.key)
            unroll_key, step_key = jax.random.split(self.unroll_key)
            eval_key, _ = jax.random.split(self.eval_key)
            grad, self.states, self.accumulator, self.inner_step = estimate(
                noise_key,
                step_key,
                theta,
                self.states,
                self.accumulator,
                self.inner_step,
            )
            self.key, self.unroll_key, self.eval_key = key, unroll_key, eval_key
            if self.inner_step[0] >= horizon:  # a host read every step
                self.reset(theta)
            return grad

    holder = {"theta": setting.theta}
    holder["chunk"] = ParticleChunk(jax.random.key(0))
    holder["opt_state"] = optimizer.init(setting.theta)

    def run():
        theta, opt_state = holder["theta"], holder["opt_state"]
        for _ in range(setting.steps_dispatched):
            total = 0.0
            total += holder["chunk"].grad_estimate(theta)
            grad = total / 1.0
            updates, opt_state = jax.jit(optimizer.update)(grad, opt_state)
            theta = jax.jit(optax.apply_updates)(theta, updates)
        holder["theta"], holder["opt_state"] = theta, opt_state
        return theta, holder["chunk"].states

    def footprint():
        chunk = holder["chunk"]
        args = (
            jax.random.key(0),
            jax.random.key(1),
            holder["theta"],
            chunk.states,
            chunk.accumulator,
            chunk.inner_step,
        )
        return compiled_footprint(estimate.lower(*args).compile())

    return Implementation(
        "research-style driver", run, setting.steps_dispatched, footprint, "floor"
    )


# The report.


def evosax_status() -> str | None:
    """``None`` when evosax's PersistentES imports, else the reason it does not."""
    try:
        from evosax.algorithms import PersistentES  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure skips the row
        return f"{type(error).__name__}: {error}"
    return None


def measure_setting(setting: Setting, repeats: int) -> list[dict[str, Any]]:
    builders = [floor_one_call, floor_fused, ours_one_call, ours_driver]
    skipped = evosax_status()
    if skipped is None:
        builders += [evosax_one_call, evosax_fused]
    builders += [python_dispatch, research_driver]
    implementations = [build(setting) for build in builders]
    runners = {i.name: (i.run, i.num_steps) for i in implementations}
    samples = time_samples(runners, repeats)
    rates = {name: statistics.median(values) for name, values in samples.items()}
    load = load_line()
    results = []
    for impl in implementations:
        rate = rates[impl.name]
        floor = impl.floor
        results.append(
            {
                "setting": setting.name,
                "implementation": impl.name,
                "iterations_per_second": rate,
                "best_iterations_per_second": max(samples[impl.name]),
                "floor": floor,
                "ratio_to_floor": rate / rates[floor] if floor else 1.0,
                "footprint_bytes": impl.footprint(),
                "load": load,
            }
        )
    if skipped is not None:
        results.append(
            {
                "setting": setting.name,
                "implementation": "evosax PersistentES",
                "skipped": f"evosax not importable ({skipped})",
            }
        )
    return results


def verdicts(results: list[dict[str, Any]]) -> list[tuple[str, bool | None, str]]:
    """PASS/FAIL of each target, per setting."""
    by_name = {
        (r["setting"], r["implementation"]): r for r in results if "skipped" not in r
    }
    checks = []
    for setting in dict.fromkeys(r["setting"] for r in results):

        def rate(name, setting=setting):
            return by_name[(setting, name)]["iterations_per_second"]

        slowdown = rate("floor fused") / rate("pes_optax Driver")
        checks.append(
            (
                f"{setting}: Driver fused within 10% of fused floor",
                slowdown <= FUSED_TARGET,
                f"time/step = {slowdown:.3f} x floor (target <= {FUSED_TARGET})",
            )
        )
        slowdown = rate("floor") / rate("pes_optax jit(update)")
        checks.append(
            (
                f"{setting}: jit(update) within 20% of one-call floor",
                slowdown <= ONE_CALL_TARGET,
                f"time/step = {slowdown:.3f} x floor (target <= {ONE_CALL_TARGET})",
            )
        )
        for loop in ("python dispatch", "research-style driver"):
            floor_speedup = rate("floor fused") / rate(loop)
            checks.append(
                (
                    f"{setting}: (context) fused floor vs {loop}",
                    None,
                    f"{floor_speedup:.1f}x: what the hand-written floor itself reaches",
                )
            )
            for ours in ("pes_optax Driver", "pes_optax jit(update)"):
                speedup = rate(ours) / rate(loop)
                checks.append(
                    (
                        f"{setting}: {ours} >= 10x {loop}",
                        speedup >= DISPATCH_TARGET,
                        f"{speedup:.1f}x (target >= {DISPATCH_TARGET:.0f}x)",
                    )
                )
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write results here")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=None,
        metavar="NAME",
        help="only these settings (influence_balancing, compute_bound, flax_mlp)",
    )
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 7)
    settings = throughput_settings(args.quick)
    if args.settings is not None:
        known = [s.name for s in settings]
        unknown = sorted(set(args.settings) - set(known))
        if unknown:
            parser.error(f"unknown --settings {unknown}; choose from {known}")
        settings = [s for s in settings if s.name in args.settings]

    print("# pes_optax throughput benchmark" + (" (--quick)" if args.quick else ""))
    for line in machine_lines():
        print(line)
    print(
        "memory: compiled footprint from memory_analysis() (arguments + outputs "
        "+ temporaries - aliases) of the program one call runs; python dispatch: "
        "its largest program; research-style driver: its jitted estimate"
    )
    print(
        f"timing: median (and best) of {repeats} interleaved repeats after two "
        "warm-up calls; ratios and targets use the medians"
    )
    print()

    results = []
    for setting in settings:
        print(f"## {setting.name}: {setting.description}")
        rows = measure_setting(setting, repeats)
        results += rows
        table = []
        for r in rows:
            if "skipped" in r:
                print(f"SKIP {r['implementation']}: {r['skipped']}")
                continue
            table.append(
                [
                    r["setting"],
                    r["implementation"],
                    f"{r['iterations_per_second']:.1f}",
                    f"{r['best_iterations_per_second']:.1f}",
                    f"{r['ratio_to_floor']:.3f}",
                    r["floor"] or "-",
                    mib(r["footprint_bytes"]),
                ]
            )
        print_table(
            [
                "setting",
                "implementation",
                "it/s (median)",
                "it/s (best)",
                "vs floor",
                "floor",
                "memory MiB",
            ],
            table,
        )
        print(rows[0]["load"])
        print()

    print("## targets")
    failed = 0
    for name, ok, detail in verdicts(results):
        if ok is None:
            print(f"INFO {name}: {detail}")
            continue
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
    print(f"{failed} target(s) failed")
    peak = device_peak_bytes()
    print()
    print(f"device allocator peak (process-wide): {mib(peak)} MiB")
    print(f"process max RSS: {mib(max_rss_bytes())} MiB")
    print(load_line())

    numbers = [
        r["iterations_per_second"] for r in results if "iterations_per_second" in r
    ]
    if not all(finite_positive(x) for x in numbers):
        print("ERROR: a measured rate is not a finite positive number")
        return 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_lines(), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

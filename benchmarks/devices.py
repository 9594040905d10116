"""PES throughput with particles sharded over 1, 2 and 4 host devices.

Each device count runs in its own subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=D`` (the flag must be set
before jax starts) and passes ``mesh=jax.make_mesh((D,), ("particles",))`` to
``pes_optax.pes``; the outer loop is ``pes_optax.Driver`` with fused steps.
The workers are started and compiled one after the other, then take turns
(one timed call each per round) so that a change in machine load hits every
device count alike. On a machine with real accelerators, ``--devices`` may
list counts up to ``jax.device_count()``; the flag only affects the CPU
platform.

Run: ``python benchmarks/devices.py [--quick] [--devices 1 2 4]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def child(num_devices: int, quick: bool) -> None:
    """The worker in the subprocess: one timed call per ``run`` on stdin."""
    import jax
    import optax
    from _common import compute_bound_setting

    import pes_optax

    setting = compute_bound_setting(quick)
    mesh = jax.make_mesh((num_devices,), ("particles",))
    estimator = pes_optax.pes(
        setting.problem,
        num_particles=setting.num_particles,
        sigma=setting.sigma,
        truncation_length=setting.truncation_length,
        key=jax.random.key(0),
        mesh=mesh,
    )
    driver = pes_optax.Driver(
        estimator, optax.sgd(setting.learning_rate), setting.theta
    )
    length = setting.steps_fused

    def run() -> float:
        start = time.perf_counter()
        driver.run(length, steps_per_call=length, progress=False)
        jax.block_until_ready(driver.state)
        return time.perf_counter() - start

    first_call = run()  # compiles
    run()
    accumulator = driver.state[0].accumulator
    ready = {
        "devices": num_devices,
        "jax_devices": [str(d) for d in jax.devices()],
        "setting": setting.description,
        "first_call_s": first_call,
        "accumulator_sharding": str(accumulator.sharding),
    }
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        print(json.dumps({"iterations_per_second": length / run()}), flush=True)


class Worker:
    """A subprocess with ``D`` host devices, compiled and waiting for ``run``."""

    def __init__(self, num_devices: int, quick: bool):
        env = dict(os.environ)
        flag = f"--xla_force_host_platform_device_count={num_devices}"
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
        command = [sys.executable, os.path.abspath(__file__)]
        command += ["--child", str(num_devices)] + (["--quick"] if quick else [])
        self.process = subprocess.Popen(
            command,
            env=env,
            cwd=HERE,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.info = self._read()
        self.rates: list[float] = []

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            raise RuntimeError(
                f"worker failed with exit code {self.process.returncode}"
            )
        return json.loads(line)

    def run(self) -> None:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        self.rates.append(self._read()["iterations_per_second"])

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write results here")
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)

    if args.child is not None:
        child(args.child, args.quick)
        return 0

    from _common import load_line, machine_lines, print_table

    print("# pes_optax multi-device benchmark" + (" (--quick)" * args.quick))
    for line in machine_lines():
        print(line)
    print(
        "timing: one worker subprocess per device count, compiled and warmed up "
        "first; the workers then take turns, one Driver.run(n, steps_per_call=n) "
        f"call each, {repeats} rounds; median"
    )
    workers = []
    try:
        for num_devices in args.devices:  # one at a time: compiles do not overlap
            workers.append(Worker(num_devices, args.quick))
        for _ in range(repeats):
            for worker in workers:
                worker.run()
    finally:
        for worker in workers:
            worker.close()
    results = [
        {**w.info, "iterations_per_second": statistics.median(w.rates)} for w in workers
    ]
    print(f"setting: compute_bound, {results[0]['setting']}")
    print()
    base = results[0]["iterations_per_second"]
    print_table(
        ["devices", "it/s", "speed-up", "first call s", "particle sharding"],
        [
            [
                str(r["devices"]),
                f"{r['iterations_per_second']:.2f}",
                f"{r['iterations_per_second'] / base:.2f}",
                f"{r['first_call_s']:.2f}",
                r["accumulator_sharding"],
            ]
            for r in results
        ],
    )
    for r in results:
        print(f"devices={r['devices']}: jax.devices() = {r['jax_devices']}")
    print(load_line())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_lines(), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

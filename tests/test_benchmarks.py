"""Smoke test of the benchmark scripts: each runs with ``--quick``.

The three scripts start together in subprocesses (they compile more than they
compute at toy size, and compilation is mostly single-threaded), with XLA's
cheaper CPU compilation (the figures of a smoke run mean nothing anyway), and
each printed table is checked for its rows and for finite positive numbers.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
SCRIPTS = ("throughput.py", "memory_compile.py", "devices.py")
TIMEOUT_S = 170
FAST_COMPILE = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)


def table_rows(output: str) -> list[list[str]]:
    """The body rows of every ``| a | b |`` table in ``output``."""
    rows = []
    for line in output.splitlines():
        if not line.startswith("| ") or set(line) <= set("|-"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append(cells)
    headers = {tuple(r) for r in rows if r[0] in ("setting", "estimator", "T")}
    headers |= {tuple(r) for r in rows if r[0] == "devices"}
    return [r for r in rows if tuple(r) not in headers]


def positive(cell: str) -> bool:
    value = float(cell)
    return math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def outputs() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE)
    processes = {
        name: subprocess.Popen(
            [sys.executable, os.path.join(BENCHMARKS, name), "--quick"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for name in SCRIPTS
    }
    results = {}
    for name, process in processes.items():
        out, err = process.communicate(timeout=TIMEOUT_S)
        assert process.returncode == 0, f"{name} failed:\n{out}\n{err}"
        results[name] = out
    return results


def test_throughput_table(outputs):
    rows = table_rows(outputs["throughput.py"])
    expected = {"floor", "floor fused", "pes_optax jit(update)", "pes_optax Driver"}
    expected |= {"python dispatch", "research-style driver"}
    settings = {"influence_balancing", "compute_bound", "flax_mlp"}
    found = {(r[0], r[1]) for r in rows}
    for setting in settings:
        for name in expected:
            assert (setting, name) in found, (setting, name)
    for setting, name, rate, best, ratio, _, memory in rows:
        assert positive(rate) and positive(best), (setting, name, rate, best)
        assert positive(ratio), (setting, name, ratio)
        assert memory == "n/a" or positive(memory), (setting, name, memory)
    evosax_rows = [r for r in rows if r[1].startswith("evosax")]
    skipped = "SKIP evosax" in outputs["throughput.py"]
    assert evosax_rows or skipped
    verdicts = [
        line
        for line in outputs["throughput.py"].splitlines()
        if line.startswith(("PASS ", "FAIL "))
    ]
    # Per setting: fused and one-call floors, and 10x against both loops.
    assert len(verdicts) == 6 * len(settings)


def test_memory_compile_tables(outputs):
    text = outputs["memory_compile.py"]
    rows = table_rows(text)
    horizon_rows = [r for r in rows if len(r) == 5 and r[4] in ("PASS", "FAIL")]
    assert {r[0] for r in horizon_rows} == {"pes", "nres", "truncated_es", "full_es"}
    for _, short, long, ratio, _ in horizon_rows:
        assert positive(short) and positive(long) and positive(ratio)
    compile_rows = [r for r in rows if len(r) == 7]
    assert len(compile_rows) == 8
    for row in compile_rows:
        assert all(positive(cell) for cell in row[1:])
    assert text.count("HLO size K=1000/K=10") == 4

    # (d) particle_chunk_size: smaller footprint, same estimate.
    chunk_rows = [r for r in rows if len(r) == 6]
    assert [(r[0], r[1]) for r in chunk_rows] == [
        ("pes", "None"),
        ("pes", "4"),
        ("truncated_es", "None"),
        ("truncated_es", "4"),
    ]
    for whole, blocks in (chunk_rows[0:2], chunk_rows[2:4]):
        assert float(blocks[2]) < float(whole[2]), (whole, blocks)
        assert float(blocks[3]) < float(whole[3]), (whole, blocks)
        # Only the order of the float sum over particles differs.
        assert float(blocks[4]) <= 1e-3 * float(blocks[5]), blocks


def test_devices_table(outputs):
    rows = table_rows(outputs["devices.py"])
    assert [r[0] for r in rows] == ["1", "2", "4"]
    for row in rows:
        assert positive(row[1]) and positive(row[2]) and positive(row[3])
    assert "cpu:3" in outputs["devices.py"]

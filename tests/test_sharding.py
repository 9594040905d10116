"""Particles sharded over 4 host devices give the single-device estimates.

The check runs in a subprocess because the number of host devices is fixed
when JAX starts.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

import pes_optax

SCRIPT = pathlib.Path(__file__).parent / "scripts" / "sharded_estimates.py"


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    result = subprocess.run(
        [sys.executable, str(SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["pes", "nres", "full_es", "truncated_es", "pes_a"])
def test_four_devices_match_one(report, name):
    # Same key, same particles; only the order of the cross-device sum differs.
    assert report[name]["max_abs_diff"] < 1e-6


@pytest.mark.parametrize("name", ["pes", "nres", "full_es", "truncated_es"])
def test_chunks_on_four_devices_match_one_unchunked_device(report, name):
    # Blocks of 8 particles, each spread over all 4 devices. Only the order of
    # the float sum over particles differs: the tolerance of the one-device
    # chunking test (rtol 1e-5 / atol 1e-5) applies.
    entry = report[name]
    assert entry["chunked_max_abs_diff"] <= 1e-5 * max(1.0, entry["scale"])


@pytest.mark.parametrize("name", ["pes", "nres", "full_es"])
def test_chunked_sharded_state_keeps_particle_order(report, name):
    # The per-particle accumulators come back in particle order, still sharded
    # (same draws; XLA may fuse the scaling differently: 1 ulp, about 1e-7).
    entry = report[name]
    assert entry["chunked_state_max_abs_diff"] <= 1e-6 * entry["accumulator_scale"]
    assert report[name]["chunked_devices"] == 4


def test_chunk_size_that_does_not_spread_over_devices_is_refused(report):
    message = report["bad_chunk_error"]
    assert "`particle_chunk_size` (4)" in message and "multiple of 8" in message


@pytest.mark.parametrize("name", ["pes", "nres", "full_es", "pes_a"])
def test_particles_spread_over_devices_with_distinct_noise(report, name):
    assert report[name]["devices"] == 4
    assert report[name]["distinct_rows"] == 16


def test_uneven_particle_count_is_refused(report):
    message = report["bad_count_error"]
    assert "`num_particles` (6)" in message and "multiple of 8" in message


def test_mesh_argument_is_checked():
    problem = pes_optax.UnrolledProblem(
        lambda k, t: t, lambda t, s, k, d: (s, s), horizon=4
    )

    def build(mesh):
        return pes_optax.pes(
            problem, num_particles=4, sigma=0.1, truncation_length=2, key=0, mesh=mesh
        )

    with pytest.raises(TypeError, match="mesh"):
        build("cpu")
    with pytest.raises(ValueError, match="particle_axis"):
        build(jax.make_mesh((1,), ("data",)))

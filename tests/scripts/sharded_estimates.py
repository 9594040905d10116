"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=4.

Prints one JSON line comparing sharded and single-device estimates.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pes_optax


def problem():
    def init(key, theta):
        return jnp.zeros((3,))

    def step(theta, s, key, data):
        s = 0.8 * s + theta["w"] + jax.random.normal(key, (3,)) * 0.01
        return s, jnp.sum((s - 1.0) ** 2)

    return pes_optax.UnrolledProblem(init, step, horizon=7)


def run(factory, mesh, num_updates=4, chunk=None):
    theta = {"w": jnp.array([0.1, -0.2, 0.3])}
    kwargs = dict(num_particles=16, sigma=0.1, key=jax.random.key(3), mesh=mesh)
    if chunk is not None:
        kwargs["particle_chunk_size"] = chunk
    if factory is not pes_optax.full_es:
        kwargs["truncation_length"] = 3
    opt = optax.chain(factory(problem(), **kwargs), optax.sgd(0.01))
    state = opt.init(theta)
    step = jax.jit(opt.update)
    outputs = []
    for _ in range(num_updates):
        updates, state = step(jax.tree.map(jnp.zeros_like, theta), state, theta)
        theta = optax.apply_updates(theta, updates)
        outputs.append(np.asarray(updates["w"]))
    return np.stack(outputs), state[0]


def construction_error(mesh, **kwargs):
    """The message of the ValueError that building pes on ``mesh`` raises."""
    try:
        pes_optax.pes(
            problem(), sigma=0.1, truncation_length=3, key=0, mesh=mesh, **kwargs
        )
    except ValueError as error:
        return str(error)
    return None


def main():
    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("particles",))
    report = {}
    for factory in (
        pes_optax.pes,
        pes_optax.nres,
        pes_optax.full_es,
        pes_optax.truncated_es,
        pes_optax.pes_a,
    ):
        single, _ = run(factory, None)
        sharded, state = run(factory, mesh)
        entry = {
            "max_abs_diff": float(np.max(np.abs(single - sharded))),
            "scale": float(np.max(np.abs(single))),
        }
        if hasattr(state, "accumulator") and state.accumulator != ():
            leaf = state.accumulator["w"]
            entry["devices"] = len(leaf.sharding.device_set)
            rows = np.asarray(leaf)
            entry["distinct_rows"] = len({tuple(r) for r in rows.round(7)})
        if factory is not pes_optax.pes_a:
            # Blocks of 8 particles, each spread over the 4 devices.
            chunked, chunked_state = run(factory, mesh, chunk=8)
            entry["chunked_max_abs_diff"] = float(np.max(np.abs(single - chunked)))
            if hasattr(chunked_state, "accumulator") and state.accumulator != ():
                entry["accumulator_scale"] = float(
                    np.max(np.abs(np.asarray(state.accumulator["w"])))
                )
                entry["chunked_state_max_abs_diff"] = float(
                    np.max(
                        np.abs(
                            np.asarray(chunked_state.accumulator["w"])
                            - np.asarray(state.accumulator["w"])
                        )
                    )
                )
                entry["chunked_devices"] = len(
                    chunked_state.accumulator["w"].sharding.device_set
                )
        report[factory.__name__] = entry
    report["bad_count_error"] = construction_error(mesh, num_particles=6)
    report["bad_chunk_error"] = construction_error(
        mesh, num_particles=16, particle_chunk_size=4
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()

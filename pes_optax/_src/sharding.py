"""Placement of particles across devices with ``jax.sharding``.

Particles are laid out along one mesh axis in contiguous blocks, so antithetic
partners (particles ``2i`` and ``2i + 1``) always share a device. XLA inserts
the cross-device reduction of the estimate itself; nothing here moves data by
hand. Multi-host runs use the same code after ``jax.distributed.initialize()``
with a mesh over ``jax.devices()``.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

PyTree = Any


def particle_sharding(
    mesh: Mesh | None, particle_axis: str, num_particles: int, antithetic: bool
) -> NamedSharding | None:
    """The sharding of particle-major arrays, or ``None`` without a mesh."""
    if mesh is None:
        return None
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"`mesh` must be a jax.sharding.Mesh or None, got {mesh!r}. Build "
            "one with jax.make_mesh((jax.device_count(),), ('particles',))."
        )
    if particle_axis not in mesh.shape:
        raise ValueError(
            f"`particle_axis` {particle_axis!r} is not an axis of the mesh "
            f"(axes {tuple(mesh.shape)}). Pass particle_axis=<one of those>."
        )
    num_devices = mesh.shape[particle_axis]
    block = num_devices * (2 if antithetic else 1)
    if num_particles % block:
        down = num_particles - num_particles % block
        options = f"{down} or {down + block}" if down else f"{block}"
        raise ValueError(
            f"`num_particles` ({num_particles}) must be a multiple of {block} "
            f"to split {'antithetic pairs ' if antithetic else ''}evenly over "
            f"the {num_devices} devices of mesh axis {particle_axis!r}. Use "
            f"{options}."
        )
    # Partitioning is left to XLA (auto axes), also for a mesh built with
    # explicit axes, which is what jax.make_mesh returns by default.
    auto_mesh = Mesh(
        mesh.devices,
        mesh.axis_names,
        axis_types=(AxisType.Auto,) * len(mesh.axis_names),
    )
    return NamedSharding(auto_mesh, PartitionSpec(particle_axis))


def num_particle_devices(mesh: Mesh | None, particle_axis: str) -> int:
    """How many devices the particle axis is split over (1 without a mesh)."""
    return 1 if mesh is None else int(mesh.shape[particle_axis])


def constrain(tree: PyTree, sharding: NamedSharding | None) -> PyTree:
    """Shards the leading (particle) axis of every leaf of ``tree``."""
    if sharding is None:
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)

"""Checkpoints of a meta-training run: arrays with orbax, the rest as JSON.

A checkpoint directory holds

* ``arrays/``: theta and the optimizer state, flattened to numbered leaves and
  written by ``orbax.checkpoint.StandardCheckpointer``. Typed PRNG keys are
  stored as their raw ``uint32`` data (``jax.random.key_data``) and re-wrapped
  on load with the implementation recorded for them;
* ``driver.json``: the outer step, the metrics so far and a *fingerprint* of
  the configuration (the estimator's update function and its settings, the
  path, shape and dtype of every leaf of theta and of the state, plus a user
  ``config``). It is written last, so a directory without it is an
  incomplete save.

The estimator's settings come from ``estimator.update.estimator_config``, a
JSON dict that the package's factories attach (name, ``num_particles``,
``sigma``, ``truncation_length``, ...). The outer optimizer's
hyperparameters cannot be read back from an optax transformation; record
them in the user ``config``.

Loading compares fingerprints first and refuses a checkpoint from a different
configuration with a ``ValueError`` that names the first difference. No
pickle is involved.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
FORMAT_VERSION = 1
ARRAYS_DIR = "arrays"
META_FILE = "driver.json"
_HINTS = {
    "optimizer state": (
        " (was it saved with another num_particles, estimator or optimizer?)"
    ),
}


def check_config(config: Any) -> dict[str, Any]:
    """The user ``config`` of a driver as JSON data (``{}`` for ``None``)."""
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise TypeError(f"`config` must be a mapping or None, got {config!r}.")
    try:
        return json.loads(json.dumps(dict(config)))
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"`config` must hold JSON data (str, numbers, bools, lists, "
            f"dicts) to be stored with checkpoints: {error}."
        ) from None


def os_error_reason(error: OSError) -> str:
    """Why a file or folder could not be made, in words for an error message."""
    if isinstance(error, (FileExistsError, NotADirectoryError)):
        return "a folder on the path is a file"
    return error.strerror or str(error)


def _is_key(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array) and jnp.issubdtype(
        leaf.dtype, jax.dtypes.prng_key
    )


def _leaf_spec(leaf: Any) -> dict[str, Any]:
    if _is_key(leaf):
        impl = str(jax.random.key_impl(leaf))
        return {"shape": list(leaf.shape), "dtype": f"key<{impl}>", "key": impl}
    return {"shape": list(np.shape(leaf)), "dtype": str(jnp.result_type(leaf))}


def tree_fingerprint(tree: PyTree) -> dict[str, Any]:
    """Structure, leaf paths, shapes and dtypes of a pytree, as JSON data."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    specs = {jax.tree_util.keystr(path): _leaf_spec(leaf) for path, leaf in leaves}
    return {"treedef": str(treedef), "leaves": specs}


def estimator_settings(estimator: Any) -> dict[str, Any] | None:
    """The estimator's ``update.estimator_config`` as JSON data, or ``None``."""
    settings = getattr(estimator.update, "estimator_config", None)
    if settings is None:
        return None
    # Non-JSON values (e.g. a schedule) are compared by their string form.
    return json.loads(json.dumps(dict(settings), default=str))


def fingerprint(
    estimator: Any, theta: PyTree, state: PyTree, config: dict[str, Any]
) -> dict[str, Any]:
    """The configuration a checkpoint must match to be loaded."""
    update = estimator.update
    name = getattr(update, "__qualname__", type(update).__qualname__)
    return {
        "format": FORMAT_VERSION,
        "estimator": f"{getattr(update, '__module__', '')}.{name}",
        "estimator_config": estimator_settings(estimator),
        "config": config,
        "theta": tree_fingerprint(theta),
        "state": tree_fingerprint(state),
    }


def _tree_difference(what: str, saved: dict, current: dict) -> str | None:
    saved_leaves, current_leaves = saved["leaves"], current["leaves"]
    for path in saved_leaves:
        if path not in current_leaves:
            return f"{what} leaf {path} is in the checkpoint but not here"
    for path in current_leaves:
        if path not in saved_leaves:
            return f"{what} leaf {path} is here but not in the checkpoint"
    for path, spec in saved_leaves.items():
        here = current_leaves[path]
        for field in ("shape", "dtype"):
            if spec[field] != here[field]:
                return (
                    f"{what} leaf {path} has {field} {spec[field]} in the "
                    f"checkpoint but {here[field]} here{_HINTS.get(what, '')}"
                )
    if saved["treedef"] != current["treedef"]:
        return (
            f"{what} structure is {saved['treedef']} in the checkpoint but "
            f"{current['treedef']} here"
        )
    return None


def _config_difference(what: str, saved: dict, current: dict) -> str | None:
    # The estimator's name first: a sigma mismatch is moot between estimators.
    names = sorted(set(saved) | set(current), key=lambda k: (k != "estimator", k))
    for name in names:
        if saved.get(name, "<missing>") != current.get(name, "<missing>"):
            return (
                f"{what}[{name!r}] is {saved.get(name, '<missing>')!r} in the "
                f"checkpoint but {current.get(name, '<missing>')!r} here"
            )
    return None


def _estimator_difference(saved: dict, current: dict) -> str | None:
    # Checkpoints of estimators without `estimator_config` (custom
    # transformations, older versions) are compared by update function only.
    saved_settings = saved.get("estimator_config")
    current_settings = current["estimator_config"]
    if saved_settings is not None and current_settings is not None:
        found = _config_difference("estimator_config", saved_settings, current_settings)
        if found is not None:
            return found
    if saved["estimator"] != current["estimator"]:
        return (
            f"the estimator is {saved['estimator']} in the checkpoint but "
            f"{current['estimator']} here"
        )
    return None


def first_difference(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """A sentence naming the first way two fingerprints differ, or ``None``."""
    if saved.get("format") != current["format"]:
        return (
            f"checkpoint format is {saved.get('format')!r}, this version reads "
            f"{current['format']}"
        )
    return (
        _estimator_difference(saved, current)
        or _config_difference("config", saved["config"], current["config"])
        or _tree_difference("theta", saved["theta"], current["theta"])
        or _tree_difference("optimizer state", saved["state"], current["state"])
    )


def _to_storable(tree: PyTree) -> dict[str, np.ndarray]:
    leaves = jax.tree.leaves(tree)
    stored = [jax.random.key_data(x) if _is_key(x) else x for x in leaves]
    return {f"{i:05d}": np.asarray(jax.device_get(x)) for i, x in enumerate(stored)}


def _from_storable(stored: dict[str, Any], template: PyTree) -> PyTree:
    leaves, treedef = jax.tree.flatten(template)
    restored = []
    for i, like in enumerate(leaves):
        value = stored[f"{i:05d}"]
        if _is_key(like):
            value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(like))
        restored.append(jnp.asarray(value))
    return jax.tree.unflatten(treedef, restored)


def _abstract(stored: dict[str, np.ndarray]) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in stored.items()}


def _check_target(directory: pathlib.Path, overwrite: bool) -> None:
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ValueError(f"`directory` {str(directory)!r} exists and is a file.")
    contents = {p.name for p in directory.iterdir()}
    if contents and not contents <= {ARRAYS_DIR, META_FILE}:
        raise ValueError(
            f"`directory` {str(directory)!r} holds files that are not a "
            "pes_optax checkpoint; choose a new or empty directory."
        )
    if contents and not overwrite:
        raise ValueError(
            f"`directory` {str(directory)!r} already holds a checkpoint; pass "
            "overwrite=True to replace it, or choose another directory."
        )


def save(
    directory: str | os.PathLike,
    trees: PyTree,
    meta: dict[str, Any],
    overwrite: bool = False,
) -> None:
    """Writes ``trees`` (arrays) and ``meta`` (JSON data) to ``directory``."""
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).absolute()
    _check_target(directory, overwrite)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(
            f"`directory` {str(directory)!r} cannot be created "
            f"({os_error_reason(error)}); choose a path under a folder you can "
            "write to."
        ) from None

    # Un-commit first, so that a crash mid-save leaves no valid checkpoint.
    (directory / META_FILE).unlink(missing_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / ARRAYS_DIR, _to_storable(trees), force=True)
        checkpointer.wait_until_finished()
    partial = directory / (META_FILE + ".tmp")
    partial.write_text(json.dumps(meta), encoding="utf-8")
    partial.replace(directory / META_FILE)


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON part of a checkpoint."""
    path = pathlib.Path(directory).absolute() / META_FILE
    if not path.is_file():
        raise ValueError(
            f"`directory` {str(path.parent)!r} holds no complete pes_optax "
            f"checkpoint ({META_FILE} is missing); pass a directory written "
            "by Driver.save."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def load_trees(directory: str | os.PathLike, template: PyTree) -> PyTree:
    """Reads the arrays of a checkpoint into the structure of ``template``."""
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).absolute()
    target = _abstract(_to_storable(template))
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.restore(directory / ARRAYS_DIR, target)
    return _from_storable(stored, template)

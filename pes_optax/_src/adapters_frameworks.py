"""Recurrent-model adapters for Flax linen, Flax NNX and Haiku.

Each builder wraps a framework's model as the ``(theta, model_state, carry,
inputs, key) -> (carry, outputs, model_state)`` step of
:func:`pes_optax.recurrent_problem`'s core: theta is the model's parameters,
and the framework's other variables (linen collections such as
``batch_stats``, NNX ``BatchStat`` and RNG variables, Haiku state) are model
state, kept per particle in :class:`RecurrentState` and reset with each inner
problem. Models are called as ``(carry, inputs) -> (carry, outputs)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from pes_optax._src.adapters_rnn import (
    LossFn,
    PyTree,
    check_callable,
    make_problem,
)
from pes_optax._src.problem import UnrolledProblem


def from_flax_linen_rnn(
    module: Any,
    variables: PyTree,
    sequence: tuple[PyTree, PyTree] | None,
    loss_fn: LossFn,
    *,
    init_carry: PyTree | Callable[[jax.Array, PyTree], PyTree],
    horizon: int | None = None,
    loss_reduction: str = "mean",
    random_start: bool = False,
    rng_streams: Sequence[str] = ("dropout",),
) -> UnrolledProblem:
    """An unrolled problem whose theta is a Flax linen RNN's ``params``.

    ``module`` is called as ``module.apply(variables, carry, inputs)`` and
    must return ``(carry, outputs)``: a bare ``nn.LSTMCell``, ``nn.GRUCell``
    or ``nn.OptimizedLSTMCell``, or a user module that wraps one with an
    embedding and a readout. Every collection of ``variables`` other than
    ``"params"`` (e.g. ``batch_stats``) is mutable model state, kept per
    particle and reset with each inner problem. Each of ``rng_streams`` gets
    a key derived from the step's key (shared by the particles).

    Args:
      module: A ``flax.linen.Module`` with ``__call__(carry, inputs)``.
      variables: ``module.init(...)``; ``variables["params"]`` is the
        structure theta must have, the rest is the initial model state.
      sequence: ``(inputs, targets)`` with a leading time axis, or ``None``
        to take them from ``data``; see :func:`recurrent_problem`.
      loss_fn: ``(outputs, targets) -> scalar``.
      init_carry: The initial carry (e.g. ``cell.initialize_carry(key,
        (batch, features))``), or ``(key, theta) -> carry``.
      horizon: Inner steps per inner problem, or ``None`` for endless.
      loss_reduction: ``"sum"``, ``"mean"`` or ``"last"``.
      random_start: Start each inner problem at a random position.
      rng_streams: Names of the RNG streams the module uses.

    Returns:
      An :class:`UnrolledProblem`; start theta at ``variables["params"]``.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, pes_optax
      >>> cell = nn.GRUCell(features=4)
      >>> carry = cell.initialize_carry(jax.random.key(0), (1, 2))
      >>> xs = jnp.ones((50, 1, 2))
      >>> variables = cell.init(jax.random.key(1), carry, xs[0])
      >>> problem = pes_optax.from_flax_linen_rnn(
      ...     cell, variables, (xs, xs[:, :, :1]),
      ...     lambda out, y: jnp.mean((out[:, :1] - y) ** 2),
      ...     init_carry=carry, horizon=10)
      >>> pes_optax.unroll(problem, variables["params"], jax.random.key(2)).shape
      ()
    """
    check_callable("module", getattr(module, "apply", None), "module.apply")
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError(
            "`variables` must be the dict returned by module.init(...), with a "
            f"'params' collection; got {type(variables).__name__}. Pass "
            "module.init(key, carry, inputs)."
        )
    params = variables["params"]
    collections = {k: c for k, c in variables.items() if k != "params"}
    mutable = sorted(collections)
    streams = tuple(rng_streams)

    def step_model(theta, model_state, carry, inputs, key):
        rngs = {name: jax.random.fold_in(key, i) for i, name in enumerate(streams)}
        all_variables = {"params": theta, **model_state}
        if not mutable:
            carry, outputs = module.apply(all_variables, carry, inputs, rngs=rngs)
            return carry, outputs, model_state
        (carry, outputs), updated = module.apply(
            all_variables, carry, inputs, rngs=rngs, mutable=mutable
        )
        return carry, outputs, {**model_state, **updated}

    return make_problem(
        step_model,
        lambda key: collections,
        init_carry,
        sequence,
        loss_fn,
        horizon=horizon,
        loss_reduction=loss_reduction,
        random_start=random_start,
        reference_theta=params,
    )


def _haiku_apply_takes_rng(transformed: Any) -> bool:
    """Whether ``apply`` takes an rng (it does not after without_apply_rng)."""
    try:
        parameters = inspect.signature(transformed.apply).parameters
    except (TypeError, ValueError):
        return True
    return "rng" in parameters


def from_haiku(
    transformed: Any,
    params: PyTree,
    sequence: tuple[PyTree, PyTree] | None,
    loss_fn: LossFn,
    *,
    init_carry: PyTree | Callable[[jax.Array, PyTree], PyTree],
    state: PyTree | None = None,
    horizon: int | None = None,
    loss_reduction: str = "mean",
    random_start: bool = False,
) -> UnrolledProblem:
    """An unrolled problem whose theta is the params of a Haiku RNN.

    The transformed function must be ``f(carry, inputs) -> (carry,
    outputs)``. It gets an rng key per step derived from the step's key
    (shared by the particles, so ``hk.next_rng_key()`` and ``hk.dropout``
    work). With ``hk.transform_with_state``, the Haiku state (from
    ``transformed.init``) is kept per particle and reset with each inner
    problem.

    Args:
      transformed: ``hk.transform(f)`` or ``hk.transform_with_state(f)``
        (``hk.without_apply_rng`` is fine too).
      params: ``transformed.init(...)``'s params: the structure theta must
        have.
      sequence: ``(inputs, targets)`` with a leading time axis, or ``None``.
      loss_fn: ``(outputs, targets) -> scalar``.
      init_carry: The initial carry, or ``(key, theta) -> carry``.
      state: Initial Haiku state; required with ``transform_with_state``.
      horizon: Inner steps per inner problem, or ``None`` for endless.
      loss_reduction: ``"sum"``, ``"mean"`` or ``"last"``.
      random_start: Start each inner problem at a random position.

    Returns:
      An :class:`UnrolledProblem`; start theta at ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, haiku as hk, pes_optax
      >>> def f(carry, x):
      ...     out, carry = hk.VanillaRNN(3)(x, carry)
      ...     return carry, hk.Linear(1)(out)
      >>> net = hk.transform(f)
      >>> xs = jnp.ones((30, 2))
      >>> params = net.init(jax.random.key(0), jnp.zeros(3), xs[0])
      >>> problem = pes_optax.from_haiku(
      ...     net, params, (xs, xs[:, :1]), lambda out, y: jnp.sum((out - y) ** 2),
      ...     init_carry=jnp.zeros(3), horizon=10)
      >>> pes_optax.unroll(problem, params, jax.random.key(1)).shape
      ()
    """
    check_callable("transformed", getattr(transformed, "apply", None), ".apply")
    with_state = _is_haiku_with_state(transformed)
    if with_state and state is None:
        raise ValueError(
            "`state` is None but `transformed` was built with "
            "hk.transform_with_state; pass the state from "
            "`params, state = transformed.init(...)`."
        )
    if not with_state and state is not None:
        raise ValueError(
            "`state` was given but `transformed` has no Haiku state; build it "
            "with hk.transform_with_state, or drop `state`."
        )
    takes_rng = _haiku_apply_takes_rng(transformed)

    def step_model(theta, model_state, carry, inputs, key):
        rng = (key,) if takes_rng else ()
        if with_state:
            (carry, outputs), model_state = transformed.apply(
                theta, model_state, *rng, carry, inputs
            )
        else:
            carry, outputs = transformed.apply(theta, *rng, carry, inputs)
        return carry, outputs, model_state

    initial_state = () if state is None else state
    return make_problem(
        step_model,
        lambda key: initial_state,
        init_carry,
        sequence,
        loss_fn,
        horizon=horizon,
        loss_reduction=loss_reduction,
        random_start=random_start,
        reference_theta=params,
    )


def _is_haiku_with_state(transformed: Any) -> bool:
    import haiku as hk

    if isinstance(transformed, hk.TransformedWithState):
        return True
    if isinstance(transformed, hk.Transformed):
        return False
    raise TypeError(
        "`transformed` must be an hk.Transformed or hk.TransformedWithState, "
        f"got {type(transformed).__name__}. Wrap the function with "
        "hk.transform or hk.transform_with_state."
    )


def _reseed(rng_state: PyTree, key: jax.Array) -> PyTree:
    """Fresh NNX RNG streams from ``key``: new keys, counts set to zero."""
    leaves, treedef = jax.tree.flatten(rng_state)
    keys = jax.random.split(key, max(len(leaves), 1))
    fresh = [
        keys[i]
        if jnp.issubdtype(jnp.result_type(x), jax.dtypes.prng_key)
        else jnp.zeros_like(x)
        for i, x in enumerate(leaves)
    ]
    return jax.tree.unflatten(treedef, fresh)


def from_flax_nnx(
    module: Any,
    sequence: tuple[PyTree, PyTree] | None,
    loss_fn: LossFn,
    *,
    init_carry: PyTree | Callable[[jax.Array, PyTree], PyTree],
    horizon: int | None = None,
    loss_reduction: str = "mean",
    random_start: bool = False,
) -> UnrolledProblem:
    """An unrolled problem whose theta is the ``nnx.Param`` state of a module.

    The module is split with ``nnx.split(module, nnx.Param, nnx.RngState,
    ...)``: theta is the ``nnx.State`` of its ``nnx.Param`` variables; its
    RNG streams and every other variable (e.g. ``nnx.BatchStat``) are model
    state, kept per particle and reset with each inner problem, when the RNG
    streams are reseeded from the init key (shared by the particles). The
    module is called as ``module(carry, inputs) -> (carry, outputs)``.

    Args:
      module: An ``nnx.Module`` (e.g. wrapping ``nnx.LSTMCell``).
      sequence: ``(inputs, targets)`` with a leading time axis, or ``None``.
      loss_fn: ``(outputs, targets) -> scalar``.
      init_carry: The initial carry, or ``(key, theta) -> carry``.
      horizon: Inner steps per inner problem, or ``None`` for endless.
      loss_reduction: ``"sum"``, ``"mean"`` or ``"last"``.
      random_start: Start each inner problem at a random position.

    Returns:
      An :class:`UnrolledProblem`; start theta at
      ``nnx.state(module, nnx.Param)``.

    Example:
      >>> import jax, jax.numpy as jnp, pes_optax
      >>> from flax import nnx
      >>> cell = nnx.GRUCell(2, 3, rngs=nnx.Rngs(0))
      >>> xs = jnp.ones((30, 1, 2))
      >>> problem = pes_optax.from_flax_nnx(
      ...     cell, (xs, xs[:, :, 0]), lambda h, y: jnp.mean((h[:, 0] - y) ** 2),
      ...     init_carry=jnp.zeros((1, 3)), horizon=10)
      >>> theta = nnx.state(cell, nnx.Param)
      >>> pes_optax.unroll(problem, theta, jax.random.key(1)).shape
      ()
    """
    from flax import nnx

    if not isinstance(module, nnx.Module):
        raise TypeError(
            f"`module` must be an nnx.Module, got {type(module).__name__}. For "
            "a linen module use from_flax_linen_rnn."
        )
    graphdef, params, rng_state, rest = nnx.split(module, nnx.Param, nnx.RngState, ...)

    def step_model(theta, model_state, carry, inputs, key):
        del key  # the module's own RNG streams, in model_state, are used
        model = nnx.merge(graphdef, theta, *model_state, copy=True)
        carry, outputs = model(carry, inputs)
        _, _, new_rng_state, new_rest = nnx.split(model, nnx.Param, nnx.RngState, ...)
        return carry, outputs, (new_rng_state, new_rest)

    problem = make_problem(
        step_model,
        lambda key: (_reseed(rng_state, key), rest),
        init_carry,
        sequence,
        loss_fn,
        horizon=horizon,
        loss_reduction=loss_reduction,
        random_start=random_start,
        reference_theta=nnx.as_pure(params),
    )
    # Theta may come as nnx.Param variables (nnx.state) or as plain arrays
    # (what nnx.Optimizer passes to its transform); both mean the same.
    pure_problem = problem
    problem = UnrolledProblem(
        init=lambda key, theta: pure_problem.init(key, nnx.as_pure(theta)),
        step=lambda theta, state, key, data: pure_problem.step(
            nnx.as_pure(theta), state, key, data
        ),
        horizon=pure_problem.horizon,
        loss_reduction=pure_problem.loss_reduction,
    )
    return problem


__all__ = (
    "from_flax_linen_rnn",
    "from_flax_nnx",
    "from_haiku",
)

"""Adapters that turn recurrent models into unrolled problems.

Here theta is the parameter pytree of a recurrent model and each inner step
feeds the model one element of a long sequence and returns its prediction
loss. The inner state is a :class:`RecurrentState`: the model's carry, any
model state that is not theta (Flax ``batch_stats``, Haiku state, NNX
``BatchStat`` and RNG variables), kept per particle, and the position in the
sequence.

Every model is called as ``(carry, inputs) -> (carry, outputs)``, the calling
convention of Flax's ``nn.LSTMCell``, ``nn.GRUCell`` and
``nn.OptimizedLSTMCell``; a Haiku ``hk.RNNCore`` (``core(inputs, state) ->
(outputs, state)``) is wrapped as ``lambda carry, x: core(x, carry)[::-1]``.
This module holds the generic core; ``adapters_frameworks`` builds it from
Flax linen, Flax NNX and Haiku models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from pes_optax._src.problem import UnrolledProblem

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]
# (theta, model_state, carry, inputs, key) -> (carry, outputs, model_state)
ModelStepFn = Callable[..., tuple[PyTree, PyTree, PyTree]]


class RecurrentState(NamedTuple):
    """Inner state of a recurrent problem (one particle's)."""

    carry: PyTree  # the model's recurrent carry, as returned by the model
    model_state: PyTree  # model variables outside theta; () when there are none
    position: jax.Array  # int32 []: next index into `sequence`, or steps taken


def describe_tree_mismatch(tree: PyTree, reference: PyTree) -> str:
    """Lists, by leaf path, where ``tree`` differs from ``reference``."""
    got = dict(jax.tree_util.tree_leaves_with_path(tree))
    want = dict(jax.tree_util.tree_leaves_with_path(reference))
    got = {jax.tree_util.keystr(k): x for k, x in got.items()}
    want = {jax.tree_util.keystr(k): x for k, x in want.items()}
    problems = [f"missing leaf {path}" for path in want if path not in got]
    problems += [f"unexpected leaf {path}" for path in got if path not in want]
    for path in sorted(set(got) & set(want)):
        a, b = got[path], want[path]
        a_spec = (jnp.shape(a), jnp.result_type(a))
        b_spec = (jnp.shape(b), jnp.result_type(b))
        if a_spec != b_spec:
            problems.append(
                f"leaf {path} has shape {a_spec[0]} and dtype {a_spec[1]}, "
                f"expected shape {b_spec[0]} and dtype {b_spec[1]}"
            )
    if not problems:
        problems.append(
            "the tree structures differ (container types or node metadata): "
            f"{jax.tree.structure(tree)} vs {jax.tree.structure(reference)}"
        )
    return "; ".join(problems)


def _shape_dtypes(tree: PyTree) -> PyTree:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree
    )


def check_tree_matches(
    name: str, tree: PyTree, reference: PyTree, what: str, fix: str
) -> None:
    """Raises a ValueError naming the leaf paths where the trees differ."""
    try:
        chex.assert_trees_all_equal_structs(tree, reference)
        chex.assert_trees_all_equal_shapes_and_dtypes(
            _shape_dtypes(tree), _shape_dtypes(reference)
        )
    except AssertionError:
        raise ValueError(
            f"`{name}` does not match {what}: "
            f"{describe_tree_mismatch(tree, reference)}. {fix}"
        ) from None


def check_callable(name: str, value: Any, signature: str) -> None:
    if not callable(value):
        raise TypeError(f"`{name}` must be a callable {signature}, got {value!r}.")


def _check_sequence(sequence: Any) -> tuple[PyTree, int | None]:
    """Returns the sequence as arrays and its length (None for ``data``)."""
    if sequence is None:
        return None, None
    if not isinstance(sequence, tuple | list) or len(sequence) != 2:
        raise TypeError(
            "`sequence` must be a pair (inputs, targets) of arrays (or "
            f"pytrees) with a leading time axis, or None, got {type(sequence)}. "
            "For next-token prediction pass (tokens[:-1], tokens[1:])."
        )
    sequence = jax.tree.map(jnp.asarray, tuple(sequence))
    leaves = jax.tree_util.tree_leaves_with_path(sequence)
    lengths = {jnp.shape(x)[0] if jnp.ndim(x) else 0 for _, x in leaves}
    if len(lengths) != 1 or 0 in lengths:
        shapes = {jax.tree_util.keystr(p): jnp.shape(x) for p, x in leaves}
        raise ValueError(
            "`sequence` leaves must all have the same non-empty leading time "
            f"axis; got shapes {shapes}. Align inputs and targets in time."
        )
    return sequence, lengths.pop()


def _as_init_carry(init_carry: Any) -> Callable[[jax.Array, PyTree], PyTree]:
    if callable(init_carry):
        return init_carry
    if init_carry is None:
        raise ValueError(
            "`init_carry` is None; pass the initial carry (e.g. "
            "cell.initialize_carry(key, input_shape)) or a callable "
            "(key, theta) -> carry."
        )
    fixed = jax.tree.map(jnp.asarray, init_carry)
    return lambda key, theta: fixed


def make_problem(
    step_model: ModelStepFn,
    init_model_state: Callable[[jax.Array], PyTree],
    init_carry: Any,
    sequence: Any,
    loss_fn: LossFn,
    *,
    horizon: int | None,
    loss_reduction: str,
    random_start: bool,
    reference_theta: PyTree | None,
) -> UnrolledProblem:
    """Builds the problem from a model step with the full signature.

    With ``reference_theta``, one init and step are traced on shapes right
    away (:func:`check_problem_shapes`), so a mismatch raises at construction.
    """
    check_callable("loss_fn", loss_fn, "(outputs, targets) -> scalar loss")
    sequence, length = _check_sequence(sequence)
    init_carry_fn = _as_init_carry(init_carry)
    if random_start and length is None:
        raise ValueError(
            "`random_start=True` needs a `sequence` to pick a start in; got "
            "sequence=None (data from `update`). Drop random_start."
        )

    def check_theta(theta):
        if reference_theta is not None:
            check_tree_matches(
                "theta",
                theta,
                reference_theta,
                "the model's parameters",
                "Pass the parameters the model was initialised with (e.g. "
                "variables['params'] or nnx.state(module, nnx.Param)).",
            )

    def init(key, theta):
        check_theta(theta)
        carry_key, state_key, start_key = jax.random.split(key, 3)
        position = jnp.zeros((), jnp.int32)
        if random_start:
            position = jax.random.randint(start_key, (), 0, length, jnp.int32)
        carry = init_carry_fn(carry_key, theta)
        return RecurrentState(carry, init_model_state(state_key), position)

    def step(theta, state, key, data):
        check_theta(theta)
        if length is None:
            if data is None:
                raise ValueError(
                    "`sequence` is None, so each step needs `data=(inputs, "
                    "targets)` from the estimator's update; got data=None. "
                    "Pass data=..., or give the problem a `sequence`."
                )
            inputs, targets = data
            next_position = state.position + 1
        else:
            element = jax.tree.map(lambda a: a[state.position], sequence)
            inputs, targets = element
            next_position = (state.position + 1) % length
        carry, outputs, model_state = step_model(
            theta, state.model_state, state.carry, inputs, key
        )
        check_tree_matches(
            "carry",
            carry,
            state.carry,
            "the initial carry",
            "The model must return a carry of the same structure, shapes and "
            "dtypes as `init_carry` (e.g. a (c, h) pair of [batch, features]).",
        )
        check_tree_matches(
            "model_state",
            model_state,
            state.model_state,
            "the initial model state",
            "Model variables outside theta must keep their shapes and dtypes.",
        )
        loss = jnp.asarray(loss_fn(outputs, targets))
        if loss.shape != ():
            raise ValueError(
                f"`loss_fn` must return a scalar; got shape {loss.shape}. "
                "Reduce it, e.g. with .mean() over the batch."
            )
        return RecurrentState(carry, model_state, next_position), loss

    problem = UnrolledProblem(
        init=init, step=step, horizon=horizon, loss_reduction=loss_reduction
    )
    if reference_theta is not None:
        check_problem_shapes(problem, reference_theta, sequence)
    return problem


def check_problem_shapes(problem: UnrolledProblem, theta: PyTree, sequence):
    """Traces one init and step on shapes only, so mismatches raise now."""
    if sequence is None:
        return
    key = jax.random.key(0)
    jax.eval_shape(lambda: problem.step(theta, problem.init(key, theta), key, None))


def recurrent_problem(
    apply_fn: Callable[..., Any],
    init_carry: PyTree | Callable[[jax.Array, PyTree], PyTree],
    sequence: tuple[PyTree, PyTree] | None,
    loss_fn: LossFn,
    *,
    horizon: int | None = None,
    loss_reduction: str = "mean",
    random_start: bool = False,
    initial_model_state: PyTree | None = None,
    example_theta: PyTree | None = None,
) -> UnrolledProblem:
    """An unrolled problem that trains a recurrent model on a long sequence.

    Inner step ``t`` reads element ``p`` of ``sequence`` (or the slice of
    ``data`` the estimator passes), runs ``apply_fn`` once and returns
    ``loss_fn(outputs, targets)``. The position ``p`` advances by one per step
    and wraps around at the end of the sequence, so ``horizon=None`` gives an
    endless stream. With a finite ``horizon`` every inner problem restarts the
    carry from ``init_carry`` at position 0 (or at a position drawn from the
    init key with ``random_start``).

    Args:
      apply_fn: ``(theta, carry, inputs, key) -> (carry, outputs)``; with
        ``initial_model_state`` it is ``(theta, carry, inputs, key,
        model_state) -> (carry, outputs, model_state)``. ``key`` is the step's
        key, shared by all particles.
      init_carry: The initial carry, or ``(key, theta) -> carry``.
      sequence: ``(inputs, targets)`` with a shared leading time axis, or
        ``None`` to take ``(inputs, targets)`` from ``data`` at each step.
      loss_fn: ``(outputs, targets) -> scalar``.
      horizon: Inner steps per inner problem, or ``None`` for endless.
      loss_reduction: How a truncation's step losses combine; see
        :class:`UnrolledProblem`. ``"mean"`` gives the mean loss per element.
      random_start: Start each inner problem at a random position.
      initial_model_state: Model variables outside theta (copied per particle
        and reset with each inner problem), or ``None``.
      example_theta: If given, theta is checked against it at trace time, and
        one step is traced now (on shapes only) to check the carry.

    Returns:
      An :class:`UnrolledProblem` whose inner state is a
      :class:`RecurrentState`.

    Example:
      >>> import jax, jax.numpy as jnp, pes_optax
      >>> xs = jnp.sin(jnp.arange(100.0))
      >>> def apply_fn(theta, carry, x, key):
      ...     carry = jnp.tanh(theta["w"] * carry + x)
      ...     return carry, carry
      >>> problem = pes_optax.recurrent_problem(
      ...     apply_fn, jnp.zeros(()), (xs[:-1], xs[1:]),
      ...     lambda out, target: (out - target) ** 2, horizon=20)
      >>> loss = pes_optax.unroll(problem, {"w": jnp.asarray(0.5)},
      ...                         jax.random.key(0))
      >>> loss.shape
      ()
    """
    check_callable("apply_fn", apply_fn, "(theta, carry, inputs, key)")
    if initial_model_state is None:

        def step_model(theta, model_state, carry, inputs, key):
            carry, outputs = apply_fn(theta, carry, inputs, key)
            return carry, outputs, model_state

        model_state = ()
    else:

        def step_model(theta, model_state, carry, inputs, key):
            return apply_fn(theta, carry, inputs, key, model_state)

        model_state = jax.tree.map(jnp.asarray, initial_model_state)
    return make_problem(
        step_model,
        lambda key: model_state,
        init_carry,
        sequence,
        loss_fn,
        horizon=horizon,
        loss_reduction=loss_reduction,
        random_start=random_start,
        reference_theta=example_theta,
    )


__all__ = (
    "RecurrentState",
    "recurrent_problem",
)

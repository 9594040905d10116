"""An adapter that turns an inner training loop into an unrolled problem.

Here theta holds the hyperparameters of an inner optax optimizer that trains
a Flax or Haiku model: each inner step is one update of the model on a
minibatch, and its loss is the training or validation loss after it. The
hyperparameters enter through ``optax.inject_hyperparams``, so every
perturbed particle trains with its own rates under ``vmap``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from pes_optax._src import validation as v
from pes_optax._src.adapters_rnn import check_tree_matches
from pes_optax._src.problem import UnrolledProblem

PyTree = Any
HyperparamsTransform = Callable[[PyTree, jax.Array], Mapping[str, jax.Array]]
META_LOSSES = ("train", "validation")


class InnerTrainingState(NamedTuple):
    """Inner state of an inner training problem (one particle's)."""

    params: PyTree  # the inner model's parameters
    opt_state: optax.OptState  # the inner optimizer's (inject_hyperparams) state
    step: jax.Array  # int32 []: inner updates taken


def default_hyperparams_transform(
    theta: Mapping[str, jax.Array], step: jax.Array
) -> dict[str, jax.Array]:
    """Maps named, unconstrained theta entries to optimizer hyperparameters.

    ``"log_<name>"`` becomes ``<name> = exp(value)``, ``"logit_<name>"``
    becomes ``<name> = sigmoid(value)`` and any other key is passed through.
    The inner step is ignored.

    Args:
      theta: A mapping from names to float arrays.
      step: The inner step (unused).

    Returns:
      A dict of hyperparameters keyed by the optimizer's argument names.

    Example:
      >>> import jax.numpy as jnp, pes_optax
      >>> hp = pes_optax.default_hyperparams_transform(
      ...     {"log_learning_rate": jnp.log(0.1), "logit_momentum": 0.0}, 0)
      >>> round(float(hp["learning_rate"]), 4), float(hp["momentum"])
      (0.1, 0.5)
    """
    del step
    if not isinstance(theta, Mapping):
        raise TypeError(
            "The default hyperparameter transform needs theta to be a mapping "
            f"such as {{'log_learning_rate': -3.0}}, got {type(theta).__name__}. "
            "Pass theta as a dict, or pass your own `hyperparams_transform`."
        )
    hyperparams = {}
    for name, value in theta.items():
        if name.startswith("log_"):
            hyperparams[name[4:]] = jnp.exp(value)
        elif name.startswith("logit_"):
            hyperparams[name[6:]] = jax.nn.sigmoid(value)
        else:
            hyperparams[name] = jnp.asarray(value)
    return hyperparams


def _optimizer_arguments(optimizer_fn: Callable[..., Any]) -> tuple[str, ...] | None:
    """The keyword arguments ``optimizer_fn`` accepts (None when any is)."""
    try:
        parameters = inspect.signature(optimizer_fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return tuple(p.name for p in parameters)


def _check_hyperparams(hyperparams: Any, accepted: tuple[str, ...] | None):
    """Requires a mapping of scalars named after ``optimizer_fn``'s arguments."""
    if not isinstance(hyperparams, Mapping):
        raise TypeError(
            "`hyperparams_transform` must return a dict of hyperparameters, "
            f"got {type(hyperparams).__name__}."
        )
    for name, value in hyperparams.items():
        if accepted is not None and name not in accepted:
            raise ValueError(
                f"`hyperparams_transform` returned hyperparameter {name!r}, "
                f"which `optimizer_fn` does not accept (it takes {accepted}). "
                "Rename the theta entry (e.g. 'log_learning_rate') or the "
                "transform's output."
            )
        if jnp.shape(value) != ():
            raise ValueError(
                f"Hyperparameter {name!r} has shape {jnp.shape(value)}; each "
                "injected hyperparameter must be a scalar. For per-layer "
                "rates, inject one scalar per layer (see the docstring)."
            )


def inner_training_problem(
    init_model_fn: Callable[[jax.Array], PyTree],
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    optimizer_fn: Callable[..., optax.GradientTransformation],
    hyperparams_transform: HyperparamsTransform | None,
    sample_batch_fn: Callable[[jax.Array], PyTree],
    *,
    horizon: int | None,
    meta_loss: str = "train",
    sample_validation_batch_fn: Callable[[jax.Array], PyTree] | None = None,
    loss_reduction: str = "mean",
) -> UnrolledProblem:
    """An unrolled problem whose theta tunes an inner optimizer.

    Each inner step maps theta to hyperparameters with
    ``hyperparams_transform(theta, step)``, writes them into the state of
    ``optax.inject_hyperparams(optimizer_fn)``, takes one gradient step of
    ``loss_fn`` on ``sample_batch_fn(key)`` and returns the loss after the
    update: on a fresh training minibatch (``meta_loss="train"``) or on
    ``sample_validation_batch_fn(key)`` (``"validation"``). The model params
    come from ``init_model_fn(init_key)``, so all particles start from the
    same model; all particles also see the same minibatches.

    Schedules: the transform receives the inner step, e.g. ``lambda theta,
    step: {"learning_rate": jnp.exp(theta["log_lr"] - step /
    jnp.exp(theta["log_decay"]))}``. Per-layer rates: build ``optimizer_fn``
    with one scalar hyperparameter per layer and ``optax.multi_transform``,
    e.g. ``lambda lr_hidden, lr_out: optax.multi_transform({"hidden":
    optax.sgd(lr_hidden), "out": optax.sgd(lr_out)}, labels)``.

    Warning: the inner model must be a pure function of its params
    (``loss_fn(params, batch)``); mutable model state such as batch
    statistics is not carried between inner steps.

    Args:
      init_model_fn: ``key -> params``, e.g. ``lambda key: model.init(key,
        x)["params"]`` (Flax) or ``lambda key: net.init(key, x)`` (Haiku).
      loss_fn: ``(params, batch) -> scalar`` training loss.
      optimizer_fn: Builds the inner optimizer from keyword hyperparameters,
        e.g. ``optax.sgd`` or ``optax.adamw``.
      hyperparams_transform: ``(theta, step) -> {name: scalar}``, or ``None``
        for :func:`default_hyperparams_transform`.
      sample_batch_fn: ``key -> batch`` of training data.
      horizon: Inner updates per inner problem, or ``None`` for endless.
      meta_loss: ``"train"`` or ``"validation"``.
      sample_validation_batch_fn: ``key -> batch``; needed for validation.
      loss_reduction: ``"sum"``, ``"mean"`` or ``"last"``.

    Returns:
      An :class:`UnrolledProblem` whose inner state is an
      :class:`InnerTrainingState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, pes_optax
      >>> w_true = jnp.arange(3.0)
      >>> def sample_batch(key):
      ...     x = jax.random.normal(key, (16, 3))
      ...     return x, x @ w_true
      >>> problem = pes_optax.inner_training_problem(
      ...     lambda key: jnp.zeros(3),
      ...     lambda w, batch: jnp.mean((batch[0] @ w - batch[1]) ** 2),
      ...     optax.sgd, None, sample_batch, horizon=20)
      >>> theta = {"log_learning_rate": jnp.log(0.1)}
      >>> float(pes_optax.unroll(problem, theta, jax.random.key(0))) < 5.0
      True
    """
    for name, value, signature in (
        ("init_model_fn", init_model_fn, "key -> params"),
        ("loss_fn", loss_fn, "(params, batch) -> scalar"),
        ("optimizer_fn", optimizer_fn, "(**hyperparams) -> optax transformation"),
        ("sample_batch_fn", sample_batch_fn, "key -> batch"),
    ):
        if not callable(value):
            raise TypeError(f"`{name}` must be a callable {signature}, got {value!r}.")
    v.check_choice("meta_loss", meta_loss, META_LOSSES)
    if meta_loss == "validation" and not callable(sample_validation_batch_fn):
        raise ValueError(
            "`meta_loss='validation'` needs `sample_validation_batch_fn`, a "
            f"callable key -> batch; got {sample_validation_batch_fn!r}."
        )
    transform = hyperparams_transform or default_hyperparams_transform
    if not callable(transform):
        raise TypeError(
            "`hyperparams_transform` must be a callable (theta, step) -> dict "
            f"or None, got {transform!r}."
        )
    accepted = _optimizer_arguments(optimizer_fn)
    eval_batch_fn = sample_validation_batch_fn if meta_loss == "validation" else None
    eval_batch_fn = eval_batch_fn or sample_batch_fn

    def hyperparams_at(theta, step):
        hyperparams = transform(theta, step)
        _check_hyperparams(hyperparams, accepted)
        return hyperparams

    def optimizer(hyperparams):
        return optax.inject_hyperparams(optimizer_fn)(**hyperparams)

    def init(key, theta):
        params = init_model_fn(key)
        step = jnp.zeros((), jnp.int32)
        opt_state = optimizer(hyperparams_at(theta, step)).init(params)
        return InnerTrainingState(params, opt_state, step)

    def step(theta, state, key, data):
        del data
        train_key, eval_key = jax.random.split(key)

        # Write this step's hyperparameters into the injected state.
        hyperparams = hyperparams_at(theta, state.step)
        injected = dict(state.opt_state.hyperparams)
        for name, value in hyperparams.items():
            dtype = jnp.result_type(injected.get(name, jnp.float32))
            injected[name] = jnp.asarray(value, dtype)
        opt_state = state.opt_state._replace(hyperparams=injected)

        # One inner update on a training minibatch.
        grads = jax.grad(loss_fn)(state.params, sample_batch_fn(train_key))
        updates, opt_state = optimizer(hyperparams).update(
            grads, opt_state, state.params
        )
        params = optax.apply_updates(state.params, updates)
        check_tree_matches(
            "params",
            params,
            state.params,
            "the params from `init_model_fn`",
            "The inner optimizer must keep the params' structure and dtypes.",
        )

        loss = jnp.asarray(loss_fn(params, eval_batch_fn(eval_key)))
        if loss.shape != ():
            raise ValueError(f"`loss_fn` must return a scalar; got shape {loss.shape}.")
        return InnerTrainingState(params, opt_state, state.step + 1), loss

    return UnrolledProblem(
        init=init, step=step, horizon=horizon, loss_reduction=loss_reduction
    )


__all__ = (
    "InnerTrainingState",
    "default_hyperparams_transform",
    "inner_training_problem",
)

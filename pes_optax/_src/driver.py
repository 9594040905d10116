"""A stateful outer loop for meta-training with any estimator of the package.

:class:`Driver` holds theta and the state of ``optax.chain(estimator,
optimizer)``, runs outer steps (several fused into one compiled
``lax.scan`` if asked), records per-step metrics, evaluates on a schedule
and checkpoints the whole run so that it can be resumed bit for bit in a new
process. The estimators themselves stay pure optax transformations; only the
driver shows progress.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from pes_optax._src import checkpoint as checkpoint_lib
from pes_optax._src import metrics as metrics_lib
from pes_optax._src import validation as v

PyTree = Any
DataFn = Callable[[jax.Array], PyTree]
EvalFn = Callable[[PyTree, jax.Array], jax.Array]
# Folded into the eval key so that its stream differs from any estimator's.
_EVAL_STREAM = 0x6576616C


def _check_eval_key(eval_key: Any) -> jax.Array:
    try:
        key = v.check_key(eval_key)
    except (TypeError, ValueError) as error:
        # check_key speaks of `key`; this argument is `eval_key`.
        raise type(error)(str(error).replace("`key`", "`eval_key`")) from None
    return jax.random.fold_in(key, _EVAL_STREAM)


class Driver:
    """Runs, records and checkpoints a meta-training loop.

    One outer step feeds zero updates to ``estimator`` (which adds its
    gradient estimate), passes the estimate to ``optimizer`` and applies the
    result to theta: exactly one ``update`` of ``optax.chain(estimator,
    optimizer)``. Every step records ``step``, ``mean_loss`` (the estimator's
    ``diagnostics.mean_loss``, when it has diagnostics), ``grad_norm`` (global
    norm of the estimate), ``num_dropped_pairs``, ``num_inner_steps`` and, on
    evaluation steps, ``eval_loss``.

    ``eval_fn(theta, key)`` runs on the theta a step starts from whenever the
    step index is a multiple of ``eval_every`` (so step 0 evaluates the
    initial theta), with key ``fold_in(fold_in(eval_key, tag), step)``: a
    stream of its own, independent of the estimator's key, and the same
    however the steps are fused or checkpointed. ``data_fn`` and ``eval_fn``
    are traced into the compiled loop, so they must be jax-traceable.

    Args:
      estimator: A gradient estimator, e.g. :func:`pes_optax.pes`.
      optimizer: The outer optimizer, e.g. ``optax.adam(1e-2)``.
      theta: The initial parameters (a pytree of floating arrays).
      data_fn: Optional ``step -> data``, the truncation's data for outer step
        ``step`` (an int32 scalar), passed to the estimator as ``data=``.
      eval_fn: Optional ``(theta, key) -> scalar`` evaluation.
      eval_every: Outer steps between evaluations; required with ``eval_fn``.
      eval_key: Typed PRNG key or int seed for the evaluation stream.
      config: Optional JSON-serialisable description of the run, stored with
        checkpoints; a checkpoint whose config differs is refused. The
        estimator's own settings (``update.estimator_config``) are checked
        without it, but the outer optimizer's hyperparameters cannot be read
        back from an optax transformation: record them here, e.g.
        ``config={"optimizer": "adam", "learning_rate": 1e-2}``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, pes_optax
      >>> problem = pes_optax.UnrolledProblem(
      ...     init=lambda key, theta: jnp.zeros(()),
      ...     step=lambda theta, s, key, data: (s + theta, (s + theta - 1) ** 2),
      ...     horizon=20)
      >>> estimator = pes_optax.pes(problem, num_particles=4, sigma=0.1,
      ...                           truncation_length=5, key=0)
      >>> driver = pes_optax.Driver(estimator, optax.sgd(1e-3), jnp.asarray(0.5))
      >>> rows = driver.run(8, steps_per_call=4, progress=False)
      >>> driver.step, sorted(rows[-1])
      (8, ['grad_norm', 'mean_loss', 'num_dropped_pairs', 'num_inner_steps', 'step'])
    """

    def __init__(
        self,
        estimator: optax.GradientTransformationExtraArgs,
        optimizer: optax.GradientTransformation,
        theta: PyTree,
        *,
        data_fn: DataFn | None = None,
        eval_fn: EvalFn | None = None,
        eval_every: int | None = None,
        eval_key: jax.Array | int = 0,
        config: Mapping[str, Any] | None = None,
    ):
        v.check_transformation("estimator", estimator)
        v.check_transformation("optimizer", optimizer)
        v.check_theta(theta, "theta")
        if data_fn is not None and not callable(data_fn):
            raise TypeError(
                f"`data_fn` must be a callable step -> data, got {data_fn!r}."
            )
        self._eval_every = v.check_eval(eval_fn, eval_every)
        self._eval_key = _check_eval_key(eval_key)
        self._config = checkpoint_lib.check_config(config)
        self._estimator = estimator
        self._optimizer = optax.with_extra_args_support(optimizer)
        self._transform = optax.chain(estimator, optimizer)
        self._data_fn = data_fn
        self._eval_fn = eval_fn
        self._theta = jax.tree.map(jnp.asarray, theta)
        self._state = self._transform.init(self._theta)
        self._step = 0
        self._rows: list[metrics_lib.Row] = []
        self._compiled: dict[int, Callable] = {}

    @property
    def theta(self) -> PyTree:
        """The current parameters."""
        return self._theta

    @property
    def state(self) -> tuple[Any, Any]:
        """The state of ``optax.chain(estimator, optimizer)``."""
        return self._state

    @property
    def transform(self) -> optax.GradientTransformationExtraArgs:
        """``optax.chain(estimator, optimizer)``, whose state is ``state``."""
        return self._transform

    @property
    def step(self) -> int:
        """Outer steps taken so far."""
        return self._step

    @property
    def metrics(self) -> list[dict[str, int | float]]:
        """One dict per outer step taken (a copy)."""
        return [dict(row) for row in self._rows]

    # The compiled outer loop.

    def _evaluate(self, theta: PyTree, step: jax.Array) -> jax.Array:
        def evaluate():
            key = jax.random.fold_in(self._eval_key, step)
            value = jnp.asarray(self._eval_fn(theta, key), jnp.float32)
            if value.shape != ():
                raise ValueError(
                    f"`eval_fn` must return a scalar, got shape {value.shape}; "
                    "reduce it, e.g. with jnp.mean."
                )
            return value

        due = step % self._eval_every == 0
        return jax.lax.cond(due, evaluate, lambda: jnp.full((), jnp.nan, jnp.float32))

    def _one_step(self, theta, state, step):
        extra = {} if self._data_fn is None else {"data": self._data_fn(step)}
        estimator_state, optimizer_state = state

        # Same sequence as optax.chain(estimator, optimizer).update.
        zeros = jax.tree.map(jnp.zeros_like, theta)
        estimate, estimator_state = self._estimator.update(
            zeros, estimator_state, theta, **extra
        )
        updates, optimizer_state = self._optimizer.update(
            estimate, optimizer_state, theta, **extra
        )

        metrics = metrics_lib.step_metrics(estimator_state, estimate)
        if self._eval_fn is not None:
            metrics["eval_loss"] = self._evaluate(theta, step)
        new_theta = optax.apply_updates(theta, updates)
        return new_theta, (estimator_state, optimizer_state), metrics

    def _steps(self, theta, state, step, *, length: int):
        def body(carry, _):
            theta, state, step = carry
            theta, state, metrics = self._one_step(theta, state, step)
            return (theta, state, step + 1), metrics

        carry, metrics = jax.lax.scan(body, (theta, state, step), length=length)
        return carry[0], carry[1], metrics

    def _advance(self, length: int) -> list[metrics_lib.Row]:
        if length not in self._compiled:
            self._compiled[length] = jax.jit(
                functools.partial(self._steps, length=length)
            )
        step = jnp.asarray(self._step, jnp.int32)
        theta, state, metrics = self._compiled[length](self._theta, self._state, step)
        rows = metrics_lib.to_rows(
            jax.device_get(metrics), self._step, self._eval_every
        )
        self._theta, self._state = theta, state
        self._step += length
        self._rows.extend(rows)
        return rows

    def run(
        self,
        num_steps: int,
        *,
        steps_per_call: int = 1,
        progress: bool | None = None,
    ) -> list[dict[str, int | float]]:
        """Takes ``num_steps`` outer steps.

        ``steps_per_call`` steps are fused into one compiled ``lax.scan``;
        the results are bit-identical to one step per call. Each fused length
        compiles once per driver; a remainder shorter than ``steps_per_call``
        runs one step per call.

        Args:
          num_steps: Outer steps to take (0 does nothing); an int, not a bool.
          steps_per_call: Outer steps per compiled call; an int >= 1.
          progress: Show a tqdm bar with the loss and the throughput. ``None``
            (default) shows it when tqdm is installed (the ``examples``
            extra); ``True`` requires tqdm.

        Returns:
          The metric rows of the steps taken, as in :attr:`metrics`.
        """
        num_steps = v.check_num_steps(num_steps)
        steps_per_call = v.check_positive_int("steps_per_call", steps_per_call)
        bar = metrics_lib.progress_bar(progress, num_steps)
        rows, start = [], time.perf_counter()
        try:
            while len(rows) < num_steps:
                left = num_steps - len(rows)
                rows += self._advance(steps_per_call if left >= steps_per_call else 1)
                if bar is not None:
                    bar.update(len(rows) - bar.n)
                    bar.set_postfix(
                        metrics_lib.progress_postfix(rows, time.perf_counter() - start)
                    )
        finally:
            if bar is not None:
                bar.close()
        return rows

    # Metrics out.

    def write_metrics(self, path: str | os.PathLike) -> None:
        """Writes :attr:`metrics` as JSON lines (``.jsonl``) or CSV (``.csv``).

        Args:
          path: The file; its suffix chooses the format. A CSV has one column
            per metric name, empty where a step lacks it (``eval_loss``).
            Missing parent folders are created.

        Raises:
          ValueError: If the suffix is unknown or the file cannot be written
            (e.g. a parent is a file).
        """
        metrics_lib.write_metrics(self._rows, path)

    def plot(self, path: str | os.PathLike) -> None:
        """Saves a PNG of the training loss and eval loss over outer steps.

        Args:
          path: The PNG file to write (matplotlib's Agg backend; pyplot's
            global state is not touched). Missing parent folders are created.

        Raises:
          ValueError: If nothing has run yet or the file cannot be written.
        """
        metrics_lib.plot_metrics(self._rows, path)

    # Checkpoints.

    def _fingerprint(self) -> dict[str, Any]:
        return checkpoint_lib.fingerprint(
            self._estimator, self._theta, self._state, self._config
        )

    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Checkpoints theta, the optimizer state, the step and the metrics.

        Arrays go through orbax (typed keys as their key data); the step,
        metrics and configuration fingerprint go to ``driver.json``. The run
        can be saved anywhere, also in the middle of an inner problem.

        Args:
          directory: A new or empty directory (or one of our checkpoints, with
            ``overwrite=True``); missing parent folders are created.
          overwrite: Replace a checkpoint already in ``directory``.

        Raises:
          ValueError: If ``directory`` holds other files or a checkpoint (and
            not ``overwrite``), is a file, or cannot be created.
        """
        meta = {
            "fingerprint": self._fingerprint(),
            "step": self._step,
            "metrics": self._rows,
        }
        trees = (self._theta, self._state)
        checkpoint_lib.save(directory, trees, meta, overwrite=overwrite)

    def load(self, directory: str | os.PathLike) -> Driver:
        """Replaces this driver's run by the checkpoint in ``directory``.

        Args:
          directory: Written by :meth:`save`.

        Returns:
          ``self``, continuing exactly where the saved run stopped.

        Raises:
          ValueError: If the checkpoint was written for another configuration
            (estimator, theta structure, state shapes such as the number of
            particles, or ``config``); the message names the difference.
        """
        meta = checkpoint_lib.read_meta(directory)
        difference = checkpoint_lib.first_difference(
            meta["fingerprint"], self._fingerprint()
        )
        if difference is not None:
            raise ValueError(
                f"The checkpoint in {os.fspath(directory)!r} was written for a "
                f"different configuration: {difference}. Build the Driver with "
                "the checkpoint's configuration, or start a fresh run."
            )
        template = (self._theta, self._state)
        self._theta, self._state = checkpoint_lib.load_trees(directory, template)
        self._step = int(meta["step"])
        self._rows = [dict(row) for row in meta["metrics"]]
        return self

    @classmethod
    def restore(
        cls,
        directory: str | os.PathLike,
        estimator: optax.GradientTransformationExtraArgs,
        optimizer: optax.GradientTransformation,
        theta_template: PyTree,
        **kwargs: Any,
    ) -> Driver:
        """Builds a driver and loads the checkpoint in ``directory`` into it.

        Args:
          directory: Written by :meth:`save`.
          estimator: The estimator, configured as for the saved run.
          optimizer: The outer optimizer, configured as for the saved run.
          theta_template: A theta of the saved structure (values unused).
          **kwargs: ``data_fn``, ``eval_fn``, ``eval_every``, ``eval_key`` and
            ``config``, as for the saved run.

        Returns:
          A driver that continues the saved run exactly.

        Example:
          >>> import tempfile, jax.numpy as jnp, optax, pes_optax
          >>> problem = pes_optax.UnrolledProblem(
          ...     init=lambda key, theta: jnp.zeros(()),
          ...     step=lambda theta, s, key, data: (s + theta, s**2), horizon=6)
          >>> make = lambda: pes_optax.pes(problem, num_particles=2, sigma=0.1,
          ...                              truncation_length=2, key=0)
          >>> driver = pes_optax.Driver(make(), optax.sgd(0.1), jnp.asarray(0.5))
          >>> _ = driver.run(2, progress=False)
          >>> path = tempfile.mkdtemp() + "/run"
          >>> driver.save(path)
          >>> again = pes_optax.Driver.restore(
          ...     path, make(), optax.sgd(0.1), jnp.asarray(0.0))
          >>> again.step, bool(again.theta == driver.theta)
          (2, True)
        """
        return cls(estimator, optimizer, theta_template, **kwargs).load(directory)

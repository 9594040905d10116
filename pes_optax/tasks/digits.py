r"""Learning-rate schedule tuning for an MLP on scikit-learn's digits.

A small real-data version of the learning-rate-decay experiment of Vicol,
Metz and Sohl-Dickstein, "Unbiased Gradient Estimation in Unrolled
Computation Graphs with Persistent Evolution Strategies", ICML 2021,
https://arxiv.org/abs/2112.13835.

A Flax (linen) MLP is trained on the 8x8 handwritten digits shipped with
scikit-learn (``sklearn.datasets.load_digits``, 1797 images, pixels scaled to
``[0, 1]``) by SGD with momentum in PyTorch's form (``buf = 0.9 buf + g``,
``w -= lr_t buf``) with

.. math::
  \mathrm{lr}_t = e^{\theta_0} / (1 + t / \tau)^{e^{\theta_1}},

so ``theta = (log initial lr, log decay exponent)``. Every inner step draws a
minibatch from its key, takes one update and returns the training
cross-entropy on a fresh minibatch; the meta-objective is the sum of these
over the horizon. The images are split once, deterministically, into 1437
training and 360 validation images.

scikit-learn is imported only when a task is built.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pes_optax import UnrolledProblem, unroll
from pes_optax.tasks._task import Task

PyTree = Any
NUM_CLASSES = 10
NUM_VALIDATION = 360
MOMENTUM = 0.9
SPLIT_SEED = 0


# The task's default settings (the `Task` fields of the same names).
DEFAULTS: dict[str, Any] = {
    "estimator": "pes",
    "num_particles": 64,
    "sigma": 0.1,
    "truncation_length": 10,
    "optimizer": optax.adam,
    "learning_rate": 0.05,
    "num_iterations": 500,
    "eval_every": 25,
}


class DigitsData(NamedTuple):
    """The digits images and labels, split into training and validation."""

    train_images: jax.Array  # float32 [1437, 64], pixels in [0, 1]
    train_labels: jax.Array  # int32 [1437]
    valid_images: jax.Array  # float32 [360, 64]
    valid_labels: jax.Array  # int32 [360]


class DigitsState(NamedTuple):
    """Inner state: the network, its momentum buffer and the inner step."""

    params: PyTree  # the MLP's parameters
    momentum: PyTree  # like params
    step: jax.Array  # int32 [], inner step t


class MLP(nn.Module):
    """A ReLU multilayer perceptron with ``NUM_CLASSES`` logits."""

    hidden_sizes: tuple[int, ...] = (32,)

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """Logits ``[batch, NUM_CLASSES]`` for images ``[batch, 64]``."""
        hidden = images
        for size in self.hidden_sizes:
            hidden = nn.relu(nn.Dense(size)(hidden))
        return nn.Dense(NUM_CLASSES)(hidden)


def load_data() -> DigitsData:
    """Loads scikit-learn's digits and splits them 1437 / 360.

    The split is a fixed permutation (NumPy's legacy generator, seed 0), so it
    is the same on every machine.

    Returns:
      The ``DigitsData``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.asarray(digits.data, np.float32) / 16.0
    labels = np.asarray(digits.target, np.int32)
    order = np.random.RandomState(SPLIT_SEED).permutation(len(labels))
    train, valid = order[:-NUM_VALIDATION], order[-NUM_VALIDATION:]
    return DigitsData(
        train_images=jnp.asarray(images[train]),
        train_labels=jnp.asarray(labels[train]),
        valid_images=jnp.asarray(images[valid]),
        valid_labels=jnp.asarray(labels[valid]),
    )


def learning_rate(theta: jax.Array, step: jax.Array, decay_steps: float) -> jax.Array:
    """``exp(theta[0]) / (1 + t / decay_steps) ** exp(theta[1])``.

    Args:
      theta: ``(log initial lr, log decay exponent)``, float32 ``[2]``.
      step: The inner step ``t``.
      decay_steps: ``tau``, the time scale of the decay.

    Returns:
      The learning rate at step ``t``, a float32 scalar.
    """
    decay = (1.0 + step.astype(jnp.float32) / decay_steps) ** jnp.exp(theta[1])
    return jnp.exp(theta[0]) / decay


def cross_entropy(
    model: MLP, params: PyTree, images: jax.Array, labels: jax.Array
) -> jax.Array:
    """Mean softmax cross-entropy of ``model`` on a batch, float32 scalar."""
    logits = model.apply(params, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_problem(
    data: DigitsData,
    horizon: int = 200,
    batch_size: int = 32,
    hidden_sizes: tuple[int, ...] = (32,),
    decay_steps: float = 20.0,
) -> UnrolledProblem:
    """The digits learning-rate-schedule problem.

    Args:
      data: The digits, from :func:`load_data`.
      horizon: Inner SGD steps per inner problem.
      batch_size: Images per minibatch.
      hidden_sizes: Widths of the MLP's hidden layers.
      decay_steps: ``tau`` of the schedule.

    Returns:
      An ``UnrolledProblem`` with ``DigitsState`` inner states and the
      post-update training cross-entropy as the step loss, summed.
    """
    model = MLP(hidden_sizes=tuple(hidden_sizes))
    num_train = data.train_labels.shape[0]

    def minibatch(key):
        index = jax.random.randint(key, (batch_size,), 0, num_train)
        return data.train_images[index], data.train_labels[index]

    def init(key, theta):
        del theta
        params = model.init(key, data.train_images[:1])
        momentum = jax.tree.map(jnp.zeros_like, params)
        return DigitsState(params, momentum, jnp.zeros((), jnp.int32))

    def step(theta, state, key, data_slice):
        del data_slice
        train_key, loss_key = jax.random.split(key)

        # One SGD-with-momentum update on a minibatch.
        images, labels = minibatch(train_key)
        grads = jax.grad(cross_entropy, argnums=1)(model, state.params, images, labels)
        momentum = jax.tree.map(
            lambda buf, g: MOMENTUM * buf + g, state.momentum, grads
        )
        lr = learning_rate(theta, state.step, decay_steps)
        params = jax.tree.map(lambda w, buf: w - lr * buf, state.params, momentum)

        # Training loss on a fresh minibatch.
        loss = cross_entropy(model, params, *minibatch(loss_key))
        return DigitsState(params, momentum, state.step + 1), loss

    return UnrolledProblem(init=init, step=step, horizon=horizon)


def make_task(
    horizon: int = 200,
    batch_size: int = 32,
    hidden_sizes: tuple[int, ...] = (32,),
    decay_steps: float = 20.0,
    num_eval_runs: int = 4,
) -> Task:
    """The digits learning-rate-schedule task.

    Starts from a small initial learning rate (``0.01``) with a steep decay
    (exponent 3), from which PES raises the learning rate and flattens the
    decay. Defaults: PES with ``K=10``, 64 particles, ``sigma=0.1`` and Adam
    with learning rate ``0.05`` for 500 iterations.

    ``evaluate`` is the sum of the training losses of a full inner problem;
    ``validate`` is the cross-entropy on the 360 held-out images after a full
    inner problem. Both average ``num_eval_runs`` inner problems whose keys
    are split from the given key.

    Args:
      horizon: Inner SGD steps per inner problem.
      batch_size: Images per minibatch.
      hidden_sizes: Widths of the MLP's hidden layers.
      decay_steps: ``tau`` of the schedule, in inner steps.
      num_eval_runs: Inner problems averaged by ``evaluate`` and ``validate``.

    Returns:
      The ``Task``.
    """
    for name, value in (
        ("horizon", horizon),
        ("batch_size", batch_size),
        ("num_eval_runs", num_eval_runs),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    data = load_data()
    problem = make_problem(data, horizon, batch_size, hidden_sizes, decay_steps)
    model = MLP(hidden_sizes=tuple(hidden_sizes))

    def validation_loss(theta, key):
        init_key, steps_key = jax.random.split(key)

        def body(state, step_key):
            state, _ = problem.step(theta, state, step_key, None)
            return state, None

        keys = jax.random.split(steps_key, horizon)
        state, _ = jax.lax.scan(body, problem.init(init_key, theta), keys)
        return cross_entropy(model, state.params, data.valid_images, data.valid_labels)

    def evaluate(theta, key):
        keys = jax.random.split(key, num_eval_runs)
        return jax.vmap(lambda k: unroll(problem, theta, k))(keys).mean()

    def validate(theta, key):
        keys = jax.random.split(key, num_eval_runs)
        return jax.vmap(lambda k: validation_loss(theta, k))(keys).mean()

    return Task(
        name="digits",
        problem=problem,
        initial_theta=jnp.asarray([jnp.log(0.01), jnp.log(3.0)], jnp.float32),
        evaluate=evaluate,
        **DEFAULTS,
        validate=validate,
        description="MLP on sklearn digits, tune lr schedule (log lr0, log decay).",
    )

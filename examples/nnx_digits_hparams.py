"""Tuning the optimizer of a Flax NNX model on scikit-learn's digits with PES.

An ``nnx`` MLP is trained on the 8x8 handwritten digits shipped with
scikit-learn (``sklearn.datasets.load_digits``: 1797 images, split once into
1437 training and 360 validation images) by SGD with momentum. Theta is the
optimizer's hyperparameters in unconstrained form, ``{"log_learning_rate",
"logit_momentum"}``; ``pes_optax.inner_training_problem`` turns one inner
training run of ``horizon`` SGD steps into an unrolled problem whose step
loss is the cross-entropy on a validation minibatch after the update. PES
estimates the gradient of the mean of these losses over truncations of
``truncation_length`` steps, and ``pes_optax.Driver`` applies Adam to theta.

The script prints the initial and learned hyperparameters and, for both, the
cross-entropy on all 360 validation images after a full inner run.

Run: python examples/nnx_digits_hparams.py   (about a minute on 2 CPU cores)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import pes_optax

NUM_VALIDATION = 360


class MLP(nnx.Module):
    """64 pixels -> ReLU hidden layer -> 10 logits."""

    def __init__(self, hidden_size: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, hidden_size, rngs=rngs)
        self.out = nnx.Linear(hidden_size, 10, rngs=rngs)

    def __call__(self, images):
        return self.out(jax.nn.relu(self.hidden(images)))


def load_digits_split():
    """``(train_images, train_labels, valid_images, valid_labels)``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.asarray(digits.data, np.float32) / 16.0
    labels = np.asarray(digits.target, np.int32)
    order = np.random.RandomState(0).permutation(len(labels))
    train, valid = order[:-NUM_VALIDATION], order[-NUM_VALIDATION:]
    return tuple(jnp.asarray(a) for a in (images[train], labels[train])) + tuple(
        jnp.asarray(a) for a in (images[valid], labels[valid])
    )


def hyperparams(theta) -> dict[str, float]:
    """Theta in the optimizer's units, as Python floats."""
    values = pes_optax.default_hyperparams_transform(theta, 0)
    return {name: float(value) for name, value in values.items()}


def main(
    num_outer_steps: int = 300,
    num_particles: int = 32,
    horizon: int = 100,
    truncation_length: int = 10,
    hidden_size: int = 32,
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Tunes learning rate and momentum with PES.

    Args:
      num_outer_steps: Outer (Adam) steps on theta.
      num_particles: PES particles.
      horizon: SGD steps per inner training run.
      truncation_length: Inner steps per PES truncation.
      hidden_size: Width of the MLP's hidden layer.
      batch_size: Images per minibatch.
      seed: Seed of the estimator and evaluation keys.

    Returns:
      ``{"initial": {...}, "learned": {...}}``, each with the hyperparameters
      and ``validation_loss`` (cross-entropy on the 360 validation images
      after ``horizon`` SGD steps, averaged over 4 runs).
    """
    train_x, train_y, valid_x, valid_y = load_digits_split()
    graphdef, _ = nnx.split(MLP(hidden_size, rngs=nnx.Rngs(0)), nnx.Param)

    # The NNX model as a pure function of its nnx.Param state.
    def init_model(key):
        model = MLP(hidden_size, rngs=nnx.Rngs(params=key))
        return nnx.state(model, nnx.Param)

    def cross_entropy(params, batch):
        images, labels = batch
        logits = nnx.merge(graphdef, params)(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def sampler(images, labels):
        def sample(key):
            index = jax.random.randint(key, (batch_size,), 0, labels.shape[0])
            return images[index], labels[index]

        return sample

    problem = pes_optax.inner_training_problem(
        init_model,
        cross_entropy,
        optax.sgd,
        None,  # log_/logit_ names -> exp/sigmoid
        sampler(train_x, train_y),
        horizon=horizon,
        meta_loss="validation",
        sample_validation_batch_fn=sampler(valid_x, valid_y),
    )

    @jax.jit
    def validation_loss(theta, key):
        """Full-validation cross-entropy after one whole inner run."""

        def one_run(key):
            keys = jax.random.split(key, horizon + 1)
            state = problem.init(keys[0], theta)

            def body(state, key):
                return problem.step(theta, state, key, None)[0], None

            state, _ = jax.lax.scan(body, state, keys[1:])
            return cross_entropy(state.params, (valid_x, valid_y))

        return jnp.mean(jax.vmap(one_run)(jax.random.split(key, 4)))

    theta = {
        "log_learning_rate": jnp.log(jnp.asarray(0.01)),
        "logit_momentum": jnp.asarray(0.0),  # momentum 0.5
    }
    driver = pes_optax.Driver(
        pes_optax.pes(
            problem,
            num_particles=num_particles,
            sigma=0.1,
            truncation_length=truncation_length,
            key=jax.random.key(seed),
        ),
        optax.adam(0.03),
        theta,
    )
    driver.run(num_outer_steps, steps_per_call=10, progress=False)

    eval_key = jax.random.key(seed + 1)
    result = {}
    for name, value in (("initial", theta), ("learned", driver.theta)):
        result[name] = hyperparams(value)
        result[name]["validation_loss"] = float(validation_loss(value, eval_key))
        print(
            f"{name:8s} learning_rate {result[name]['learning_rate']:.4f}, "
            f"momentum {result[name]['momentum']:.3f}: validation "
            f"cross-entropy {result[name]['validation_loss']:.3f}"
        )
    return result


if __name__ == "__main__":
    main()

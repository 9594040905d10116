"""The char-LSTM, NNX-digits and migration examples run at toy size."""

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
MIGRATION = EXAMPLES / "migration"


def _load(path):
    # As when run as a script: the script's folder is importable (char_data).
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    # Registered in sys.modules: dataclasses (Flax modules) look their module up.
    name = f"_example_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


CHAR_TOY = dict(
    num_outer_steps=40,
    num_particles=8,
    hidden_size=8,
    num_streams=4,
    horizon=20,
    truncation_length=5,
    max_chars=8000,
    heldout_steps=50,
)


@pytest.mark.parametrize("name", ["char_lstm_flax", "char_lstm_haiku"])
def test_char_lstm_tbptt_learns_and_pes_runs(name, capsys):
    result = _load(EXAMPLES / f"{name}.py").main(**CHAR_TOY)
    # The initial model is near-uniform over the 34 characters.
    assert abs(result["initial"] - np.log2(34)) < 0.3
    assert result["tbptt"] < result["initial"] - 0.3
    assert np.isfinite(result["pes"]) and result["pes"] < result["initial"] + 0.05
    assert "bits/char" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["char_lstm_flax", "char_lstm_haiku"])
def test_char_lstm_default_run_both_estimators_learn(name):
    result = _load(EXAMPLES / f"{name}.py").main()
    assert result["pes"] < result["initial"] - 0.5
    assert result["tbptt"] < result["pes"]


def test_char_lstm_text_is_deterministic():
    module = _load(EXAMPLES / "char_lstm_flax.py")
    first, second = module.stdlib_text(20_000), module.stdlib_text(20_000)
    assert first == second and len(first) == 20_000
    assert set(first) <= set(module.VOCAB)


def test_nnx_digits_hparams_lowers_validation_loss(capsys):
    result = _load(EXAMPLES / "nnx_digits_hparams.py").main(
        num_outer_steps=40, num_particles=8, horizon=20, truncation_length=5
    )
    assert result["learned"]["learning_rate"] > result["initial"]["learning_rate"]
    assert result["learned"]["validation_loss"] < result["initial"]["validation_loss"]
    assert "validation" in capsys.readouterr().out


# Migration examples.


def test_tbptt_before_and_after_agree():
    before = _load(MIGRATION / "tbptt_optax_before.py")
    after = _load(MIGRATION / "tbptt_optax_after.py")
    sizes = dict(num_updates=24, horizon=48, truncation_length=8, hidden_size=4)
    params_before, grads_before, losses_before = before.main(**sizes)
    results = after.main(**sizes, estimators=("tbptt",))
    params_after, losses_after = results["tbptt"]

    # The first gradient, from pes_optax.tbptt on the same initial params.
    problem = after.make_problem(sizes["horizon"], sizes["hidden_size"])
    initial = after.init_params(jax.random.key(0), sizes["hidden_size"])
    estimator = after.make_estimator("tbptt", problem, 8, jax.random.key(0))
    zeros = jax.tree.map(jnp.zeros_like, initial)
    grads_after, _ = estimator.update(zeros, estimator.init(initial), initial)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        grads_before[0],
        grads_after,
    )

    # The whole run: 24 updates, 3 passes with resets.
    np.testing.assert_allclose(losses_before, losses_after, rtol=1e-4, atol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
        params_before,
        params_after,
    )


def test_tbptt_after_switch_to_pes_learns():
    after = _load(MIGRATION / "tbptt_optax_after.py")
    sizes = dict(num_updates=60, horizon=48, truncation_length=8, hidden_size=4)
    results = after.main(**sizes, estimators=("pes",), num_particles=16)
    losses = results["pes"][1]
    assert np.mean(losses[-6:]) < 0.5 * np.mean(losses[:6])


def test_evosax_after_learns(capsys):
    after = _load(MIGRATION / "evosax_pes_after.py")
    theta, learned = after.main(num_generations=100, population_size=16)
    problem = after.make_problem(100)
    key = jax.random.key(0)
    assert pes_unroll(problem, learned, key) < pes_unroll(problem, theta, key) - 1.0
    assert "pes_optax.pes" in capsys.readouterr().out


def test_evosax_before_and_after_learn_the_same_hyperparameters():
    pytest.importorskip("evosax")
    before = _load(MIGRATION / "evosax_pes_before.py")
    after = _load(MIGRATION / "evosax_pes_after.py")
    sizes = dict(num_generations=150, population_size=16)
    theta, learned_before = before.main(**sizes)
    _, learned_after = after.main(**sizes)
    # Both move the log learning rate up from log(0.01), to nearby values
    # (their noise streams differ, so only closeness is expected).
    assert learned_before[0] > theta[0] + 1.0 and learned_after[0] > theta[0] + 1.0
    np.testing.assert_allclose(learned_before, learned_after, atol=0.5)


def test_learned_optimization_after_learns():
    after = _load(MIGRATION / "learned_optimization_pes_after.py")
    initial, final = after.main(
        num_outer_steps=100, num_particles=8, horizon=40, truncation_length=10
    )
    assert final < initial


def test_learned_optimization_before_is_a_reference_text():
    text = (MIGRATION / "learned_optimization_pes_before.py.txt").read_text()
    assert text.startswith("REFERENCE ONLY - NOT EXECUTED")


def test_flax_nnx_optimizer_with_pes_learns():
    module = _load(MIGRATION / "flax_nnx_optimizer.py")
    initial, final = module.main(
        num_updates=60, num_particles=8, hidden_size=8, horizon=16, num_streams=4
    )
    assert final < 0.7 * initial


def test_flax_train_state_with_pes_learns_both_ways():
    module = _load(MIGRATION / "flax_train_state.py")
    result = module.main(
        num_updates=60, num_particles=8, hidden_size=8, horizon=16, num_streams=4
    )
    assert result["apply_gradients"] < 0.7 * result["initial"]
    assert result["with_data"] < 0.7 * result["initial"]


@pytest.mark.parametrize(
    "path",
    sorted(MIGRATION.glob("*.py"))
    + [EXAMPLES / f"{n}.py" for n in ("char_lstm_flax", "char_lstm_haiku")]
    + [EXAMPLES / "nnx_digits_hparams.py"],
    ids=lambda p: p.stem,
)
def test_examples_expose_main_and_a_docstring(path):
    if path.stem == "evosax_pes_before":
        pytest.importorskip("evosax")
    module = _load(path)
    assert callable(module.main)
    assert "Run: python examples/" in module.__doc__


def pes_unroll(problem, theta, key):
    import pes_optax

    return float(pes_optax.unroll(problem, theta, key))

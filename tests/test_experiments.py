"""Tests for the paper's synthetic studies (`pes_optax.experiments`).

The default run checks the pieces at toy size; the reproductions of the
paper's influence-balancing, toy-regression and variance claims are marked
``slow`` (run them with ``pytest -m slow``).
"""

import csv
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pes_optax
from pes_optax import experiments, tasks

# --- Entries -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("pes", ("pes", None)), ("tbptt:100", ("tbptt", 100)), (" rtrl:1", ("rtrl", 1))],
)
def test_parse_entry(text, expected):
    assert experiments.parse_entry(text) == expected


@pytest.mark.parametrize("text", ["sgd", "tbptt:0", "tbptt:x", "pes:", ""])
def test_parse_entry_rejects_bad_entries(text):
    with pytest.raises(ValueError, match="must be"):
        experiments.parse_entry(text)


def test_entries_take_the_papers_per_estimator_settings():
    task = tasks.get_task("influence_balancing")
    entries = {e.label: e.settings for e in experiments.make_entries(task)}
    assert list(entries) == list(experiments.DEFAULT_ENTRIES["influence_balancing"])
    assert [entries[f"tbptt:{k}"].truncation_length for k in (1, 10, 100)] == [
        1,
        10,
        100,
    ]
    assert entries["uoro"].learning_rate == 1e-5
    assert entries["pes"].learning_rate == 1e-4
    assert entries["pes"].num_iterations == 3000

    toy = tasks.get_task("toy_regression")
    entries = {e.label: e.settings for e in experiments.make_entries(toy)}
    assert entries["pes"].sigma == 0.3
    assert entries["truncated_es"].sigma == 1.0
    assert entries["tbptt"].truncation_length == 10
    assert entries["rtrl"].truncation_length == entries["uoro"].truncation_length == 1
    assert entries["pes"].num_iterations == 20000


def test_entries_apply_overrides_and_reject_duplicates():
    task = tasks.get_task("toy_regression")
    (entry,) = experiments.make_entries(
        task, ["pes:5"], num_iterations=7, num_particles=6, seed=3
    )
    assert entry.settings.truncation_length == 5
    assert entry.settings.num_iterations == 7
    assert entry.settings.num_particles == 6
    assert entry.settings.seed == 3
    with pytest.raises(ValueError, match="distinct"):
        experiments.make_entries(task, ["pes", "pes"])


# --- Comparison --------------------------------------------------------------


def test_compare_writes_one_plot_and_one_table(tmp_path):
    task = tasks.get_task("toy_regression")
    labels = ["pes", "tbptt:5", "rtrl"]
    entries = experiments.make_entries(
        task, labels, num_iterations=4, num_particles=4, eval_every=2
    )
    result = experiments.compare(task, entries, tmp_path, grid_resolution=5)

    # One row per entry, in the CSV, the JSON and the result.
    with open(result.files["csv"]) as handle:
        rows = list(csv.DictReader(handle))
    assert [row["label"] for row in rows] == labels
    assert [row["label"] for row in result.rows] == labels
    payload = json.loads(result.files["json"].read_text())
    assert [row["label"] for row in payload["rows"]] == labels
    assert payload["grid"]["resolution"] == 5
    for row in result.rows:
        assert row["num_iterations"] == 4
        assert math.isfinite(row["final_meta_objective"])
        ratio = row["final_meta_objective"] / result.grid["optimum_meta_objective"]
        assert row["ratio_to_grid_optimum"] == pytest.approx(ratio, rel=1e-6)
    assert result.rows[1]["truncation_length"] == 5
    assert result.rows[1]["num_particles"] is None

    # The plots are PNGs; every entry has its own metrics.
    for name in ("plot", "heatmap"):
        assert result.files[name].read_bytes()[:4] == b"\x89PNG"
    for folder in ("pes", "tbptt_K5", "rtrl"):
        lines = (tmp_path / folder / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 5
    assert "tbptt:5" in experiments.format_table(result.rows)


def test_compare_skips_the_grid_for_other_tasks(tmp_path):
    task = tasks.get_task("influence_balancing")
    entries = experiments.make_entries(
        task, ["tbptt:10"], num_iterations=2, eval_every=1
    )
    result = experiments.compare(task, entries, tmp_path)
    assert result.grid is None and "heatmap" not in result.files
    assert "ratio_to_grid_optimum" not in result.rows[0]


def test_grid_matches_task_evaluate_at_some_points():
    task = tasks.get_task("toy_regression")
    key = jax.random.key(1)
    axis, values = experiments.meta_objective_grid(task, -5.0, 5.0, 6, key)
    np.testing.assert_allclose(axis, np.linspace(-5.0, 5.0, 6), atol=1e-6)

    # Learning rates up to e^-1: the inner SGD is stable, so the batched grid
    # and one evaluation agree to float32 rounding.
    for i, j in [(0, 0), (1, 2), (2, 0), (2, 2)]:
        expected = task.evaluate(jnp.array([axis[i], axis[j]]), key)
        np.testing.assert_allclose(values[i, j], expected, rtol=1e-5)

    # Larger rates amplify rounding over the 100 steps (up to 3% measured
    # between batched and unbatched float32 evaluations).
    for i, j in [(1, 4), (3, 2), (5, 5)]:
        expected = task.evaluate(jnp.array([axis[i], axis[j]]), key)
        np.testing.assert_allclose(values[i, j], expected, rtol=5e-2)


def test_grid_rejects_a_theta_that_is_not_2d():
    task = tasks.get_task("influence_balancing")
    with pytest.raises(ValueError, match="shape"):
        experiments.meta_objective_grid(task, -1.0, 1.0, 3, jax.random.key(0))


# --- Variance study pieces ---------------------------------------------------


def test_corpus_is_the_zen_of_python_then_docstrings():
    text = experiments.stdlib_corpus()
    assert text.startswith("The Zen of Python, by Tim Peters Beautiful is better")
    assert "  " not in text and "\n" not in text
    assert len(text) > 2000
    assert text == experiments.stdlib_corpus()


@pytest.mark.parametrize("scenario", experiments.SCENARIOS)
def test_character_tokens(scenario):
    real = experiments.character_tokens(50, "real")
    sequence = experiments.character_tokens(50, scenario)
    assert sequence.tokens.shape == (51,) and sequence.tokens.dtype == np.int32
    assert sequence.vocabulary == real.vocabulary
    assert 0 <= sequence.tokens.min() and sequence.tokens.max() < len(real.vocabulary)
    text = "".join(real.vocabulary[t] for t in real.tokens)
    assert text == experiments.stdlib_corpus()[:51]
    if scenario == "repeat":
        assert set(sequence.tokens.tolist()) == {real.tokens[0]}
    if scenario == "random":
        assert len(set(sequence.tokens.tolist())) > 5


def test_character_tokens_rejects_bad_arguments():
    with pytest.raises(ValueError, match="scenario"):
        experiments.character_tokens(10, "shuffled")
    with pytest.raises(ValueError, match="num_tokens"):
        experiments.character_tokens(10**7)


def test_lstm_starts_near_uniform_predictions():
    num_tokens = 30
    sequence = experiments.character_tokens(num_tokens)
    vocabulary_size = len(sequence.vocabulary)
    theta = experiments.init_lstm_theta(jax.random.key(42), vocabulary_size)
    problem = experiments.lstm_problem(num_tokens)
    tokens = jnp.asarray(sequence.tokens)
    loss = pes_optax.unroll(
        problem, theta, jax.random.key(0), data=(tokens[:-1], tokens[1:])
    )
    # Small weights: each step's cross-entropy is close to log(V).
    expected = num_tokens * math.log(vocabulary_size)
    np.testing.assert_allclose(loss, expected, rtol=0.1)


def test_summed_tbptt_over_one_truncation_is_the_exact_gradient():
    num_tokens = 12
    sequence = experiments.character_tokens(num_tokens)
    theta = experiments.init_lstm_theta(jax.random.key(0), len(sequence.vocabulary))
    problem = experiments.lstm_problem(num_tokens)
    tokens = jnp.asarray(sequence.tokens)
    transform = pes_optax.tbptt(
        problem, truncation_length=num_tokens, key=jax.random.key(0)
    )
    summed = experiments.summed_estimate(transform, theta, tokens, num_tokens)
    data = (tokens[:-1], tokens[1:])
    exact = jax.grad(
        lambda t: pes_optax.unroll(problem, t, jax.random.key(0), data=data)
    )(theta)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        summed,
        exact,
    )


def test_variance_settings_are_checked():
    settings = experiments.VarianceSettings(num_tokens=10, truncation_lengths=(3,))
    with pytest.raises(ValueError, match="divide"):
        experiments.check_variance_settings(settings)
    with pytest.raises(ValueError, match="estimators"):
        experiments.check_variance_settings(settings._replace(estimators=("bptt",)))


def test_variance_study_at_tiny_size_writes_its_table(tmp_path):
    settings = experiments.VarianceSettings(
        num_tokens=8,
        truncation_lengths=(2, 8),
        estimators=("pes", "nres"),
        scenarios=("real",),
        num_particles=4,
        num_repeats=2,
    )
    result = experiments.variance_study(settings)
    files = experiments.write_variance_outputs(result, tmp_path)
    assert [(r["estimator"], r["num_truncations"]) for r in result.rows] == [
        ("pes", 4),
        ("pes", 1),
        ("nres", 4),
        ("nres", 1),
    ]
    for row in result.rows:
        assert row["variance"] > 0 and math.isfinite(row["standard_error"])
    with open(files["csv"]) as handle:
        assert len(list(csv.DictReader(handle))) == 4
    markdown = files["markdown"].read_text()
    assert "| K | T/K | real pes | real nres |" in markdown
    assert files["plot"].read_bytes()[:4] == b"\x89PNG"
    payload = json.loads(files["json"].read_text())
    assert set(payload["summary"]["growth"]["real"]) == {"pes", "nres"}


# --- Reproductions (slow) ----------------------------------------------------


@pytest.mark.slow
def test_variance_of_pes_grows_with_truncations_and_nres_does_not():
    # Random tokens, T=200, N=100 particles, 6 repeats: the standard errors
    # measured at this size are under 15% of the means, far from the bounds.
    settings = experiments.VarianceSettings(
        num_tokens=200,
        truncation_lengths=(1, 200),
        estimators=("pes", "nres"),
        scenarios=("random",),
        num_particles=100,
        num_repeats=6,
    )
    result = experiments.variance_study(settings)
    growth = result.summary["growth"]["random"]
    assert growth["pes"] > 5.0
    assert 0.5 < growth["nres"] < 2.0
    # With one truncation both are full ES: about 2 (P + 1) / N.
    num_parameters = result.summary["num_parameters"]
    full_es = [r["variance"] for r in result.rows if r["num_truncations"] == 1]
    for value in full_es:
        assert value == pytest.approx(2 * (num_parameters + 1) / 100, rel=0.5)


def _rows_by_label(result):
    return {row["label"]: row for row in result.rows}


@pytest.mark.slow
def test_influence_balancing_reproduces_the_paper(tmp_path):
    # The paper's settings: 3000 SGD steps, lr 1e-4 (UORO 1e-5), N=1000,
    # sigma=0.1, K=1 unless named.
    task = tasks.get_task("influence_balancing")
    result = experiments.compare(task, experiments.make_entries(task), tmp_path)
    rows = _rows_by_label(result)
    optimum = -1.0 / 6.0

    # PES and RTRL reach the optimum; TBPTT with K=100 converges too.
    for label in ("pes", "rtrl"):
        assert abs(rows[label]["final_theta"] - optimum) < 1e-3
        assert rows[label]["final_meta_objective"] < 1e-8
    assert abs(rows["tbptt:100"]["final_theta"] - optimum) < 1e-3
    assert rows["tbptt:100"]["final_meta_objective"] < 1e-6

    # Short truncations push theta the wrong way.
    for label in ("tbptt:1", "truncated_es"):
        assert rows[label]["final_theta"] > 3.0
        assert rows[label]["final_meta_objective"] > 100.0
    assert rows["tbptt:10"]["final_theta"] > 1e3


@pytest.mark.slow
def test_toy_regression_reproduces_the_paper(tmp_path):
    # 20000 Adam steps (the paper's count); grid 401^2 over [-5, 5]^2.
    task = tasks.get_task("toy_regression")
    result = experiments.compare(task, experiments.make_entries(task), tmp_path)
    rows = _rows_by_label(result)
    optimum = result.grid["optimum_meta_objective"]
    assert 540.0 < optimum < 570.0

    # PES ends within 5% of the grid optimum.
    assert rows["pes"]["final_meta_objective"] < 1.05 * optimum

    # The exact-gradient methods stall in the local minimum near 2423.
    for label in ("tbptt", "rtrl", "uoro"):
        assert rows[label]["final_meta_objective"] == pytest.approx(2423.0, rel=0.02)

    # Truncated ES ends far above PES.
    assert rows["truncated_es"]["final_meta_objective"] > 1.5 * optimum

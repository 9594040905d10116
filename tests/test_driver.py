"""The meta-training driver: fusion, metrics, evaluation, files, checkpoints."""

import csv
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pes_optax

HORIZON = 10
TRUNCATION_LENGTH = 3
EVAL_EVERY = 3
THETA = {"w": jnp.asarray(0.3), "b": jnp.array([0.2, -0.1])}
TRACES = {"step": 0}


def _step(theta, s, key, data):
    TRACES["step"] += 1
    s = 0.9 * s + theta["w"] * data + 0.05 * jax.random.normal(key)
    return s, (s - 1.0) ** 2 + jnp.sum(theta["b"] ** 2)


PROBLEM = pes_optax.UnrolledProblem(
    init=lambda key, theta: jnp.zeros(()), step=_step, horizon=HORIZON
)


def _data_fn(step):
    return jnp.ones((TRUNCATION_LENGTH,)) + 0.01 * step.astype(jnp.float32)


def _eval_fn(theta, key):
    return pes_optax.unroll(PROBLEM, theta, key, data=jnp.ones((HORIZON,)))


def make_driver(
    num_particles=4,
    estimator="pes",
    theta=None,
    config=None,
    with_eval=True,
    eval_fn=_eval_fn,
):
    """The driver every test (and the resuming subprocess) builds."""
    factory = {"pes": pes_optax.pes, "truncated_es": pes_optax.truncated_es}
    estimator = factory[estimator](
        PROBLEM,
        num_particles=num_particles,
        sigma=0.1,
        truncation_length=TRUNCATION_LENGTH,
        key=jax.random.key(1),
    )
    evaluation = {"eval_fn": eval_fn, "eval_every": EVAL_EVERY} if with_eval else {}
    return pes_optax.Driver(
        estimator,
        optax.adam(1e-2),
        THETA if theta is None else theta,
        data_fn=_data_fn,
        eval_key=jax.random.key(7),
        config=config,
        **evaluation,
    )


def _raw(leaf):
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return str(leaf.dtype), np.asarray(jax.random.key_data(leaf))
    return str(leaf.dtype), np.asarray(leaf)


def assert_runs_identical(a, b):
    """Theta, state (keys included), step and metrics equal bit for bit."""
    left = jax.tree.leaves((a.theta, a.state))
    right = jax.tree.leaves((b.theta, b.state))
    assert jax.tree.structure((a.theta, a.state)) == jax.tree.structure(
        (b.theta, b.state)
    )
    for x, y in zip(left, right, strict=True):
        (dtype_x, x), (dtype_y, y) = _raw(x), _raw(y)
        assert dtype_x == dtype_y
        assert np.array_equal(x, y), (x, y)
    assert a.step == b.step
    assert a.metrics == b.metrics


@pytest.fixture(scope="module")
def unfused():
    """Ten outer steps, one per call."""
    driver = make_driver()
    driver.run(10, steps_per_call=1, progress=False)
    return driver


def test_fused_steps_are_bit_identical_to_single_steps(unfused):
    fused = make_driver()
    rows = fused.run(10, steps_per_call=4, progress=False)  # 4 + 4 + 1 + 1

    assert len(rows) == 10
    assert_runs_identical(unfused, fused)


def test_driver_step_is_one_update_of_the_optax_chain(unfused):
    estimator = pes_optax.pes(
        PROBLEM,
        num_particles=4,
        sigma=0.1,
        truncation_length=TRUNCATION_LENGTH,
        key=jax.random.key(1),
    )
    chain = optax.chain(estimator, optax.adam(1e-2))

    @jax.jit
    def one_step(theta, state, step):
        zeros = jax.tree.map(jnp.zeros_like, theta)
        updates, state = chain.update(zeros, state, theta, data=_data_fn(step))
        return optax.apply_updates(theta, updates), state

    theta, state = THETA, chain.init(THETA)
    for step in range(10):
        theta, state = one_step(theta, state, jnp.asarray(step, jnp.int32))

    expected = jax.tree.leaves((theta, state))
    for x, y in zip(
        expected, jax.tree.leaves((unfused.theta, unfused.state)), strict=True
    ):
        assert np.array_equal(_raw(x)[1], _raw(y)[1])


def test_metrics_have_one_row_per_step_with_the_diagnostics(unfused):
    rows = unfused.metrics

    assert [row["step"] for row in rows] == list(range(10))
    required = {"step", "mean_loss", "grad_norm", "num_dropped_pairs"}
    for row in rows:
        assert required | {"num_inner_steps"} <= set(row)
        assert set(row) - required <= {"num_inner_steps", "eval_loss"}
        assert np.isfinite(row["mean_loss"]) and row["grad_norm"] > 0
        assert row["num_dropped_pairs"] == 0
    inner = [row["num_inner_steps"] for row in rows]
    assert inner == [TRUNCATION_LENGTH * (i + 1) for i in range(10)]
    diagnostics = pes_optax.find_diagnostics(unfused.state)
    assert rows[-1]["mean_loss"] == float(diagnostics.mean_loss)


def test_eval_runs_on_its_cadence_with_its_own_key_stream(unfused):
    rows = unfused.metrics
    evaluated = [row["step"] for row in rows if "eval_loss" in row]
    assert evaluated == [0, 3, 6, 9]

    # The evaluation never touches the estimator's randomness.
    silent = make_driver(with_eval=False)
    silent.run(10, steps_per_call=10, progress=False)
    assert [{k: v for k, v in r.items() if k != "eval_loss"} for r in rows] == (
        silent.metrics
    )
    assert np.array_equal(
        jax.random.key_data(silent.state[0].rng_key),
        jax.random.key_data(unfused.state[0].rng_key),
    )


def test_eval_sees_the_theta_each_step_starts_from_and_fresh_keys():
    def eval_fn(theta, key):
        return 1000.0 * theta["w"] + jax.random.uniform(key)

    driver = make_driver(eval_fn=eval_fn)
    starts = []
    for _ in range(7):
        starts.append(float(driver.theta["w"]))
        driver.run(1, progress=False)

    evals = {
        row["step"]: row["eval_loss"] for row in driver.metrics if "eval_loss" in row
    }
    assert sorted(evals) == [0, 3, 6]
    noise = [evals[step] - 1000.0 * starts[step] for step in sorted(evals)]
    assert all(0.0 <= u < 1.0 for u in noise), noise
    assert len({round(u, 3) for u in noise}) == 3, noise  # a new key each time


def test_each_fused_length_compiles_once():
    driver = make_driver(with_eval=False)
    driver.run(4, steps_per_call=2, progress=False)
    traces = TRACES["step"]
    driver.run(6, steps_per_call=2, progress=False)

    assert TRACES["step"] == traces
    assert driver.step == 10


def test_write_metrics_jsonl_and_csv_parse_back(unfused, tmp_path):
    unfused.write_metrics(tmp_path / "m.jsonl")
    unfused.write_metrics(tmp_path / "m.csv")

    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == unfused.metrics
    with open(tmp_path / "m.csv", newline="") as file:
        table = list(csv.DictReader(file))
    assert len(table) == 10
    for row, expected in zip(table, unfused.metrics, strict=True):
        assert row["eval_loss"] == str(expected.get("eval_loss", ""))
        assert float(row["mean_loss"]) == expected["mean_loss"]
        assert int(row["num_inner_steps"]) == expected["num_inner_steps"]
    with pytest.raises(ValueError, match="path"):
        unfused.write_metrics(tmp_path / "m.txt")


def test_plot_writes_a_png(unfused, tmp_path):
    unfused.plot(tmp_path / "curve.png")

    data = (tmp_path / "curve.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_progress_false_prints_nothing_and_true_shows_loss(capsys):
    driver = make_driver(with_eval=False)
    driver.run(2, progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""

    driver.run(2, progress=True)
    captured = capsys.readouterr()
    assert "loss=" in captured.err and "2/2" in captured.err


RESUME = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import test_driver
    driver = test_driver.make_driver()
    driver.load({source!r})
    driver.run(4, steps_per_call=2, progress=False)
    driver.save({target!r})
    """
)


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
    driver = make_driver()
    driver.run(3, progress=False)
    assert np.all(np.asarray(driver.state[0].step) % HORIZON != 0)  # mid-episode
    driver.save(tmp_path / "mid")
    driver.run(4, steps_per_call=2, progress=False)

    script = RESUME.format(
        tests=os.path.dirname(__file__),
        source=str(tmp_path / "mid"),
        target=str(tmp_path / "end"),
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]

    resumed = pes_optax.Driver.restore(
        tmp_path / "end",
        _fresh_pes(),
        optax.adam(1e-2),
        THETA,
        data_fn=_data_fn,
        eval_fn=_eval_fn,
        eval_every=EVAL_EVERY,
        eval_key=jax.random.key(7),
    )
    assert resumed.step == 7
    assert jnp.issubdtype(resumed.state[0].rng_key.dtype, jax.dtypes.prng_key)
    assert_runs_identical(driver, resumed)


def _fresh_pes(num_particles=4):
    return pes_optax.pes(
        PROBLEM,
        num_particles=num_particles,
        sigma=0.1,
        truncation_length=TRUNCATION_LENGTH,
        key=jax.random.key(1),
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "run"
    make_driver(config={"sigma": 0.1}).save(path)
    return path


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_particles": 6}, r"estimator_config\['num_particles'\] is 4 .* 6 here"),
        ({"estimator": "truncated_es"}, r"estimator_config\['estimator'\] is 'pes' .*"),
        ({"theta": {**THETA, "c": jnp.zeros(())}}, r"theta leaf \['c'\]"),
        ({"theta": {"w": THETA["w"], "b": jnp.zeros(3)}}, r"theta leaf \['b'\]"),
        ({"config": {"sigma": 0.2}}, r"config\['sigma'\] is 0.1"),
    ],
)
def test_checkpoint_from_another_configuration_is_refused(checkpoint, kwargs, message):
    kwargs.setdefault("config", {"sigma": 0.1})
    driver = make_driver(**kwargs)
    before = jax.tree.leaves(driver.theta)

    with pytest.raises(ValueError, match="different configuration: " + message):
        driver.load(checkpoint)
    assert all(
        x is y for x, y in zip(before, jax.tree.leaves(driver.theta), strict=True)
    )


def test_save_refuses_to_overwrite_unless_asked(checkpoint, tmp_path):
    driver = make_driver(config={"sigma": 0.1})
    with pytest.raises(ValueError, match="overwrite=True"):
        driver.save(checkpoint)
    driver.save(checkpoint, overwrite=True)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a pes_optax checkpoint"):
        driver.save(tmp_path, overwrite=True)
    with pytest.raises(ValueError, match="no complete pes_optax checkpoint"):
        driver.load(tmp_path)


def test_find_diagnostics_searches_nested_states():
    diagnostics = pes_optax.ESDiagnostics(*(jnp.zeros(()),) * 5)
    state = pes_optax.ESState(*((),) * 7, diagnostics=diagnostics)
    assert pes_optax.find_diagnostics(({"a": optax.EmptyState()}, [state])) is (
        diagnostics
    )
    assert pes_optax.find_diagnostics((optax.EmptyState(), ())) is None


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"estimator": "pes"}, TypeError, "`estimator` must be an optax"),
        ({"eval_fn": _eval_fn}, ValueError, "`eval_every` is None"),
        ({"eval_every": 5}, TypeError, "`eval_fn` must be a callable"),
        ({"eval_fn": _eval_fn, "eval_every": 0}, ValueError, "`eval_every`"),
        ({"data_fn": 3}, TypeError, "`data_fn`"),
        ({"config": {"f": object()}}, TypeError, "`config` must hold JSON"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, message):
    arguments = {"estimator": _fresh_pes(), **kwargs}
    estimator = arguments.pop("estimator")
    with pytest.raises(error, match=message):
        pes_optax.Driver(estimator, optax.sgd(0.1), THETA, **arguments)


def test_run_rejects_bad_step_counts():
    driver = make_driver(with_eval=False)
    with pytest.raises(TypeError, match="steps_per_call"):
        driver.run(2, steps_per_call=1.5, progress=False)
    with pytest.raises(ValueError, match="num_steps"):
        driver.run(-1, progress=False)
    assert driver.run(0, progress=False) == [] and driver.step == 0


# --- Regressions: estimator settings, paths, step counts, row building -----


def _settings_estimator(estimator, settings):
    """``estimator`` with ``settings`` attached as the factories attach theirs."""

    def update(updates, state, params=None, **extra_args):
        return estimator.update(updates, state, params, **extra_args)

    update.estimator_config = settings
    return optax.GradientTransformationExtraArgs(estimator.init, update)


def _settings_driver(num_particles=4, **settings):
    estimator = _settings_estimator(_fresh_pes(num_particles), settings)
    return pes_optax.Driver(estimator, optax.sgd(0.1), THETA, data_fn=_data_fn)


def test_checkpoint_compares_the_estimator_config(tmp_path):
    schedule = optax.linear_schedule(0.1, 0.01, 5)
    saved = {"estimator": "pes", "sigma": 0.1, "sigma_schedule": schedule}
    _settings_driver(**saved).save(tmp_path / "run")

    _settings_driver(**saved).load(tmp_path / "run")  # the same settings load
    for changed, message in [
        ({"sigma": 0.5}, r"estimator_config\['sigma'\] is 0.1 in the checkpoint "),
        (
            {"estimator": "nres", "sigma": 0.5},
            r"estimator_config\['estimator'\] is 'pes' .* 'nres'",
        ),
        ({"antithetic": False}, r"estimator_config\['antithetic'\] is '<missing>'"),
    ]:
        driver = _settings_driver(**{**saved, **changed})
        with pytest.raises(ValueError, match="different configuration: " + message):
            driver.load(tmp_path / "run")

    # Equal settings still leave the state's shapes to be compared.
    with pytest.raises(
        ValueError, match=r"shape \[4\] in the checkpoint but \[6\] here \(was it saved"
    ):
        _settings_driver(num_particles=6, **saved).load(tmp_path / "run")


def _ck_problem_estimator(name, **changes):
    settings = {"num_particles": 4, "sigma": 0.1, "key": 0, **changes}
    if name == "pes":
        settings.setdefault("truncation_length", 5)
    return getattr(pes_optax, name)(PROBLEM, **settings)


@pytest.mark.parametrize(
    "name, changes, message",
    [
        ("full_es", {}, r"\['estimator'\] is 'pes' in the checkpoint but 'full_es'"),
        ("pes", {"sigma": 0.5}, r"\['sigma'\] is 0.1 in the checkpoint but 0.5"),
        ("pes", {"truncation_length": 2}, r"\['truncation_length'\] is 5 .* but 2"),
    ],
)
def test_checkpoint_of_another_estimator_or_setting_is_refused(
    tmp_path, name, changes, message
):
    def driver(estimator):
        return pes_optax.Driver(estimator, optax.sgd(0.1), THETA, data_fn=_data_fn)

    driver(_ck_problem_estimator("pes")).save(tmp_path / "run")

    other = driver(_ck_problem_estimator(name, **changes))
    with pytest.raises(ValueError, match="different configuration: .*" + message):
        other.load(tmp_path / "run")


def test_bad_paths_are_value_errors_naming_the_path(unfused, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")

    with pytest.raises(
        ValueError, match=r"`directory` .*afile/ck.* cannot be created \(a folder on"
    ):
        unfused.save(afile / "ck")
    with pytest.raises(
        ValueError, match=r"`path` .*afile/m.csv.* cannot be written \(a folder on"
    ):
        unfused.write_metrics(afile / "m.csv")
    with pytest.raises(ValueError, match="`path` .*afile/p.png.* cannot be written"):
        unfused.plot(afile / "p.png")
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(ValueError, match="`path` .*dir.csv.* cannot be written"):
        unfused.write_metrics(tmp_path / "dir.csv")  # a folder, not a file


def test_write_metrics_and_plot_create_missing_folders(unfused, tmp_path):
    unfused.write_metrics(tmp_path / "new" / "deeper" / "m.csv")
    unfused.plot(tmp_path / "other" / "p.png")

    assert len((tmp_path / "new" / "deeper" / "m.csv").read_text().splitlines()) == 11
    assert (tmp_path / "other" / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_key_errors_name_eval_key():
    with pytest.raises(TypeError, match="`eval_key` must be a typed PRNG key"):
        pes_optax.Driver(
            _fresh_pes(), optax.sgd(0.1), THETA, eval_key=jax.random.PRNGKey(0)
        )
    with pytest.raises(ValueError, match="`eval_key` seed"):
        pes_optax.Driver(_fresh_pes(), optax.sgd(0.1), THETA, eval_key=2**70)


def test_run_rejects_bool_step_counts():
    driver = make_driver(with_eval=False)
    with pytest.raises(TypeError, match="`num_steps` must be an int"):
        driver.run(True, progress=False)
    with pytest.raises(TypeError, match="`steps_per_call`"):
        driver.run(2, steps_per_call=True, progress=False)
    assert driver.step == 0


class _Column:
    """A metric column that counts its host conversions."""

    def __init__(self, values, dtype):
        self.values, self.dtype, self.conversions = values, dtype, 0

    def __len__(self):
        return len(self.values)

    def __getitem__(self, i):
        self.conversions += 1
        return np.asarray(self.values[i], self.dtype)

    def tolist(self):
        self.conversions += 1
        return np.asarray(self.values, self.dtype).tolist()


def test_rows_convert_each_metric_once():
    from pes_optax._src import metrics as metrics_lib

    columns = {
        "grad_norm": _Column([0.5, 0.25, 0.125], np.float32),
        "mean_loss": _Column([1.5, 2.5, 3.5], np.float32),
        "num_inner_steps": _Column([3, 6, 9], np.int32),
        "eval_loss": _Column([7.0, np.nan, 8.0], np.float32),
    }
    rows = metrics_lib.to_rows(columns, first_step=4, eval_every=2)

    assert [column.conversions for column in columns.values()] == [1, 1, 1, 1]
    assert rows[0] == {
        "step": 4,
        "mean_loss": 1.5,
        "grad_norm": 0.5,
        "num_inner_steps": 3,
        "eval_loss": 7.0,
    }
    assert "eval_loss" not in rows[1] and rows[2]["eval_loss"] == 8.0
    assert all(type(row["num_inner_steps"]) is int for row in rows)
    assert all(type(row["grad_norm"]) is float for row in rows)

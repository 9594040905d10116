"""Tests for the `pes-optax` command line (`pes_optax.cli`)."""

import json
import subprocess
import sys

import pytest

import pes_optax
from pes_optax import _runner, cli, tasks

TINY_RUN = ["--iterations", "6", "--particles", "10", "--eval-every", "3"]


def _run(tmp_path, *args):
    out = tmp_path / "out"
    status = cli.main(["run", *args, "--no-progress", "--out", str(out)])
    assert status == 0
    return out


def _records(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_run_writes_metrics_plot_and_summary(tmp_path, capsys):
    out = _run(tmp_path, "influence_balancing", *TINY_RUN)
    records = _records(out)

    # One record per iteration plus the starting point, all with every key.
    assert [r["iteration"] for r in records] == list(range(7))
    for record in records:
        assert set(record) == set(cli.METRIC_KEYS)
    evaluated = [r["iteration"] for r in records if r["meta_objective"] is not None]
    assert evaluated == [0, 3, 6]
    assert records[0]["meta_objective"] == pytest.approx(8.0, rel=1e-5)
    for record in records[1:]:
        assert record["mean_loss"] >= 0.0
        assert record["grad_norm"] > 0.0
        assert record["num_dropped_pairs"] == 0
    assert records[1]["theta"] != records[0]["theta"]

    # The plot is a PNG; the summary agrees with the metrics.
    assert (out / "meta_objective.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["learned"]["theta"] == records[-1]["theta"]
    assert summary["settings"]["num_particles"] == 10
    assert summary["settings"]["truncation_length"] == 1  # the task's default

    # The final table names both rows.
    printed = capsys.readouterr().out
    assert "initial" in printed and "learned" in printed


def test_same_seed_gives_same_metrics(tmp_path):
    first = _run(tmp_path / "a", "influence_balancing", *TINY_RUN, "--seed", "4")
    second = _run(tmp_path / "b", "influence_balancing", *TINY_RUN, "--seed", "4")
    other = _run(tmp_path / "c", "influence_balancing", *TINY_RUN, "--seed", "5")
    metrics = (first / "metrics.jsonl").read_text()
    assert metrics == (second / "metrics.jsonl").read_text()
    assert metrics != (other / "metrics.jsonl").read_text()


def test_default_task_is_digits_with_pes(tmp_path):
    out = _run(tmp_path, *TINY_RUN)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == tasks.DEFAULT_TASK == "digits"
    assert summary["settings"]["estimator"] == "pes"
    assert summary["learned"]["validation"] is not None


@pytest.mark.parametrize("estimator", sorted(cli.ESTIMATORS))
def test_every_estimator_runs(tmp_path, estimator):
    args = ["toy_regression", "--estimator", estimator, "--iterations", "2"]
    if cli.ESTIMATORS[estimator].uses_particles:
        args += ["--particles", "4"]
    out = _run(tmp_path, *args)
    records = _records(out)
    assert len(records) == 3
    assert records[-1]["meta_objective"] is not None


def test_list_names_tasks_and_estimators(capsys):
    assert cli.main(["list"]) == 0
    printed = capsys.readouterr().out
    for name in (*tasks.TASKS, *cli.ESTIMATORS):
        assert name in printed


def test_list_shows_each_tasks_defaults(capsys):
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()

    header = next(line.split() for line in lines if "particles" in line)
    assert header == [
        "task",
        "estimator",
        "particles",
        "sigma",
        "truncation",
        "optimizer",
        "learning-rate",
        "iterations",
    ]
    for name in tasks.TASKS:
        task = tasks.get_task(name) if name != "digits" else None
        defaults = tasks.default_settings(name)
        (row,) = [line.split() for line in lines if line.split()[:1] == [name]]
        row = [cell for cell in row if cell != "(default)"]
        assert row[1] == defaults["estimator"]
        assert int(row[2]) == defaults["num_particles"]
        assert float(row[3]) == defaults["sigma"]
        assert int(row[4]) == defaults["truncation_length"]
        assert float(row[6]) == defaults["learning_rate"]
        assert int(row[7]) == defaults["num_iterations"]
        if task is not None:
            assert (int(row[2]), float(row[6])) == (
                task.num_particles,
                task.learning_rate,
            )
    assert any(line.split()[:2] == ["influence_balancing", "pes"] for line in lines)
    assert "sgd" in next(line for line in lines if "influence_balancing" in line)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--particles", "0"], "--particles must be > 0"),
        (["run", "--particles", "ten"], "--particles must be an integer"),
        (["run", "--sigma", "nan"], "--sigma must be > 0"),
        (["run", "--seed", "-1"], "seed must be >= 0"),
        (
            ["run", "--seed", "99999999999999999999999"],
            "seed must be < 9223372036854775808",
        ),
        (["run", "--seed", str(2**63)], "seed must be < 9223372036854775808"),
        (
            ["compare", "toy_regression", "--seed", str(2**64)],
            "seed must be < 9223372036854775808",
        ),
        (["variance", "--seed", str(2**64)], "seed must be < 9223372036854775808"),
        (["run", "--out", ""], "--out must name a folder, got an empty path"),
        (["compare", "toy_regression", "--out", " "], "got an empty path"),
        (["run", "--estimator", "sgd"], "invalid choice: 'sgd'"),
        (["run", "mnist"], "invalid choice: 'mnist'"),
        (["run", "toy_regression", "--particles", "3"], "`num_particles` must"),
        (
            ["run", "toy_regression", "--truncation-length", "500"],
            "`truncation_length` (500) must not exceed",
        ),
        (["run", "influence_balancing", "--estimator", "full_es"], "finite"),
        (["run", "--estimator", "full_es", "--truncation-length", "5"], "drop it"),
        ([], "required: command"),
    ],
)
def test_bad_arguments_are_argparse_errors(args, message, capsys):
    with pytest.raises(SystemExit) as excinfo:
        cli.main(args)
    assert excinfo.value.code == 2
    assert message in capsys.readouterr().err


def test_out_must_not_be_a_file(tmp_path, capsys):
    existing = tmp_path / "file.txt"
    existing.write_text("")
    with pytest.raises(SystemExit):
        cli.main(["run", "--out", str(existing), "--no-progress"])
    assert "is not a folder" in capsys.readouterr().err


def test_largest_seed_is_accepted():
    args = cli.build_parser().parse_args(["run", "--seed", str(2**63 - 1)])
    assert args.seed == 2**63 - 1


@pytest.mark.parametrize(
    "command", [["run", "influence_balancing"], ["variance"]], ids=["run", "variance"]
)
def test_out_that_cannot_be_created_is_an_argparse_error(tmp_path, capsys, command):
    afile = tmp_path / "afile"
    afile.write_text("")
    for out, message in [
        (
            afile / "sub" / "deeper",
            "cannot be created (a folder on the path is a file)",
        ),
        ("/proc/forbidden", "cannot be created"),
    ]:
        with pytest.raises(SystemExit) as excinfo:
            cli.main([*command, "--no-progress", "--out", str(out)])
        assert excinfo.value.code == 2
        assert f"--out {out} {message}" in capsys.readouterr().err


def test_module_runs_as_a_script():
    completed = subprocess.run(
        [sys.executable, "-m", "pes_optax.cli", "list"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert "influence_balancing" in completed.stdout


def test_gradient_method_entries_take_no_particles(tmp_path, monkeypatch, capsys):
    # The extension point for backprop and online methods: an entry built by
    # `_gradient_method` passes only the truncation length and the key.
    calls = []

    def factory(problem, *, truncation_length, key):
        calls.append(truncation_length)
        return pes_optax.truncated_es(
            problem,
            num_particles=2,
            sigma=0.1,
            truncation_length=truncation_length,
            key=key,
        )

    spec = _runner._gradient_method(factory, "a stand-in gradient method")
    monkeypatch.setitem(cli.ESTIMATORS, "stand_in", spec)
    out = _run(
        tmp_path,
        "toy_regression",
        "--estimator",
        "stand_in",
        "--iterations",
        "2",
        "--truncation-length",
        "5",
    )
    assert len(_records(out)) == 3
    assert set(calls) == {5}

    with pytest.raises(SystemExit):
        cli.main(["run", "--estimator", "stand_in", "--particles", "4"])
    assert "--particles does not apply" in capsys.readouterr().err


def test_compare_prints_one_table_and_writes_one_plot(tmp_path, capsys):
    out = tmp_path / "compare"
    args = ["compare", "influence_balancing", "--estimators", "pes,tbptt:10"]
    args += ["--iterations", "3", "--particles", "4", "--no-progress"]
    assert cli.main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tbptt:10" in printed and "pes" in printed
    payload = json.loads((out / "comparison.json").read_text())
    assert [row["label"] for row in payload["rows"]] == ["pes", "tbptt:10"]
    assert payload["rows"][0]["num_particles"] == 4
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert len((out / "comparison.csv").read_text().splitlines()) == 3
    assert (out / "tbptt_K10" / "summary.json").exists()


def test_variance_prints_its_table(tmp_path, capsys):
    out = tmp_path / "variance"
    args = ["variance", "--tokens", "4", "--truncation-lengths", "4"]
    args += ["--estimators", "nres", "--scenarios", "random", "--particles", "2"]
    args += ["--repeats", "2", "--no-progress", "--out", str(out)]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "| K | T/K | random nres |" in printed
    for name in ("variance.csv", "variance.md", "variance.json", "variance.png"):
        assert (out / name).exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compare", "toy_regression", "--estimators", "sgd"], "NAME or NAME:K"),
        (["compare", "toy_regression", "--estimators", "pes:0"], "must be >= 1"),
        (["compare", "toy_regression", "--estimators", "pes,pes"], "distinct"),
        (["compare", "toy_regression", "--grid-resolution", "1"], "or >= 2"),
        (["compare", "toy_regression", "--particles", "3"], "`num_particles` must"),
        (["variance", "--truncation-lengths", "3"], "must divide"),
        (["variance", "--estimators", "bptt"], "`estimators` must be"),
        (["variance", "--scenarios", "poems"], "`scenarios` must be"),
        (["variance", "--repeats", "0"], "--repeats must be > 0"),
    ],
)
def test_bad_study_arguments_are_argparse_errors(args, message, capsys):
    with pytest.raises(SystemExit) as excinfo:
        cli.main(args)
    assert excinfo.value.code == 2
    assert message in capsys.readouterr().err

"""Every example script runs at toy size and does what it claims."""

import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_reduces_the_meta_objective(capsys):
    initial, final = _load("quickstart").main(num_iterations=150, num_particles=16)
    assert final < 0.2 * initial
    assert "meta-objective" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["quickstart"])
def test_examples_expose_main(name):
    assert callable(_load(name).main)

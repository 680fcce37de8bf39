"""Every example in a docstring of the package runs and prints what it says."""

import doctest
import importlib
import importlib.util
import pkgutil

import pytest

import hf_gb


def _modules_with_examples() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(hf_gb.__path__, "hf_gb."):
        spec = importlib.util.find_spec(info.name)
        if spec and spec.origin and spec.origin.endswith(".py"):
            with open(spec.origin, encoding="utf-8") as f:
                if ">>> " in f.read():
                    names.append(info.name)
    return names


MODULES = _modules_with_examples()


def test_the_examples_are_found():
    assert {"hf_gb.engine.step", "hf_gb.engine.families.hash", "hf_gb.io.pretrained"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    if importlib.util.find_spec("deepspeed") is not None:
        import deepspeed  # noqa: F401  (its first import prints a line, which an example would otherwise show)
    monkeypatch.chdir(tmp_path)  # examples that write relative paths write here
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, report=True)
    assert result.attempted > 0 and result.failed == 0, f"{result.failed} of {result.attempted} examples failed"

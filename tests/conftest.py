"""Test-wide settings: tiny banks run the eager kernels unless a test is marked ``compiled``."""

import os
import shutil

import pytest

# The same default for what runs outside a test function (module- and session-scoped fixtures build models too):
# a checkpoint saved by a fixture on one kernel path and reloaded in a test on another would differ in the last bit.
os.environ.setdefault("HF_GB_DISABLE_COMPILE", "1")


@pytest.fixture(autouse=True)
def _kernel_path(request, monkeypatch):
    # Compiling tiny banks costs more than it tests; the compiled path has its own tests (marked `compiled`).
    # The variable also reaches the subprocesses that tests launch.
    if request.node.get_closest_marker("compiled") is None:
        monkeypatch.setenv("HF_GB_DISABLE_COMPILE", "1")
    else:
        monkeypatch.delenv("HF_GB_DISABLE_COMPILE", raising=False)


@pytest.fixture
def copy_of(saved, tmp_path):
    """A writable copy of the checkpoint folder of the test module's ``saved`` fixture (its second item)."""
    return shutil.copytree(saved[1], tmp_path / "copy")

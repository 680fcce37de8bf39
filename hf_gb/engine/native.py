"""The native CPU g-net kernel (``hf_gb/engine/csrc/gnet_cpu.cpp``), built on first use (`torch.utils.cpp_extension`).

It computes what `hf_gb.engine.kernels` states, for float32 banks on CPU, in about half the compiled forward's time and
two thirds of its backward's (`benchmarks/bench_engine.py`). The build needs a C++ compiler with OpenMP and ninja (the
compiler ``torch.compile`` needs on CPU, plus the ninja package), takes about 40 s once per machine and is cached
in torch's extension directory (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). It is compiled
for the CPU it runs on, so its directory name hashes that CPU with the source and the torch and Python versions.
If the build fails, `get` warns once and returns None: the callers then run the compiled or eager kernels.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "gnet_cpu.cpp"
_module = None
_failed = False


def _build_key() -> str:
    """A short hash of what the binary depends on: the source, the CPU's model and instruction-set flags
    (``-march=native`` builds run only where built), torch's and Python's versions."""
    text = SOURCE.read_text() + platform.machine() + torch.__version__ + sys.version
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "model name", "Features")):
                text += line
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        pass
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _x86_flags() -> list[str]:
    # gcc keeps 256-bit vectors on AVX-512 CPUs unless told otherwise; the kernel's loops want the full width.
    return ["-mprefer-vector-width=512"] if platform.machine() in ("x86_64", "AMD64") else []


def failed() -> bool:
    """Whether a build was tried in this process and failed."""
    return _failed


def get():
    """The built extension module, or None after one warning if it cannot be built here."""
    global _module, _failed
    if _module is not None or _failed:
        return _module
    try:
        from torch.utils.cpp_extension import get_default_build_root, load

        name = f"hf_gb_gnet_cpu_{_build_key()}"
        directory = Path(get_default_build_root()) / name
        if not (directory / f"{name}.so").exists():
            logger.warning("hf_gb: building the native g-net kernel in %s (once per machine, about 40 s)", directory)
        directory.mkdir(parents=True, exist_ok=True)
        _module = load(
            name=name,
            sources=[str(SOURCE)],
            build_directory=str(directory),
            extra_cflags=["-O3", "-march=native", "-fopenmp", *_x86_flags()],
            extra_ldflags=["-fopenmp"],
            verbose=os.environ.get("HF_GB_VERBOSE_BUILD", "0") == "1",
        )
    except Exception as e:  # a missing compiler, ninja or OpenMP raises many types
        _failed = True
        logger.warning(
            "the native g-net kernel cannot be built here (%s: %s); using the torch.compile or eager kernels "
            "instead (GBConfig.kernel='compiled' or 'eager' silences this)",
            type(e).__name__, e,
        )
    return _module

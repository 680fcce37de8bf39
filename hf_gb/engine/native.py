"""The native CPU g-net kernels (``hf_gb/engine/csrc``), built on first use (`torch.utils.cpp_extension`).

It computes what `hf_gb.engine.kernels` states, for float32 banks on CPU, in about half the compiled forward's time and
two thirds of its backward's (`benchmarks/bench_engine.py`). The build needs a C++ compiler with OpenMP and ninja (the
compiler ``torch.compile`` needs on CPU, plus the ninja package), takes about 40 s once per machine and is cached
in torch's extension directory (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). It is compiled
for the CPU it runs on, so its directory name hashes that CPU with the source and the torch and Python versions.
`get` builds it (training: the first prediction kept for a push) and announces the build; `ready` only loads what is
built, so that predictions without gradients never wait for a build. If the build fails, `get` warns once and
returns None: the callers then run the compiled or eager kernels.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import platform
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
SOURCES = (_CSRC / "gnet_cpu.cpp", _CSRC / "hash_cpu.cpp")  # compiled into one module
HEADERS = (_CSRC / "rows.h",)
BUILD_SECONDS = 40  # what one build takes on the project's 2-core CPU (20 to 40 s measured), for the announcement
_module = None
_failed = False


@functools.cache
def _build_key() -> str:
    """A short hash of what the binary depends on: the source, the CPU's model and instruction-set flags
    (``-march=native`` builds run only where built), torch's and Python's versions."""
    text = "".join(p.read_text() for p in (*SOURCES, *HEADERS)) + platform.machine() + torch.__version__ + sys.version
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


def _name() -> str:
    return f"hf_gb_gnet_cpu_{_build_key()}"


def build_directory() -> Path:
    """Where the kernel is built and cached: ``$TORCH_EXTENSIONS_DIR/<name>``, else under torch's default root
    (``~/.cache/torch_extensions``; torch's ``get_default_build_root`` itself does not read the variable)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR", "").strip()
    if not root:
        from torch.utils.cpp_extension import get_default_build_root

        root = get_default_build_root()
    return Path(root) / _name()


def ready():
    """The extension module if it is loaded or built already (then imported), else None; never builds or warns.

    What predictions without gradients use (`hf_gb.engine.kernels.prediction_only`): they run the eager kernels,
    which give the same values, rather than wait for a build.
    """
    global _module
    if _module is not None or _failed:
        return _module
    library = build_directory() / f"{_name()}.so"
    if library.is_file():
        try:
            spec = importlib.util.spec_from_file_location(_name(), library)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except (ImportError, OSError) as e:  # e.g. a library left half written by a killed build: build again
            logger.info("hf_gb: the cached native kernel %s does not load (%s); it will be rebuilt", library, e)
            return None
        _module = module
    return _module


def get():
    """The extension module, built first if it is not yet (once per machine, announced with its expected
    duration), or None after one warning if it cannot be built here."""
    global _module, _failed
    if ready() is not None or _failed:
        return _module
    directory = build_directory()
    logger.warning("hf_gb: building the native g-net kernel for training in %s (once per machine, about %d s; "
                   "predictions without gradients do not wait for it)", directory, BUILD_SECONDS)
    try:
        _module = _build(directory)
    except Exception as e:  # a missing compiler, ninja or OpenMP raises many types
        _failed = True
        logger.warning(
            "the native g-net kernel cannot be built here (%s: %s); using the torch.compile or eager kernels "
            "instead (GBConfig.kernel='compiled' or 'eager' silences this)",
            type(e).__name__, e,
        )
    return _module


def _build(directory: Path):
    from torch.utils.cpp_extension import load

    directory.mkdir(parents=True, exist_ok=True)
    return load(
        name=_name(),
        sources=[str(p) for p in SOURCES],
        build_directory=str(directory),
        extra_cflags=["-O3", "-march=native", "-fopenmp", *_x86_flags()],
        extra_ldflags=["-fopenmp"],
        verbose=logger.isEnabledFor(logging.DEBUG),  # the compiler's commands and output at debug level
    )

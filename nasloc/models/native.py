"""Fused CPU kernels in C++ (``csrc/``), compiled on first use and cached.

PyTorch's eager ops each read and write whole tensors; for a mechanism made of many small ops on small
maps (dilated attention at 8x8: 9 offsets, each a full pass over q, k and v) that traffic, not the
arithmetic, is the cost. A fused kernel visits each neighbourhood once.

The first process that needs a kernel compiles it with torch's ``cpp_extension`` (the machine's C++
compiler and ninja; about a minute) into torch's extension cache (``~/.cache/torch_extensions``, or
``$TORCH_EXTENSIONS_DIR``); concurrent processes wait on torch's lock, later ones load the build. The
build is keyed by the source, the flags and the CPU's instruction sets (it is compiled with
``-march=native``). Where compiling fails, or ``NASLOC_NATIVE=0`` is set, the caller keeps its eager
form: same outputs, slower; a warning says why once.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

_SOURCES = Path(__file__).parent / "csrc"
_FLAGS = ["-O3", "-march=native", "-fopenmp"]


def cpuinfo(key: str) -> str | None:
    """The value of the first ``key`` line of /proc/cpuinfo (Linux), else None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _build_name(source: Path) -> str:
    # the CPU's instruction-set flags: a shared cache never hands a build to a CPU that lacks them
    cpu = cpuinfo("flags") or os.uname().machine
    key = hashlib.sha256(source.read_bytes() + " ".join(_FLAGS).encode() + cpu.encode())
    return f"nasloc_{source.stem}_{key.hexdigest()[:12]}"


def _put_ninja_on_path() -> None:
    """torch's build runs ``ninja`` from PATH; the pip package's binary is not there unless the venv is active."""
    if shutil.which("ninja") is None:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def enabled() -> bool:
    return os.environ.get("NASLOC_NATIVE", "1") != "0"


@functools.cache
def load(stem: str) -> ModuleType | None:
    """The compiled kernel ``csrc/<stem>.cpp``, or None (with one warning) where it cannot be built.

    Callers ask :func:`usable` first, which honours ``NASLOC_NATIVE=0`` (this result is cached)."""
    source = _SOURCES / f"{stem}.cpp"
    try:
        # its import warns that no CUDA runtime is found, which is irrelevant to a CPU kernel
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        from torch.utils import cpp_extension

        _put_ninja_on_path()
        name = _build_name(source)
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        if not (build_dir / f"{name}.so").exists():
            print(f"[nasloc] compiling the fused CPU kernel {stem} (once per machine, about a minute)",
                  file=sys.stderr, flush=True)
        return cpp_extension.load(name=name, sources=[str(source)], extra_cflags=_FLAGS,
                                  extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # a missing compiler or ninja, a failed build: the eager form still works
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        warnings.warn(f"nasloc: the fused CPU kernel {stem} could not be built ({first_line}); "
                      "using the slower eager form. Set NASLOC_NATIVE=0 to skip the attempt.", stacklevel=2)
        return None


def usable(*tensors: torch.Tensor) -> bool:
    """Whether a fused CPU kernel may take these tensors here: CPU floats, in eager mode.

    fvcore's trace and torch's exporters (ONNX) must see the eager ops: they count and export those.
    """
    if not enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors)

"""The one native piece: a CUDA device guard for CPU-only builds of PyTorch.

Built with the system C++ compiler against the installed torch's headers (about 2 s), once per torch
version, into `~/.cache/revati` (or `$REVATI_CACHE`); `make` builds it at install time
(`python -m replayer.native`). Loading it is idempotent.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("cuda_guard.cpp")
_loaded = False


class NativeBuildError(RuntimeError):
    """The guard could not be compiled: no C++ compiler, or torch's headers are missing."""


def needed() -> bool:
    """Whether this torch lacks a working CUDA device guard: a CPU-only build, or a CUDA build with no driver.

    (On a CUDA build the fake guard replaces the real one for the rest of the process: without a driver
    the real one can only fail.)
    """
    if not torch.backends.cuda.is_built():
        return True
    return not torch.cuda.is_available()


def library_path() -> Path:
    cache = Path(os.environ.get("REVATI_CACHE", Path.home() / ".cache" / "revati"))
    tag = hashlib.sha1(f"{torch.__version__}|{_SOURCE.read_bytes()!r}".encode()).hexdigest()[:12]
    return cache / f"cuda_guard-{tag}.so"


def build(force: bool = False) -> Path:
    """Compile the guard for the installed torch; returns the library's path."""
    out = library_path()
    if out.exists() and not force:
        return out
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        raise NativeBuildError("revati needs a C++ compiler (g++ or clang++) to build its CUDA device guard")
    torch_dir = Path(torch.__file__).parent
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    abi = int(torch.compiled_with_cxx11_abi())
    cmd = [
        cxx, "-O1", "-shared", "-fPIC", "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        f"-I{torch_dir / 'include'}", str(_SOURCE), "-o", str(tmp),
        f"-L{torch_dir / 'lib'}", f"-Wl,-rpath,{torch_dir / 'lib'}", "-lc10",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise NativeBuildError(
            f"building the CUDA device guard failed:\n{' '.join(cmd)}\n{result.stderr[-2000:]}"
        )
    os.replace(tmp, out)
    return out


def load() -> None:
    """Register the guard in this process (building it first if needed); a no-op on CUDA builds."""
    global _loaded
    if _loaded or not needed():
        return
    ctypes.CDLL(str(build()), mode=ctypes.RTLD_GLOBAL)
    _loaded = True


if __name__ == "__main__":
    if needed():
        print(f"revati: CUDA device guard built at {build(force='--force' in sys.argv)}")
    else:
        print("revati: this torch has CUDA support built in; no device guard needed")

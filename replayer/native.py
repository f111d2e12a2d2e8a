"""The native pieces: a CUDA device guard for CPU-only builds of PyTorch, and the hot path (hot_path.cpp).

Each is built with the system C++ compiler against the installed torch's headers (the guard in about 2 s,
the hot path in about 30 s), once per torch version, into `~/.cache/revati` (or `$REVATI_CACHE`); `make`
builds both at install time (`python -m replayer.native`). Loading the guard is idempotent.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("cuda_guard.cpp")
HOT_PATH_SOURCE = Path(__file__).with_name("hot_path.cpp")
_loaded = False
_hot_path: ctypes.PyDLL | None = None
_hot_path_unavailable: str | None = None


class NativeBuildError(RuntimeError):
    """A native piece could not be compiled: no C++ compiler, or torch's (or Python's) headers are missing."""


def needed() -> bool:
    """Whether this torch lacks a working CUDA device guard: a CPU-only build, or a CUDA build with no driver.

    (On a CUDA build the fake guard replaces the real one for the rest of the process: without a driver
    the real one can only fail.)
    """
    if not torch.backends.cuda.is_built():
        return True
    return not torch.cuda.is_available()


def library_path(source: Path = _SOURCE) -> Path:
    cache = Path(os.environ.get("REVATI_CACHE", Path.home() / ".cache" / "revati"))
    tag = hashlib.sha1(f"{torch.__version__}|{source.read_bytes()!r}".encode()).hexdigest()[:12]
    return cache / f"{source.stem}-{tag}.so"


def build(force: bool = False) -> Path:
    """Compile the guard for the installed torch; returns the library's path."""
    return _compile(_SOURCE, "the CUDA device guard", ["-O1"], ["-lc10"], force)


def build_hot_path(force: bool = False) -> Path:
    """Compile the hot path for the installed torch and Python; returns the library's path."""
    torch_dir = Path(torch.__file__).parent
    flags = ["-O2", f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}"]
    flags.append(f"-I{sysconfig.get_paths()['include']}")
    libs = ["-lc10", "-ltorch_cpu", "-ltorch", "-ltorch_python"]
    return _compile(HOT_PATH_SOURCE, "the hot path", flags, libs, force)


def _compile(source: Path, what: str, flags: list[str], libs: list[str], force: bool) -> Path:
    out = library_path(source)
    if out.exists() and not force:
        return out
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        raise NativeBuildError(f"revati needs a C++ compiler (g++ or clang++) to build {what}")
    torch_dir = Path(torch.__file__).parent
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    abi = int(torch.compiled_with_cxx11_abi())
    cmd = [
        cxx, *flags, "-shared", "-fPIC", "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        f"-I{torch_dir / 'include'}", str(source), "-o", str(tmp),
        f"-L{torch_dir / 'lib'}", f"-Wl,-rpath,{torch_dir / 'lib'}", *libs,
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise NativeBuildError(f"building {what} failed:\n{' '.join(cmd)}\n{result.stderr[-2000:]}")
    os.replace(tmp, out)
    return out


def load() -> None:
    """Register the guard in this process (building it first if needed); a no-op on CUDA builds."""
    global _loaded
    if _loaded or not needed():
        return
    ctypes.CDLL(str(build()), mode=ctypes.RTLD_GLOBAL)
    _loaded = True


def load_hot_path() -> ctypes.PyDLL | None:
    """The hot path's library (built first if needed), or None where it cannot be: why, in
    `hot_path_unavailable()`. Loaded once per process."""
    global _hot_path, _hot_path_unavailable
    if _hot_path is not None or _hot_path_unavailable is not None:
        return _hot_path
    try:
        if not library_path(HOT_PATH_SOURCE).exists():  # `make` builds it at install
            print("revati: building the C++ hot path for this torch (once, ~30 s)", file=sys.stderr)
        lib = ctypes.PyDLL(str(build_hot_path()), mode=ctypes.RTLD_GLOBAL)  # PyDLL: the calls keep the GIL
    except (NativeBuildError, OSError) as e:
        _hot_path_unavailable = str(e).splitlines()[0]
        print(f"revati: {_hot_path_unavailable}; every op is emulated in Python (slower)", file=sys.stderr)
        return None
    obj = ctypes.py_object
    lib.revati_hot_enable.argtypes = [obj] * 6
    lib.revati_hot_register.argtypes = [ctypes.c_char_p, ctypes.c_char_p, obj]
    lib.revati_hot_hits.restype = ctypes.c_longlong
    lib.revati_memory_types.restype = obj
    _hot_path = lib
    return lib


def hot_path_unavailable() -> str | None:
    return _hot_path_unavailable


if __name__ == "__main__":
    force = "--force" in sys.argv
    if needed():
        print(f"revati: CUDA device guard built at {build(force)}")
    else:
        print("revati: this torch has CUDA support built in; no device guard needed")
    try:
        print(f"revati: hot path built at {build_hot_path(force)}")
    except NativeBuildError as e:  # emulation still works, every op in Python (slower)
        print(f"revati: {e}\nrevati: without it every op is emulated in Python (about 2x slower per op)")

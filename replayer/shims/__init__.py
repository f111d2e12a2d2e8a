"""Shims for GPU-only kernel libraries: stand-in modules for their compiled extensions, defining each op
they would register with its schema, what it returns (a fake implementation, run on meta tensors) and,
through revati.op_features, what it costs.

An engine imports a library's compiled extension by name (`import vllm._C_stable_libtorch`); `install`
puts a finder on `sys.meta_path` that answers those names with the stand-in modules in this package.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

import torch

from revati.op_features import register_features

# The compiled extension a GPU build has -> the stand-in module here that defines its ops.
STAND_INS = {
    "vllm._C_stable_libtorch": "replayer.shims.vllm_ops",
    "vllm.vllm_flash_attn._vllm_fa3_C": "replayer.shims.flash_attn",
}
# Compiled extensions that only work with the CUDA driver and that the engine can do without: absent, as on
# a build without them (vLLM's cuMem allocator serves its sleep mode; its shutdown imports it).
ABSENT = {"vllm.cumem_allocator"}


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name not in STAND_INS and name not in ABSENT:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        if module.__name__ in ABSENT:
            raise ModuleNotFoundError(
                f"{module.__name__} needs the CUDA driver (emulated)", name=module.__name__
            )
        shim = importlib.import_module(STAND_INS[module.__name__])
        module.__dict__.update({k: v for k, v in vars(shim).items() if not k.startswith("__")})
        module.__doc__ = f"revati stand-in for {module.__name__}: {shim.__doc__.splitlines()[0]}"


_FINDER = _Finder()


def install() -> None:
    """Answer the extension names in STAND_INS with their stand-ins, in this process (idempotent)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def define(lib: torch.library.Library, schema: str, fake, *, features=None, key: str | None = None) -> None:
    """Define op `schema` in `lib`'s namespace unless the process already has it, give it `fake` as its
    Meta kernel (what the emulator runs for shapes), and `features` for the predictor under `key`.

    >>> define(_lib, "reshape_and_cache_flash(Tensor key, ...) -> ()", _no_output, features=_kv_write)
    """
    name = schema.split("(", 1)[0]
    qualified = f"{lib.ns}::{name}"
    if not torch._C._dispatch_has_kernel(qualified) and not _defined(lib.ns, name):
        lib.define(schema)
    if not torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "Meta"):
        lib.impl(name, fake, "Meta")
    if features is not None:
        register_features(getattr(getattr(torch.ops, lib.ns), name), key=key)(features)


def host(lib: torch.library.Library, schema: str, fn) -> None:
    """Define op `schema`, which takes no tensor and answers the host (a capability query), as `fn`."""
    lib.define(schema)
    lib.impl(schema.split("(", 1)[0], fn, "CompositeExplicitAutograd")


def _defined(ns: str, name: str) -> bool:
    try:
        getattr(getattr(torch.ops, ns), name)
    except (AttributeError, RuntimeError):
        return False
    return True


def no_output(*args, **kwargs) -> None:
    """The fake of an op that only writes its arguments."""
    return None

"""Native meta kernels: shape inference at C++ speed while emulating.

PyTorch registers Python meta functions (torch._meta_registrations) over the Meta dispatch key for
about 1,300 ops, most of which also have a C++ structured meta kernel; the Python one wins and costs
~150-300 µs per call against a few µs. The emulator runs every new op signature on the meta device, and
an engine's growing KV cache makes new signatures every step, so for the emulation's lifetime the Python
registrations are withdrawn wherever a C++ meta kernel exists, and put back afterwards.
"""

from __future__ import annotations

import torch
import torch._meta_registrations as _registrations

_LIB_NAME = "_meta_lib_dont_use_me_use_register_meta"
# A C++ kernel under one of these keys computes the op on meta tensors without Python.
_NATIVE = ("Meta", "CompositeExplicitAutograd", "CompositeExplicitAutogradNonFunctional")


def _impl_name(op: torch._ops.OpOverload) -> str:
    ns, name = op.name().split("::", 1)
    return f"{ns}/{name}/Meta"


def use_native(patch) -> None:
    """Withdraw the Python meta kernels that shadow C++ ones, until `patch.restore()`."""
    original = getattr(_registrations, _LIB_NAME)
    impls = getattr(original, "_op_impls", set())
    table: dict = {}
    for kind in ("meta", "post_autograd", "pre_autograd"):
        for op, fn in torch._decomp.global_decomposition_table[kind].items():
            if isinstance(op, torch._ops.OpOverload):
                table.setdefault(op, fn)
    registered = [(op, fn) for op, fn in table.items() if _impl_name(op) in impls]
    original._destroy()
    lean = torch.library.Library("aten", "IMPL", "Meta")
    for op, fn in registered:
        if not any(torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), k) for k in _NATIVE):
            lean.impl(op, fn)
    setattr(_registrations, _LIB_NAME, lean)

    def restore():
        lean._destroy()
        full = torch.library.Library("aten", "IMPL", "Meta")
        for op, fn in registered:
            full.impl(op, fn)
        setattr(_registrations, _LIB_NAME, full)

    patch.on_restore(restore)

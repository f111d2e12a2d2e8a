"""Import-only stand-in for nvidia-cutlass-dsl (CuTe DSL): any cutlass.* module, any attribute; decorators
pass functions through. Its kernels (SM100 dual GEMM) are never selected on an H100."""

import importlib.abc
import importlib.machinery
import sys
import types


class _Any(types.ModuleType):
    __path__ = []  # a package: submodules come from the finder below

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        sub = f"{self.__name__}.{name}"
        if sub not in sys.modules:
            sys.modules[sub] = _Any(sub)
        return sys.modules[sub]

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda f: f


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("cutlass."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Any(spec.name)

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())
sys.modules[__name__].__class__ = _Any

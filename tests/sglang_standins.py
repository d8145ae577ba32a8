"""Stand-ins for the GPU-only modules (triton, torchvision) that sglang 0.5.23's CPU-usable modules import at
module level: what is missing is served as a module whose every attribute is a pass-through (decorators return
the function, classes are empty types). Only for processes that import sglang (tests/fake_sglang.py,
tests/workers/sglang_checks.py), never the pytest process: torch itself probes for triton. Where the real
package is installed (the Docker image) it is used."""
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

STUBBED = ("triton", "torchvision")


class _StubClass(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(f"{cls.__name__}.{name}")


class _Anything(types.ModuleType):
    __path__ = []  # a package: submodules resolve through the finder

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        # classes (triton.runtime.jit.JITFunction, ...) must be types: torch uses them in isinstance checks
        value = _StubClass(name, (), {}) if name[0].isupper() else _Anything(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]  # used as a decorator (@triton.jit)
        return lambda fn: fn

    def __mro_entries__(self, bases):
        return (object,)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Anything(spec.name)
        module.__version__ = "0.0.0"
        return module

    def exec_module(self, module):
        pass


def install():
    global STUBBED
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return  # installed: find_spec would now find the stand-ins themselves
    STUBBED = tuple(name for name in STUBBED if importlib.util.find_spec(name) is None)
    if STUBBED:
        sys.meta_path.insert(0, _Finder())

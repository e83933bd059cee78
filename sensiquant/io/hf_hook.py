"""Registering sensiquant with transformers on ``import sensiquant``, without importing transformers then.

transformers takes seconds to import, and most uses of sensiquant that do not load a model never need it. So
:func:`install` registers at once only when transformers' quantizer registry (``transformers.quantizers.auto``)
is already imported; otherwise it waits on ``sys.meta_path`` for that module's import and registers right after
the module has run, before any ``from_pretrained`` can look a quantization method up.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

REGISTRY = "transformers.quantizers.auto"


def _register() -> None:
    try:
        from .hf import register

        register()
    except Exception as exc:  # noqa: BLE001 - a transformers sensiquant cannot register with must still import
        warnings.warn(f"sensiquant could not register its quantizer with transformers ({type(exc).__name__}: {exc}); "
                      "load sensiquant checkpoints with sensiquant.load_quantized", stacklevel=2)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds no module itself: hands the import of the registry to the other finders, and has the module's loader
    register sensiquant once the module has run."""

    def __init__(self) -> None:
        self._finding = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != REGISTRY or self._finding:
            return None
        self._finding = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _uninstall()
            _register()

        spec.loader.exec_module = exec_module
        return spec


def _uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterImport)]


def install() -> None:
    """Register now if transformers' registry is imported, else as soon as it is (see the module docstring)."""
    if REGISTRY in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())

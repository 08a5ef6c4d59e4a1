"""Registering quant_method ``signlock`` with transformers: the one thing ``import hf_signlock`` does eagerly.

transformers keeps its quantizer registry in ``transformers.quantizers.auto``, and importing that module imports the
whole loading machinery with ``accelerate`` (transformers 5: ``quantizers/base.py`` -> ``core_model_loading`` ->
``integrations/accelerate``). ``import hf_signlock`` should not cost that, so registration waits for the registry:
done at once when it is already imported, else right after transformers imports it, which every ``from_pretrained``
does before it reads a config. The wait is an import hook on that one module, removed once it has fired.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys

from ..constants import QUANT_METHOD

REGISTRY_MODULE = "transformers.quantizers.auto"
QUANTIZER_MODULE = "hf_signlock.quantization.quantizer"


def register() -> None:
    """Add ``SignLockConfig`` and ``SignLockHfQuantizer`` to transformers' registry (idempotent)."""
    auto = importlib.import_module(REGISTRY_MODULE)  # also while it is still being bound to its package

    from .config import SignLockConfig

    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(SignLockConfig)
    # Loading attributes (dequantize) are merged only for the config classes in this tuple; there is no hook for it.
    if SignLockConfig not in auto.LOADING_ATTRIBUTES_CONFIG_TYPES:
        auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*auto.LOADING_ATTRIBUTES_CONFIG_TYPES, SignLockConfig)
    # The quantizer registers itself as its module finishes executing. That module imports transformers' quantizer
    # base, which can be what brought us here: then it is half-imported and completes (and registers) after us.
    if QUANTIZER_MODULE not in sys.modules:
        importlib.import_module(QUANTIZER_MODULE)


class _RegisterAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the registry module through the other finders and registers once it has executed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)  # one shot
        spec = next((found for finder in sys.meta_path if hasattr(finder, "find_spec")
                     for found in [finder.find_spec(fullname, path, target)] if found is not None), None)
        if spec is None or spec.loader is None:
            return spec
        self.loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        register()


def register_when_transformers_loads() -> None:
    """Register now if transformers' registry is imported, else as soon as it is."""
    if REGISTRY_MODULE in sys.modules:
        register()
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())

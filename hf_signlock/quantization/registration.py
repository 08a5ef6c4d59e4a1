"""Registering quant_method ``signlock`` with transformers: the one thing ``import hf_signlock`` does eagerly.

transformers keeps its quantizer registry in ``transformers.quantizers.auto``, and importing that module imports the
whole loading machinery with ``accelerate`` (transformers 5: ``quantizers/base.py`` -> ``core_model_loading`` ->
``integrations/accelerate``). ``import hf_signlock`` should not cost that, so registration waits for the registry:
done at once when it is already imported, else right after transformers imports it, which every ``from_pretrained``
does before it reads a config. The wait is an import hook on that one module, removed once it has fired.

Loading a SignLock checkpoint with ``quantization_config=SignLockConfig(dequantize=False)`` (or ``base_model=...``)
is the documented way to choose how it loads, so it must not warn. transformers' ``merge_quantization_configs``
warns whenever a config is passed for a quantized checkpoint, whatever the method; registration therefore wraps it:
a ``SignLockConfig`` passed for a ``signlock`` checkpoint has its loading attributes merged without the warning
(``merge_loading_attributes``; settings it would ignore are still named in a warning), every other case goes to
transformers' own method unchanged, warnings included.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys

from transformers.utils import logging

from ..constants import QUANT_METHOD

logger = logging.get_logger(__name__)

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
    _wrap_merge(auto.AutoHfQuantizer)
    # The quantizer registers itself as its module finishes executing. That module imports transformers' quantizer
    # base, which can be what brought us here: then it is half-imported and completes (and registers) after us.
    if QUANTIZER_MODULE not in sys.modules:
        importlib.import_module(QUANTIZER_MODULE)


def _is_signlock(quantization_config) -> bool:
    method = (quantization_config.get("quant_method") if isinstance(quantization_config, dict)
              else getattr(quantization_config, "quant_method", None))
    return str(getattr(method, "value", method)) == QUANT_METHOD


def merge_loading_attributes(checkpoint_config, passed):
    """The ``SignLockConfig`` of a checkpoint (``checkpoint_config``: its config.json's dict, or a config) with the
    loading attributes of ``passed`` (``passed.get_loading_attributes()``: dequantize, base_model, base_revision)
    set on it, as transformers merges them, without its "You passed `quantization_config`" warning. Settings of
    ``passed`` that are no loading attributes and differ from the defaults cannot change a stored checkpoint: they
    are named in a warning, since the caller may expect them to apply."""
    from .config import SignLockConfig

    config = (SignLockConfig.from_dict(dict(checkpoint_config)) if isinstance(checkpoint_config, dict)
              else checkpoint_config)
    loading = passed.get_loading_attributes()
    for name, value in loading.items():
        setattr(config, name, value)
    defaults = SignLockConfig().to_dict()
    ignored = sorted(name for name, value in passed.to_dict().items()
                     if name not in loading and name not in ("dequantize", "base_model", "base_revision")
                     and name in defaults and value != defaults[name])
    if ignored:
        logger.warning(f"SignLockConfig({', '.join(f'{name}={getattr(passed, name)!r}' for name in ignored)}) passed "
                       "to from_pretrained is ignored: a SignLock checkpoint loads with the settings it was exported "
                       "with; only dequantize, base_model and base_revision change how it loads.")
    elif loading:
        logger.info(f"SignLock checkpoint loaded with {loading}.")
    return config


def _wrap_merge(quantizer_class) -> None:
    """Make ``quantizer_class.merge_quantization_configs`` silent for a SignLockConfig passed for a signlock
    checkpoint (idempotent); other methods and other cases keep transformers' own behaviour."""
    original = quantizer_class.__dict__.get("merge_quantization_configs")
    function = getattr(original, "__func__", None)
    if function is None or getattr(function, "_signlock_wrapped", False):
        return

    def merge_quantization_configs(cls, quantization_config, quantization_config_from_args):
        from .config import SignLockConfig

        if isinstance(quantization_config_from_args, SignLockConfig) and _is_signlock(quantization_config):
            return merge_loading_attributes(quantization_config, quantization_config_from_args)
        return function(cls, quantization_config, quantization_config_from_args)

    merge_quantization_configs._signlock_wrapped = True
    merge_quantization_configs.__wrapped__ = function
    merge_quantization_configs.__doc__ = function.__doc__
    quantizer_class.merge_quantization_configs = classmethod(merge_quantization_configs)


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

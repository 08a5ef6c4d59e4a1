"""The transformers quantizer for ``quant_method: signlock`` (transformers 5 loading flow).

The forgotten-import trap: without ``import hf_signlock`` transformers does not know ``signlock``; it logs
"Unknown quantization type", skips the quantization and would randomly initialise the target layers. So every
SignLock checkpoint also holds two guard tensors that make such a load fail loudly: one under the first target
layer's ``.weight`` name with a shape no model has (a size-mismatch error, raised by transformers itself), and one
whose name is the fix (listed in transformers' load report above that error). With hf_signlock imported, both are
expected and skipped.

``from_pretrained`` of a SignLock checkpoint: the model is built on the meta device, ``SignLockLinear`` modules
replace the target layers (their stored tensors have the shapes recorded in ``config.layers``), the checkpoint's
safetensors headers are checked for every layer's tensors, the standard loader fills them by name, and after loading
every layer is verified (checksums of the stored tensors and of the decoded signs) and, with ``dequantize=True``,
swapped for a dense ``nn.Linear`` / ``Conv1D``.
"""

from __future__ import annotations

import re

import torch
from safetensors import safe_open
from transformers.quantizers import HfQuantizer, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

from .compressed_linear import SignLockLinear, link_shared_tables
from .errors import CorruptCheckpointError
from .export import dense_module
from .quant_config import QUANT_METHOD

GUARD_KEY = "hf_signlock_checkpoint.LOAD_NEEDS__pip_install_hf-signlock__and__import_hf_signlock"
GUARD_TEXT = "This is a SignLock checkpoint: pip install hf-signlock, then import hf_signlock before from_pretrained."


def guard_tensors(config) -> dict[str, torch.Tensor]:
    message = torch.tensor(list(GUARD_TEXT.encode()), dtype=torch.uint8)
    first = min(config.layers)  # a target `.weight` the plain model expects (min: config.json sorts its keys)
    return {first: message, GUARD_KEY: message.clone()}


def _replace(modules: dict[str, torch.nn.Module], name: str, module: torch.nn.Module) -> None:
    """``model.set_submodule(name, module)`` through a ``named_modules()`` map made once, not a walk per layer."""
    parent, _, child = name.rpartition(".")
    setattr(modules[parent], child, module)


def check_layers_are_stored(layers: list[SignLockLinear], checkpoint_files: list[str]) -> None:
    """Every tensor of every layer (payload, bias) is in the checkpoint at the shape its record gives. Checked from
    the safetensors headers before loading: transformers would fill a missing or mis-sized tensor with uninitialised
    memory (``empty_like``) and go on, and no ``_init_weights`` knows our module. The payload checksum would refuse
    such a payload, but not by name and not every time; nothing would refuse such a bias."""
    files = [path for path in checkpoint_files if str(path).endswith(".safetensors")]
    if not files:  # other formats keep only the checksum check
        return
    expected = {layer.param_name.removesuffix("weight") + name: (layer, name, list(tensor.shape))
                for layer in layers for name, tensor in layer.state_dict(keep_vars=True).items()}
    stored = {}
    for path in files:
        with safe_open(path, "pt") as file:
            keys = [key for key in file.keys() if key in expected]  # noqa: SIM118 (a safe_open handle, not a dict)
            stored.update((key, file.get_slice(key).get_shape()) for key in keys)
    for key, (layer, name, shape) in expected.items():
        if key not in stored:
            raise CorruptCheckpointError(
                f"{layer.param_name}: the checkpoint has no `{key}` tensor; export the model again or restore the file"
            )
        if stored[key] != shape:
            raise CorruptCheckpointError(
                f"{layer.param_name}: the stored {name} has shape {stored[key]}, the layer record needs {shape} "
                "(truncated file, or a tensor from another checkpoint)"
            )


class SignLockHfQuantizer(HfQuantizer):
    requires_calibration = False

    def _process_model_before_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | {
            re.escape(key) + "$" for key in guard_tensors(config)
        }
        modules = dict(model.named_modules())
        layers = []
        for param_name, record in config.layers.items():
            module_name = param_name.removesuffix(".weight")
            if module_name not in modules:
                raise CorruptCheckpointError(
                    f"{param_name}: the SignLock config names a layer this {type(model).__name__} does not have"
                )
            layers.append(SignLockLinear(param_name, record, config, device="meta"))
            _replace(modules, module_name, layers[-1])
        link_shared_tables(layers)  # the payload sizes depend on who stores the codebook: check that before loading
        check_layers_are_stored(layers, kwargs.get("checkpoint_files") or [])
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        dtype = model.get_input_embeddings().weight.dtype  # the dtype the model was loaded in
        modules = dict(model.named_modules())
        layers = {name: module for name, module in modules.items() if isinstance(module, SignLockLinear)}
        signs = {name: layer.verify() for name, layer in layers.items()}  # every layer checked before any is used
        if self.quantization_config.dequantize:
            for name, layer in layers.items():
                _replace(modules, name, dense_module(layer, layer.decode_weight(signs.pop(name), dtype)))
        return model

    def get_state_dict_and_metadata(self, model):
        state_dict = model.state_dict()
        state_dict.update(guard_tensors(self.quantization_config))
        return state_dict, {"signlock": GUARD_TEXT}

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:  # a module reload must not register twice
    register_quantizer(QUANT_METHOD)(SignLockHfQuantizer)

"""The transformers quantizer for ``quant_method: signlock`` (transformers 5 loading flow).

``from_pretrained`` of a SignLock checkpoint: the model is built on the meta device, ``SignLockLinear`` modules
replace the target layers (their stored tensors have the shapes recorded in ``config.layers``), the standard loader
fills them by name, and after loading every layer is verified (checksums of the stored tensors and of the decoded
signs) and, with ``dequantize=True``, swapped for a dense ``nn.Linear`` / ``Conv1D``.
"""

from __future__ import annotations

from transformers.quantizers import HfQuantizer, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

from .compressed_linear import SignLockLinear
from .errors import CorruptCheckpointError
from .export import dense_module
from .quant_config import QUANT_METHOD


class SignLockHfQuantizer(HfQuantizer):
    requires_calibration = False

    def _process_model_before_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        modules = dict(model.named_modules())
        for param_name, record in config.layers.items():
            module_name = param_name.removesuffix(".weight")
            if module_name not in modules:
                raise CorruptCheckpointError(
                    f"{param_name}: the SignLock config names a layer this {type(model).__name__} does not have"
                )
            model.set_submodule(module_name, SignLockLinear(param_name, record, config, device="meta"))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        dtype = model.get_input_embeddings().weight.dtype  # the dtype the model was loaded in
        for module_name, module in list(model.named_modules()):
            if not isinstance(module, SignLockLinear):
                continue
            signs = module.verify()
            if self.quantization_config.dequantize:
                model.set_submodule(module_name, dense_module(module, module.decode_weight(signs).to(dtype)))
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:  # a module reload must not register twice
    register_quantizer(QUANT_METHOD)(SignLockHfQuantizer)

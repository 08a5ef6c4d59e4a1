"""The transformers quantizer for ``quant_method: signlock`` (transformers 5 loading flow).

Loading a SignLock checkpoint: the model is built on the meta device, ``SignLockLinear`` modules replace the target
layers (shapes from the architecture, codec parameters from the layer records), the signs of the base model of a
``sign_source="base"`` checkpoint are read and checked against its checksum, the checkpoint's safetensors headers
are checked for every layer's tensors, the standard loader fills them by name, and after loading every layer is
verified (checksums of the stored bytes and of the decoded signs) and, unless ``dequantize=False``, swapped for a
dense ``nn.Linear`` / ``Conv1D`` in the dtype the model was loaded in.

Quantizing on load: ``from_pretrained(dense, quantization_config=SignLockConfig(...))`` loads the dense weights as
usual, then compresses the target layers (``quantize_model``).

``model.dequantize()`` decodes every compressed layer into a dense one and drops the quantization config.
"""

from __future__ import annotations

import os
import re

import torch
from transformers.quantizers import auto as quantizers_auto
from transformers.quantizers.base import HfQuantizer

from ..constants import CHECKSUMMED_FORMAT, QUANT_METHOD
from ..errors import CorruptCheckpointError, SignLockConfigError, SignLockError
from ..targets import find_target_modules, tied_head
from .base_signs import base_named_by_checkpoint, check_base_signs
from .compressed import link_shared_tables
from .format.guard import GUARD_KEY, check_guards, guard_keys, guard_tensors
from .format.payload import payload_key
from .format.stored import check_every_tensor, read_stored, read_tensor
from .layers import check_payloads, compressed_layers, compressed_like, dequantize_layers, install
from .quantize import check_budget_is_possible, quantize_model


class SignLockHfQuantizer(HfQuantizer):
    """Loads SignLock checkpoints, quantizes dense models on load, dequantizes, and saves them back."""

    requires_calibration = False

    def validate_environment(self, device_map=None, **kwargs):
        """Refuse what SignLock layers cannot do: offloading weights to the CPU or disk, a device with no backend."""
        values = list(device_map.values()) if isinstance(device_map, dict) else [] if device_map is None else [device_map]
        devices = {str(device) for device in values}
        if "disk" in devices or ("cpu" in devices and len(devices) > 1):
            raise SignLockConfigError(
                f"device_map={device_map!r} offloads part of the model to the CPU or disk; SignLock layers decode "
                "their weight where their payload lives and cannot be offloaded. Load on one device "
                "(device_map='cpu' or 'cuda'), or give the GPUs enough max_memory for the whole model."
            )
        wants_cuda = any(isinstance(device, int) or str(device).startswith("cuda") for device in values)
        if wants_cuda and not torch.cuda.is_available():
            raise SignLockConfigError(
                f"device_map={device_map!r} names a CUDA device, but this torch build has no CUDA backend. Load with "
                "device_map='cpu', or install a CUDA build of torch."
            )
        if not self.pre_quantized:
            self.quantization_config.check_seed()

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise SignLockConfigError(f"dtype={dtype} is not supported; load in float32, bfloat16 or float16.")
        return dtype

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        config = self.quantization_config
        targets = find_target_modules(model, config.target_modules, config.target_embeddings)
        if not self.pre_quantized:  # quantize on load: dense weights load as usual; refuse an impossible budget now
            check_budget_is_possible(targets, config)
            return model
        shapes = {f"{name}.weight": tuple(module.weight.shape) for name, module in targets.items()}
        records = config.layer_records(list(shapes))  # refuses records of other targets, by name
        config.check_checksum(shapes)  # every number that decides how the bytes decode, before any is used
        stored = read_stored(checkpoint_files)
        first_target = next(iter(records))
        if config.format_version >= CHECKSUMMED_FORMAT:
            if not stored:
                raise CorruptCheckpointError("a SignLock checkpoint is stored as safetensors; these weight files are "
                                             f"not ({checkpoint_files}). Export the model again.")
            check_guards({key: (entry.shape, entry.dtype) for key, entry in stored.items()},
                         lambda: read_tensor(stored[GUARD_KEY], GUARD_KEY), first_target, config.config_checksum,
                         config.format_version)
        base_bits = {}
        if config.sign_source == "base":  # the base is found, of this architecture, with the signs exported against
            if not getattr(config, "base_model_from_caller", False):
                folder = os.path.dirname(os.fspath(checkpoint_files[0])) if checkpoint_files else None
                config.base_model = base_named_by_checkpoint(config.base_model, folder)
            base_bits = check_base_signs(config, shapes)
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | {
            re.escape(key) + "$" for key in guard_keys(first_target, config.format_version)
        }
        tied = config.target_embeddings and tied_head(model)
        layers = {}
        for (module_name, module), (param_name, record) in zip(targets.items(), records.items()):
            layer = layers[module_name] = compressed_like(module, param_name, record, config)
            layer.base_bits = base_bits.get(param_name)  # checked just now: not looked up again per layer
            layer.to(model.config.dtype)  # the dtype the model is loaded in (the bias is cast on load)
        install(model, layers, tied)
        link_shared_tables(layers.values())  # the payload sizes depend on who stores the codebook: before loading
        # each payload is read from its key in the file (`<layer>.weight` from format 7): see get_weight_conversions
        self._payload_keys = {f"{name}.payload": payload_key(name, config.format_version) for name in layers}
        check_every_tensor(model, stored, self._payload_keys)  # every tensor, compressed or not, at its shape
        return model

    def get_weight_conversions(self):
        """Read each compressed layer's payload from the key it is stored under (from format 7 the dense weight's
        own name, ``<layer>.weight``) into the layer's ``payload`` parameter."""
        from transformers.core_model_loading import WeightRenaming

        return [WeightRenaming(source_patterns=re.escape(stored) + "$", target_patterns=tensor)
                for tensor, stored in getattr(self, "_payload_keys", {}).items() if stored != tensor]

    def _process_model_after_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        if not self.pre_quantized:
            quantize_model(model, config)  # checked by construction
        layers = compressed_layers(model).values()
        on_cpu = all(layer.payload.device.type == "cpu" for layer in layers)
        dense = self._dense = config.dequantize_on_load(self.pre_quantized, on_cpu)
        if dense:
            dequantize_layers(model, model.config.dtype, verify=self.pre_quantized)
        else:
            if self.pre_quantized:  # every layer checked before any is used
                check_payloads(layers)
                for layer in layers:
                    layer.verify(payload_checked=True)
            for layer in layers:  # the kernels' operands: a code past a table is found now, not in a forward
                layer.kernel_operands()
        return model

    def postprocess_model(self, model, **kwargs):
        """As transformers' own, with ``dequantize=None`` resolved (see ``SignLockConfig.dequantize``) and the layers
        verified before the quantization config is dropped."""
        from transformers.modeling_utils import PreTrainedModel  # imported by now; not at registration time

        model.config.quantization_config = self.quantization_config
        self._process_model_after_weight_loading(model, **kwargs)
        if self._dense:
            self.remove_quantization_config(model)
        else:
            for module in model.modules():
                if isinstance(module, PreTrainedModel):
                    module.config._is_quantized = True
            model.add_model_tags(["hf-signlock", "signlock"])
        return model

    def _dequantize(self, model, dtype=None):
        if isinstance(dtype, str):  # transformers passes model.config.dtype, which a loaded config may hold as a name
            dtype = getattr(torch, dtype.removeprefix("torch."))
        return dequantize_layers(model, dtype)

    def get_state_dict_and_metadata(self, model):
        layers = compressed_layers(model)
        if not layers:
            raise SignLockError(
                "This model holds no SignLock layers any more (they were dequantized or merged), but its config still "
                "says quant_method='signlock'. Call model.dequantize() to save it as a dense model, or "
                "hf_signlock.quantize_model(model, config) to compress it again."
            )
        records = {layer.param_name: layer.record for layer in layers.values()}
        config = self.quantization_config
        if config.layers is not None and config.layer_count != len(records):
            raise SignLockError(
                f"{config.layer_count} layers were compressed but {len(records)} remain compressed (the others were "
                "replaced or merged): this model can no longer be saved as a SignLock checkpoint. Call "
                "model.dequantize() to save it dense, or compress it again with hf_signlock.quantize_model."
            )
        # refinement renews checksums in the layers: the config follows them, sealed again
        config.set_layer_records(records, {layer.param_name: layer.shape for layer in layers.values()})
        state_dict = model.state_dict()
        for name in layers:  # the payload under the dense weight's own name (format 7: see guard.py)
            state_dict[payload_key(name, config.format_version)] = state_dict.pop(f"{name}.payload")
        state_dict.update(guard_tensors(config.config_checksum))
        return state_dict, {}

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    def is_serializable(self):
        return True

    @property
    def is_compileable(self) -> bool:
        return True  # the compressed forward is a torch custom op (hf_signlock::compressed_linear): traced, not broken

    @property
    def is_trainable(self) -> bool:
        return True  # adapters (LoRA) train on top of frozen SignLock layers; see hf_signlock.quantization.lora


if QUANT_METHOD not in quantizers_auto.AUTO_QUANTIZER_MAPPING:  # see registration.py; a reload must not register twice
    quantizers_auto.register_quantizer(QUANT_METHOD)(SignLockHfQuantizer)

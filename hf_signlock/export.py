"""``quantize_model``: replace a model's target layers by ``SignLockLinear`` modules, as a SignLockConfig says.

Signs: the trained weight's sign (zero counts as +1) is stored as the flips against the seeded reference (or as
packed bits); magnitudes go through the codec. Every layer's record (shape, flips, checksums) lands in
``config.layers``, and the config becomes ``model.config.quantization_config``, so ``save_pretrained`` /
``push_to_hub`` write a checkpoint that ``from_pretrained`` loads back.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .compressed_linear import SignLockLinear, flip_positions, sign_digest, tensor_digest
from .flip_coding import encode_flips
from .quant_config import SignLockConfig
from .reference import pack_signs
from .signs import reference_signs
from .targets import find_target_modules


def _layout(module: nn.Module) -> str:
    return "conv1d" if isinstance(module, Conv1D) else "linear"


@torch.no_grad()
def compress_layer(param_name: str, module: nn.Module, config: SignLockConfig) -> SignLockLinear:
    weight = module.weight.detach().cpu()
    signs = torch.where(weight >= 0, 1, -1).to(torch.int8)
    record = {"shape": list(weight.shape), "layout": _layout(module), "dtype": str(weight.dtype).removeprefix("torch."),
              "bias": module.bias is not None}
    if config.sign_source == "packed":
        sign_tensors = {"sign_bits": pack_signs(signs)}
        record["flips"] = None
    else:
        reference = reference_signs(config.seed, param_name, weight.shape, config.sign_source, config.template_rank)
        positions = flip_positions(signs, reference)
        blob = encode_flips(positions, weight.numel())
        sign_tensors = {"flips": torch.frombuffer(bytearray(blob), dtype=torch.uint8)}
        record["flips"] = len(positions)
        record["flip_bytes"] = len(blob)
    layer = SignLockLinear(param_name, record, config, device="cpu")
    stored = {**layer.codec.encode(weight.abs()), **sign_tensors}
    for name, tensor in stored.items():
        setattr(layer, name, tensor)
    if module.bias is not None:
        layer.bias = nn.Parameter(module.bias.detach().cpu().clone(), requires_grad=False)
    record["stored_checksum"] = tensor_digest(layer.stored_tensors())
    record["sign_checksum"] = sign_digest(signs)
    return layer.to(module.weight.device)


def quantize_model(model: nn.Module, config: SignLockConfig) -> nn.Module:
    """Compress the target layers of ``model`` in place; returns the model."""
    modules = find_target_modules(model, config.target_modules)
    config.layers = {}
    for module_name, module in modules.items():
        param_name = f"{module_name}.weight"
        layer = compress_layer(param_name, module, config)
        config.layers[param_name] = layer.record
        model.set_submodule(module_name, layer)
    from .quantizer import SignLockHfQuantizer

    model.config.quantization_config = config
    model.hf_quantizer = SignLockHfQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = config.quant_method
    return model


def dense_module(layer: SignLockLinear, weight: torch.Tensor) -> nn.Module:
    """The plain module a compressed layer stands for, holding ``weight``."""
    if layer.layout == "linear":
        module = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    else:
        module = Conv1D(layer.out_features, layer.in_features).to("meta")
    module.weight = nn.Parameter(weight, requires_grad=True)
    if layer.bias is not None:
        module.bias = nn.Parameter(layer.bias.detach(), requires_grad=True)
    return module

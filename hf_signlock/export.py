"""``quantize_model``: replace a model's target layers by ``SignLockLinear`` modules, as a SignLockConfig says.

Signs: the trained weight's sign (zero counts as +1) is stored as the flips against the seeded reference (or as
packed bits); magnitudes go through the codec. Every layer's record (shape, flips, checksums) lands in
``config.layers``, and the config becomes ``model.config.quantization_config``, so ``save_pretrained`` /
``push_to_hub`` write a checkpoint that ``from_pretrained`` loads back.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging

from .bpw import RECORD_BITS, write_bpw
from .compressed_linear import SignLockLinear, flip_positions, link_shared_tables, payload_digest, sign_digest
from .errors import SignLockConfigError
from .flip_coding import encode_flips
from .magnitude_codecs import make_codec
from .quant_config import SignLockConfig
from .reference import pack_signs
from .signs import reference_signs
from .targets import find_target_modules
from .trainer import STATS_NAME

logger = logging.get_logger(__name__)


def _layout(module: nn.Module) -> str:
    return "conv1d" if isinstance(module, Conv1D) else "linear"


def _sign_tensors(param_name: str, weight: torch.Tensor, config: SignLockConfig) -> tuple[dict, dict]:
    """The tensors that store the signs of ``weight`` (coded flips, or packed bits) and their record fields."""
    signs = torch.where(weight >= 0, 1, -1).to(torch.int8)
    if config.sign_source == "packed":
        return {"sign_bits": pack_signs(signs)}, {"flips": None, "sign_checksum": sign_digest(signs)}
    reference = reference_signs(config.seed, param_name, weight.shape, config.sign_source, config.template_rank)
    positions = flip_positions(signs, reference)
    blob = encode_flips(positions, weight.numel())
    return ({"flips": torch.frombuffer(bytearray(blob), dtype=torch.uint8)},
            {"flips": len(positions), "flip_bytes": len(blob), "sign_checksum": sign_digest(signs)})


def _magnitude_budget(module: nn.Module, sign_tensors: dict, config: SignLockConfig) -> float | None:
    """What a layer may spend on magnitudes once its signs, bias and record are paid."""
    if config.bits_per_weight is None:
        return None
    bias_bits = 0 if module.bias is None else module.bias.numel() * module.bias.element_size() * 8
    sign_bits = 8 * sum(t.numel() for t in sign_tensors.values())
    return config.bits_per_weight * module.weight.numel() - sign_bits - bias_bits - RECORD_BITS


@torch.no_grad()
def quantize_model(model: nn.Module, config: SignLockConfig) -> nn.Module:
    """Compress the target layers of ``model`` in place; returns the model.

    Signs first (their cost sets each layer's magnitude budget), then the codec plans every layer's parameters at
    once (a shared codebook is fitted over all layers), then each layer is encoded and swapped in."""
    config.check_seed()
    modules = find_target_modules(model, config.target_modules)
    weights = {f"{name}.weight": module.weight.detach().cpu() for name, module in modules.items()}
    signs = {name: _sign_tensors(name, weight, config) for name, weight in weights.items()}
    codec = make_codec(config.codec, config.codec_params)
    plan = codec.plan({name: (tuple(weight.shape), _magnitude_budget(modules[name.removesuffix(".weight")],
                                                                     signs[name][0], config))
                       for name, weight in weights.items()})
    encoded = codec.encode_all({name: (lambda w=weight: w.abs()) for name, weight in weights.items()}, plan)
    config.layers = {}
    layers = []
    for param_name, weight in weights.items():
        module_name = param_name.removesuffix(".weight")
        module = modules[module_name]
        sign_tensors, sign_record = signs[param_name]
        record = {"shape": list(weight.shape), "layout": _layout(module),
                  "dtype": str(weight.dtype).removeprefix("torch."), "bias": module.bias is not None,
                  "codec_params": plan[param_name], **sign_record}
        layer = SignLockLinear(param_name, record, config, device="cpu")
        layer.write_stored({**encoded.pop(param_name), **sign_tensors})
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach().cpu().clone(), requires_grad=False)
        record["stored_checksum"] = payload_digest(layer.payload)
        config.layers[param_name] = record
        layers.append(layer.to(module.weight.device))
        model.set_submodule(module_name, layers[-1])
    link_shared_tables(layers)
    from .quantizer import SignLockHfQuantizer

    model.config.quantization_config = config
    model.hf_quantizer = SignLockHfQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = config.quant_method
    from .hub import attach_push_to_hub

    attach_push_to_hub(model)  # push_to_hub uploads bpw.json and the SignLock model card with the weights
    return model


def dense_module(layer: SignLockLinear, weight: torch.Tensor) -> nn.Module:
    """The plain module a compressed layer stands for, holding ``weight``."""
    # Built empty, without the random init their constructors run (that was a tenth of the load time).
    cls = nn.Linear if layer.layout == "linear" else Conv1D
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    if layer.layout == "linear":
        module.in_features, module.out_features = layer.in_features, layer.out_features
    else:
        module.nx, module.nf = layer.in_features, layer.out_features
    module.register_parameter("bias", None)
    module.weight = nn.Parameter(weight, requires_grad=True)
    if layer.bias is not None:
        module.bias = nn.Parameter(layer.bias.detach(), requires_grad=True)
    return module


def signs_of_run(run_dir: str | os.PathLike) -> dict:
    """Seed and sign source of a training run, from its ``signlock_stats.json``; ``packed`` signs (with the reason)
    when the run was not trained from our seeded init."""
    path = Path(run_dir, STATS_NAME)
    if not path.exists():
        return {"sign_source": "packed", "why": f"{path} is missing: not a SignLockTrainer run"}
    stats = json.loads(path.read_text())
    if stats.get("reference_mode") != "seed":
        return {"sign_source": "packed", "why": "the run fine-tuned from captured signs, not from a seeded init"}
    modules = [name.removesuffix(".weight") for name in stats.get("target_modules", [])]
    return {"sign_source": stats.get("sign_source", "seed"), "seed": stats["seed"],
            "template_rank": stats.get("template_rank", 8), "target_modules": modules or None}


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, codec: str = "exact",
               codec_params: dict | None = None, bits_per_weight: float | None = None, sign_source: str | None = None,
               dequantize: bool = True, refine_steps: int = 0, refine_learning_rate: float = 3e-3,
               refine_loss: str = "lm", data_args=None) -> dict:
    """Compress a trained model folder into ``out_dir`` (model, tokenizer, ``bpw.json``); returns the bpw report."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    signs = signs_of_run(run_dir)
    if signs["sign_source"] == "packed":
        logger.warning(f"Exporting {run_dir} with packed signs (1 bit per weight): {signs['why']}.")
    config = SignLockConfig(
        seed=signs.get("seed"), sign_source=sign_source or signs["sign_source"],
        template_rank=signs.get("template_rank", 8), target_modules=signs.get("target_modules"), codec=codec,
        codec_params=codec_params, bits_per_weight=bits_per_weight, dequantize=dequantize,
    )
    if refine_loss not in ("lm", "teacher"):
        raise SignLockConfigError(f"`refine_loss` must be 'lm' or 'teacher' (the dense model), got {refine_loss!r}.")
    model = AutoModelForCausalLM.from_pretrained(run_dir)
    quantize_model(model, config)
    refinement = None
    if refine_steps > 0:
        teacher = AutoModelForCausalLM.from_pretrained(run_dir) if refine_loss == "teacher" else None
        refinement = _refine_on_run_data(model, run_dir, refine_steps, refine_learning_rate, data_args, teacher)
    model.save_pretrained(out_dir)
    try:
        AutoTokenizer.from_pretrained(run_dir).save_pretrained(out_dir)
    except (OSError, ValueError):
        logger.warning(f"{run_dir} has no tokenizer; exporting the model alone.")
    if Path(run_dir, STATS_NAME).exists():  # the card and `evaluate` read the training run's figures from here
        shutil.copy(Path(run_dir, STATS_NAME), Path(out_dir, "training_" + STATS_NAME))
    report = write_bpw(model, out_dir)
    if refinement is not None:
        report["refinement"] = refinement
        Path(out_dir, "bpw.json").write_text(json.dumps(report, indent=2))
    return report


def _refine_on_run_data(model, run_dir, steps: int, learning_rate: float, data_args=None, teacher=None) -> dict:
    """Refine on the training split of the data the run was trained on (see ``evaluate.data_arguments_of``)."""
    from transformers import AutoTokenizer

    from .data import build_lm_datasets, load_raw_datasets
    from .evaluate import data_arguments_of
    from .refine import refine

    data_args = data_args or data_arguments_of(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    train = build_lm_datasets(load_raw_datasets(data_args), tokenizer, data_args)["train"]
    return refine(model, train, steps, learning_rate, teacher=teacher)

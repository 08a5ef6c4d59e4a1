"""``quantize_model``: replace a model's target layers by compressed modules, as a ``SignLockConfig`` says.

Signs first: the trained weight's sign (zero counts as +1) is stored as the flips against the seeded reference or
the base model's signs (``base_signs.py``), or as packed bits. The budget pays every layer's signs, bias and share
of the checkpoint's SignLock overhead (estimated from above, so the written checkpoint stays within the budget); the
bits left are the magnitudes', the same number per weight in every layer. Then the codec plans every layer's
parameters at once (a shared codebook is fitted over all layers) and each layer is encoded and swapped in:
``SignLockLinear`` for projections and an untied head, ``SignLockEmbedding`` for the token embedding (a head tied to
it becomes its ``SignLockTiedHead``). The config becomes ``model.config.quantization_config``, so ``save_pretrained`` / ``push_to_hub`` write a checkpoint that
``from_pretrained`` loads back.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from ..errors import BudgetError, SignLockConfigError
from ..signs import pack_signs, reference_signs, unpack_signs
from ..targets import find_target_modules, tied_head
from .base_signs import base_layer_bits, check_base_signs
from .bits import header_entry_bytes, signlock_overhead_bytes
from .codecs import make_codec
from .compressed import link_shared_tables
from .config import SignLockConfig
from .format.flip_coding import encode_flips
from .layers import compressed_like, install
from .linear import layout_of
from .format.payload import CHECKSUM_BYTES, bits_digest, payload_digest
from .format.records import encoded_size

logger = logging.get_logger(__name__)
_HIGH_FLIP_RATE = 0.4  # a larger share of the target weights with packed signs: not trained from this seed


def flip_positions(trained_signs: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Flat positions where ``trained_signs`` differ from ``reference`` (sorted)."""
    return torch.nonzero((trained_signs != reference).reshape(-1)).reshape(-1).numpy()


def _sign_tensors(param_name: str, weight: torch.Tensor, config: SignLockConfig) -> tuple[dict, dict]:
    """The tensors that store the signs of ``weight`` (coded flips, or packed bits) and their record fields. Coded
    flips that would take as many bytes as packed signs (a tensor not trained from the seed, such as an LM head left
    out of the drift) are stored as packed signs instead."""
    signs = torch.where(weight >= 0, 1, -1).to(torch.int8)
    bits = pack_signs(signs)
    checksum = bits_digest(bits)
    packed = {"sign_bits": bits}, {"flip_bytes": 0, "flips": None, "sign_checksum": checksum, "packed_signs": True}
    if config.sign_source == "packed":
        return packed
    if config.sign_source == "base":  # the base's signs, read and checked once per export (quantize_model)
        reference = unpack_signs(base_layer_bits(config, param_name, tuple(weight.shape)), weight.shape)
    else:
        reference = reference_signs(config.seed, param_name, weight.shape, config.sign_source, config.template_rank)
    positions = flip_positions(signs, reference)
    blob = encode_flips(positions, weight.numel()) if len(positions) else b""  # no flips: no stream at all
    if len(blob) >= math.ceil(weight.numel() / 8):
        return packed
    stream = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.empty(0, dtype=torch.uint8)
    return {"flips": stream}, {"flips": len(positions), "flip_bytes": len(blob), "sign_checksum": checksum}


def layer_overhead_bits(targets: dict[str, nn.Module], config: SignLockConfig, flip_bytes: dict[str, int],
                   model_bytes: int) -> dict[str, float]:
    """An upper estimate of what each layer adds to the checkpoint besides its payload data and bias data: its
    header entries, its record and its share of the export's overhead (see ``bits.py``, which counts them exactly
    once written). Offsets are taken with as many digits as the dense model's size has."""
    digits = len(str(model_bytes))
    offset = 10 ** (digits - 1)
    codec = make_codec(config.codec, config.codec_params)
    draft = {**config.to_dict(), "layers": "", "targets_checksum": "0" * 2 * CHECKSUM_BYTES, "dtype": "bfloat16",
             "config_checksum": "0" * 2 * CHECKSUM_BYTES}
    names = [f"{name}.weight" for name in targets]
    shared = signlock_overhead_bytes(draft, digits)
    total = sum(module.weight.numel() for module in targets.values())
    largest_params = {"bits": 8, "group": 1 << 20, "row_scales": "layer", "shared": 1, "codebook_owner": 1}
    overhead = {}
    for name, module in zip(names, targets.values()):
        prefix = name.removesuffix("weight")
        record = {"flip_bytes": flip_bytes[name], "codec_params": {k: v for k, v in largest_params.items()
                                                                    if k in codec.stored_params},
                  "stored_checksum": "0" * 16, "sign_checksum": "0" * 16}
        entries = header_entry_bytes(prefix + "weight", "U8", [model_bytes], offset, offset)  # payload_key
        if getattr(module, "bias", None) is not None:
            entries += header_entry_bytes(prefix + "bias", "F32", list(module.bias.shape), offset, offset)
        overhead[name] = 8 * (entries + math.ceil(encoded_size(record, codec)) + 1
                              + shared * module.weight.numel() / total)
    return overhead


def _bias_bits(module: nn.Module) -> int:
    bias = getattr(module, "bias", None)  # an nn.Embedding has none
    return 0 if bias is None else bias.numel() * bias.element_size() * 8


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as they are now (an upper bound of its compressed size)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def check_budget_is_possible(targets: dict[str, nn.Module], config: SignLockConfig) -> None:
    """Refuse, before any weight is read, a budget that packed signs alone exceed (1 bit per weight plus the bias
    and the layer's overhead). Seeded signs cost what the flips cost: known only once the weights are."""
    budget = config.budget
    if budget is None or config.sign_source != "packed":
        return
    need = max((8 * math.ceil(module.weight.numel() / 8) + _bias_bits(module)) / module.weight.numel()
               for module in targets.values())
    if budget <= need:
        raise BudgetError(
            f"bits_per_weight={budget} cannot hold packed signs: they alone take 1 bit per weight ({need:.3f} with "
            "the bias). Raise bits_per_weight above 1 (e.g. 1.5), or store the signs as coded flips against a seed: "
            "sign_source='seed' for a model trained from hf_signlock's seeded init."
        )


@contextlib.contextmanager
def _progress_bar(**kwargs):
    """A tqdm bar closed when the block ends; on an error (a budget that does not fit) it is cleared first, so that
    the error prints on a line of its own instead of after a half-drawn bar."""
    bar = logging.tqdm(**kwargs)
    try:
        yield bar
    except BaseException:
        bar.leave = False
        bar.close()
        raise
    bar.close()


@torch.no_grad()
def quantize_model(model: nn.Module, config: SignLockConfig, hessians: dict[str, torch.Tensor] | None = None
                   ) -> nn.Module:
    """Compress the target layers of ``model`` in place; returns the model. ``hessians`` (``param_name -> H``,
    from ``calibration.collect_hessians``) let a calibrated codec (``signmag``) code with error feedback."""
    config.check_seed()
    targets = find_target_modules(model, config.target_modules, config.target_embeddings)
    tied = config.target_embeddings and tied_head(model)  # read before the embedding is replaced
    check_budget_is_possible(targets, config)
    dtypes = {module.weight.dtype for module in targets.values()}
    if len(dtypes) != 1:
        raise SignLockConfigError(f"The target layers hold weights of several dtypes {sorted(map(str, dtypes))}; "
                                  "cast the model to one dtype (model.to(torch.float32)) before quantizing it.")
    config.dtype = str(dtypes.pop()).removeprefix("torch.")
    weights = {f"{name}.weight": module.weight.detach().cpu() for name, module in targets.items()}
    if config.sign_source == "base":  # same targets and shapes as the base; its checksum goes into the config
        check_base_signs(config, {name: tuple(weight.shape) for name, weight in weights.items()}, exporting=True)
    with _progress_bar(total=2 * len(weights), desc="SignLock: signs and codes", unit="layer") as progress:
        signs = {}
        for name, weight in weights.items():
            signs[name] = _sign_tensors(name, weight, config)
            progress.update()
        _warn_if_not_seeded(signs, weights, config)
        modules = {f"{name}.weight": module for name, module in targets.items()}
        budget = config.budget
        budgets = {name: None for name in weights}
        if budget is not None:
            overhead = layer_overhead_bits(targets, config, {n: s[1]["flip_bytes"] for n, s in signs.items()},
                                           model_bytes(model))
            # Signs, biases and overhead are paid first, layer by layer; the bits left are shared by all the weights
            # alike, so a layer whose signs cost more (packed) takes them from the whole budget, not from its
            # magnitudes.
            fixed = sum(8 * sum(t.numel() for t in signs[name][0].values()) + _bias_bits(modules[name])
                        + overhead[name] for name in weights)
            total = sum(weight.numel() for weight in weights.values())
            per_weight = (budget * total - fixed) / total
            budgets = {name: per_weight * weight.numel() for name, weight in weights.items()}
        codec = make_codec(config.codec, config.codec_params)
        plan = codec.plan({name: (tuple(weight.shape), budgets[name]) for name, weight in weights.items()})

        def encoded_one_by_one(names):
            for name in names:
                yield name
                progress.update()

        if hessians is not None and codec.calibrated:
            encoded = _encode_calibrated(codec, weights, modules, plan, hessians, encoded_one_by_one)
        else:
            encoded = codec.encode_all({name: (lambda w=weight: w.abs()) for name, weight in weights.items()}, plan,
                                       progress=encoded_one_by_one)
    records, layers = {}, {}
    for (module_name, module), (param_name, weight) in zip(targets.items(), weights.items()):
        sign_tensors, sign_record = signs.pop(param_name)
        record = {"codec_params": plan[param_name], **sign_record}
        layer = compressed_like(module, param_name, record, config, device="cpu")
        layer.write_stored({**encoded.pop(param_name), **sign_tensors})
        if getattr(module, "bias", None) is not None:
            layer.bias = nn.Parameter(module.bias.detach().cpu().clone(), requires_grad=False)
        record["stored_checksum"] = payload_digest(layer.payload)
        records[param_name] = record
        layers[module_name] = layer.to(module.weight.device)
    install(model, layers, tied)
    link_shared_tables(layers.values())
    config.set_layer_records(records, {layer.param_name: layer.shape for layer in layers.values()})
    _mark_quantized(model, config)
    return model


def _encode_calibrated(codec, weights: dict, modules: dict, plan: dict, hessians: dict, progress) -> dict:
    """Encode every layer with its input Hessian, its signs held (zero counts as +1, as the stored signs)."""
    encoded, skipped = {}, []
    for name in progress(plan):
        weight = weights[name]
        layout = layout_of(modules[name])
        hessian = hessians.get(name) if layout != "conv1d" else None
        # Groups run along the stored rows' last dim: a Conv1D's outputs, not its inputs. An untied embedding's
        # input is one token: its Hessian is diagonal over rows, and rounding each row is what it asks for.
        if hessian is None and layout != "embedding":
            skipped.append(name)
        encoded[name] = codec.encode_with_hessian(weight, torch.where(weight >= 0, 1.0, -1.0), hessian, plan[name])
    if skipped:
        logger.warning(f"{len(skipped)} layers were coded without calibration (Conv1D layers, or no Hessian "
                       f"collected), e.g. {skipped[0]}.")
    return encoded


def _warn_if_not_seeded(signs: dict, weights: dict, config: SignLockConfig) -> None:
    """Say which layers store packed signs because their flips would cost more; warn when most weights do (the
    model was not trained from this seed or base)."""
    if config.sign_source == "packed":
        return
    packed = [name for name, (_, record) in signs.items() if record.get("packed_signs")]
    if not packed:
        return
    share = sum(weights[name].numel() for name in packed) / sum(weight.numel() for weight in weights.values())
    logger.info(f"{len(packed)} layers store packed signs, 1 bit each (their signs differ from the reference too "
                f"often for coded flips to be cheaper): {', '.join(packed[:4])}{' ...' if len(packed) > 4 else ''}")
    if share <= _HIGH_FLIP_RATE:
        return
    if config.sign_source == "base":
        logger.warning(
            f"{share:.1%} of the target weights disagree with the signs of the base model {config.base_model!r} so "
            "often that they store packed signs: this model was not fine-tuned from it. Name the model it started "
            "from as base_model, or use sign_source='packed'."
        )
    else:
        logger.warning(
            f"{share:.1%} of the target weights disagree with the signs of seed {config.seed} so often that they store "
            "packed signs: this model was not trained from that seed. Use the run's sign_seed, or "
            "sign_source='packed'."
        )


def _mark_quantized(model: nn.Module, config: SignLockConfig) -> None:
    """What ``from_pretrained`` would have set on a model loaded from the checkpoint."""
    # Imported here: importing transformers' registry registers our quantizer, which imports this module.
    from transformers.quantizers.auto import AutoHfQuantizer

    model.config.quantization_config = config
    model.hf_quantizer = AutoHfQuantizer.from_config(config, pre_quantized=True)  # ours, by quant_method
    model.is_quantized = True
    model.quantization_method = config.quant_method
    if hasattr(model, "add_model_tags"):
        model.add_model_tags(["hf-signlock", "signlock"])

"""The compressed modules of a model: building the stand-in of a target module, finding them, turning them dense.

``compressed_like`` picks the module kind a target needs (``SignLockEmbedding`` for the token embedding,
``SignLockLinear`` for projections and an untied head); ``compressed_layers`` lists a model's compressed weights;
``install`` swaps them in (a head tied to a compressed embedding becomes its ``SignLockTiedHead``), and
``dequantize_layers`` swaps dense modules back (a tied head shares the dense embedding's weight again).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CorruptCheckpointError, SignLockError
from .compressed import CompressedWeight
from .embedding import SignLockEmbedding, SignLockTiedHead, retie, untie_for_compression
from .linear import SignLockLinear


def compressed_like(module: nn.Module, param_name: str, record: dict, config, device="meta") -> CompressedWeight:
    """The compressed stand-in of the dense target ``module``; a record that cannot describe it (parameters out of
    range for the codec or the shape) is a ``CorruptCheckpointError`` naming the layer."""
    kind = SignLockEmbedding if isinstance(module, nn.Embedding) else SignLockLinear
    try:
        return kind.like(module, param_name, record, config, device)
    except SignLockError:
        raise
    except (KeyError, ValueError, TypeError, OverflowError, IndexError, RuntimeError) as error:
        raise CorruptCheckpointError(f"{param_name}: its record ({record.get('codec_params')}) does not describe a "
                                     f"{config.codec} layer of shape {list(module.weight.shape)} ({error!r})") from None


def compressed_layers(model: nn.Module) -> dict[str, CompressedWeight]:
    """``module_name -> CompressedWeight`` of ``model``, in model order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, CompressedWeight)}


def _replace(modules: dict[str, nn.Module], name: str, module: nn.Module) -> None:
    """``model.set_submodule(name, module)`` through a ``named_modules()`` map made once, not a walk per layer."""
    parent, _, child = name.rpartition(".")
    setattr(modules[parent], child, module)


def install(model: nn.Module, layers: dict[str, CompressedWeight], tied: bool) -> None:
    """Put ``layers`` (``module_name -> layer``) in place of the dense targets; with ``tied`` (the model's head
    shares the embedding's weight) the head becomes the compressed embedding's ``SignLockTiedHead``."""
    modules = dict(model.named_modules())
    for name, layer in layers.items():
        _replace(modules, name, layer)
    if tied:
        embedding = next(layer for layer in layers.values() if isinstance(layer, SignLockEmbedding))
        untie_for_compression(model, embedding)


def check_payloads(layers) -> None:
    """Every layer's payload against its checksum, before any is decoded (one thread: XXH3 hashes SmolLM2-135M's
    43 MB in ~7 ms, where a thread pool measured ~11)."""
    for layer in layers:
        layer.check_payload()


def dequantize_layers(model: nn.Module, dtype: torch.dtype | None = None, verify: bool = True) -> nn.Module:
    """Replace every compressed layer of ``model`` by its dense module (every layer checked before any is used); a
    head tied to a compressed embedding is tied to the dense one."""
    modules = dict(model.named_modules())
    layers = compressed_layers(model)
    if verify:
        check_payloads(layers.values())
    # Each layer's signs checked just before it decodes, not all first: its payload is then still in cache
    # (measured ~10 ms of a 0.23 s SmolLM2 load); nothing is installed before every layer has passed.
    dense = {name: layer.dense(layer.verify(payload_checked=True) if verify else None, dtype)
             for name, layer in layers.items()}
    if verify:  # finite tables can still overflow the dtype they decode into (crafted scales)
        for name, module in dense.items():
            if not torch.isfinite(module.weight).all():
                raise CorruptCheckpointError(f"{layers[name].param_name}: decodes to NaN or infinite weights in "
                                             f"{module.weight.dtype}; the stored tables are corrupted or edited")
    heads = [module for module in modules.values() if isinstance(module, SignLockTiedHead)]
    for name, module in dense.items():
        _replace(modules, name, module)
    for head in heads:
        embedding_name = next(name for name, layer in layers.items() if layer is head.embedding)
        retie(model, head, dense[embedding_name])
    return model

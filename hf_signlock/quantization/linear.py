"""``SignLockLinear``: a compressed ``nn.Linear`` or GPT-2 ``Conv1D`` (a block projection, or an untied LM head).

It stands in for the dense module (weight stored ``[out, in]``, or ``[in, out]`` for ``Conv1D``): the stored shape
and positions are the original parameter's. What it stores, decodes and checks is ``CompressedWeight``'s.

The forward pass decodes the weight once, multiplies, and lets it go: nothing weight-sized is kept for the backward
pass, which decodes again (the base weight is frozen; only the input's gradient needs it). Training LoRA adapters on
top (``hf_signlock.quantization.lora``) thus holds one layer's dense weight at a time, not the model's.

Plain PEFT takes these layers as it takes bitsandbytes' or GPTQ's: importing this module (which loading a compressed
model does) hooks PEFT's LoRA layer factory, ``LoraModel._create_new_module``, so that a ``SignLockLinear`` gets a
``SignLockLoraLinear`` and ``target_modules="all-linear"`` counts it, with nothing asked of the user. PEFT has no
registry for that (its dispatchers are a fixed list, and the only extension point, ``LoraConfig``'s custom modules,
is per config and not saved with an adapter). The hook is set at once when PEFT's module is imported, else right
after it is (an import hook on that one module), so that loading a model never imports PEFT.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..kernels import matmul as kernel_matmul
from .compressed import CompressedWeight, link_shared_tables

__all__ = ["SignLockLinear", "apply_weight", "decoded_matmul", "hook_peft_lora", "layout_of", "link_shared_tables"]


def layout_of(module: nn.Module) -> str:
    """"conv1d" for GPT-2's ``Conv1D`` (weight ``[in, out]``), "embedding" for ``nn.Embedding`` (``[vocab, dim]``),
    "linear" for ``nn.Linear`` (weight ``[out, in]``)."""
    if isinstance(module, Conv1D):
        return "conv1d"
    return "embedding" if isinstance(module, nn.Embedding) else "linear"


def apply_weight(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layout: str) -> torch.Tensor:
    """The dense module's arithmetic with ``weight``: ``x W^T + b`` (``[out, in]``) or ``x W + b`` (Conv1D)."""
    bias = None if bias is None else bias.to(x.dtype)
    if layout != "conv1d":
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, weight.shape[0])  # as Conv1D computes it (addmm), so exact codecs match bit for bit
    out = flat @ weight if bias is None else torch.addmm(bias, flat, weight)
    return out.view(*x.shape[:-1], weight.shape[1])


def _forward(x: torch.Tensor, layer: CompressedWeight, bias: torch.Tensor | None, layout: str) -> torch.Tensor:
    """The product without autograd: the compressed-domain kernels where they apply, else decode and multiply."""
    operands = layer.kernel_operands() if x.is_cpu else None
    if operands is None:
        return apply_weight(x, layer.decoded(x.dtype, x.device), bias, layout)
    y = kernel_matmul.linear(x, operands)
    return y if bias is None else y + bias.to(y.dtype)


class _DecodedMatmul(torch.autograd.Function):
    """``x W^T + b`` (Linear) or ``x W + b`` (Conv1D), W read from its stored form in forward (the kernels) and
    decoded in backward, never saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: CompressedWeight, layout: str) -> torch.Tensor:
        ctx.layer, ctx.layout = layer, layout
        return _forward(x, layer, bias, layout)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        layer = ctx.layer
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = layer.decoded(grad_out.dtype, grad_out.device)
            grad_x = grad_out @ (weight if ctx.layout != "conv1d" else weight.T)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None, None


def decoded_matmul(x: torch.Tensor, layer: CompressedWeight, bias: torch.Tensor | None, layout: str) -> torch.Tensor:
    """``layer``'s weight applied to ``x`` as a ``layout`` module would (decoded in forward and backward)."""
    if layer.pinned_signs is not None:  # refinement: the tables are trained through the decoded weight
        return apply_weight(x, layer.decode_weight(dtype=x.dtype).to(x.device), bias, layout)
    if not torch.is_grad_enabled() or not (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _forward(x, layer, bias, layout)  # inference: no autograd node (and nothing torch.compile must trace)
    return _DecodedMatmul.apply(x, bias, layer, layout)


class SignLockLinear(CompressedWeight):
    """A compressed ``nn.Linear`` / ``Conv1D``: one ``payload`` byte tensor (tables, codes, coded flips) and the bias.
    The arguments are ``CompressedWeight``'s."""

    def __init__(self, param_name: str, record: dict, config, shape: tuple[int, int], layout: str, has_bias: bool,
                 dtype: torch.dtype = torch.float32, device="meta"):
        super().__init__(param_name, record, config, shape, layout, has_bias, dtype, device)
        self.in_features, self.out_features = self.shape[::-1] if layout == "linear" else self.shape

    @classmethod
    def like(cls, module: nn.Module, param_name: str, record: dict, config, device="meta") -> SignLockLinear:
        """The compressed stand-in of the dense ``module`` (meta or real), its shape, layout, bias and dtype."""
        return cls(param_name, record, config, tuple(module.weight.shape), layout_of(module),
                   module.bias is not None, module.weight.dtype, device)

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The dense module's arithmetic with ``weight``."""
        return apply_weight(x, weight, bias, self.layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # _parameters, not self.bias: nn.Module's attribute fallback costs ~0.8 us, a tenth of a small layer's call
        return decoded_matmul(x, self, self._parameters["bias"], self.layout)

    def dense(self, sign_bits: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        """The plain ``nn.Linear`` / ``Conv1D`` this layer stands for, holding its decoded weight."""
        # Built empty, without the random init their constructors run (that was a tenth of the load time).
        dtype = dtype or self.dtype
        weight = self.decode_weight(sign_bits, dtype)
        cls = nn.Linear if self.layout == "linear" else Conv1D
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        if self.layout == "linear":
            module.in_features, module.out_features = self.in_features, self.out_features
        else:
            module.nx, module.nf = self.in_features, self.out_features
        module.weight = nn.Parameter(weight, requires_grad=True)
        module.register_parameter("bias", None)
        if self.bias is not None:
            module.bias = nn.Parameter(self.bias.detach().to(dtype), requires_grad=True)
        return module

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout}, "
                f"signs={self.sign_source}, codec={self.config.codec}, dtype={self.dtype}")


# --- plain PEFT: LoRA layers for SignLockLinear without the user's help -------------------------------------------

PEFT_LORA_MODULE = "peft.tuners.lora.model"  # defines LoraModel, whose _create_new_module picks each layer's LoRA kind
LORA_MODULE = "hf_signlock.quantization.lora"


def _hook_lora_model(module) -> None:
    """Route ``module.LoraModel``'s layer creation and its "all-linear" expansion through ``LORA_MODULE`` (once).

    The wrappers import ``LORA_MODULE`` when PEFT calls them, not now: this may run while PEFT is still importing."""
    model_cls = getattr(module, "LoraModel", None)
    create = getattr(model_cls, "_create_new_module", None)
    if create is None or getattr(create, "_signlock_hook", False):  # another PEFT, or hooked already
        return

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        new_module = importlib.import_module(LORA_MODULE).dispatch_compressed(lora_config, adapter_name, target,
                                                                              **kwargs)
        return create(lora_config, adapter_name, target, **kwargs) if new_module is None else new_module

    _create_new_module._signlock_hook = True
    model_cls._create_new_module = staticmethod(_create_new_module)

    prepare = getattr(model_cls, "_prepare_adapter_config", None)
    if prepare is not None:  # called before PEFT expands "all-linear", which matches nn.Linear / Conv1D only

        def _prepare_adapter_config(self, peft_config, model_config):
            peft_config = prepare(self, peft_config, model_config)
            importlib.import_module(LORA_MODULE).include_compressed_in_all_linear(peft_config, self.model)
            return peft_config

        model_cls._prepare_adapter_config = _prepare_adapter_config


class _HookAfterExec(importlib.abc.Loader):
    """Runs the wrapped loader, then hooks the module it executed (and retires the finder)."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        for finder in [f for f in sys.meta_path if isinstance(f, _HookAfterPeftImport)]:
            sys.meta_path.remove(finder)
        _hook_lora_model(module)

    def __getattr__(self, name):  # get_source, get_code, ...: the real loader's
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)


class _HookAfterPeftImport(importlib.abc.MetaPathFinder):
    """Finds ``PEFT_LORA_MODULE`` through the other finders and hooks it once it has executed. It stays in place until
    then: ``importlib.util.find_spec`` alone (an availability check) finds the module without executing it."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != PEFT_LORA_MODULE:
            return None
        spec = next((found for finder in sys.meta_path if finder is not self and hasattr(finder, "find_spec")
                     for found in [finder.find_spec(fullname, path, target)] if found is not None), None)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _HookAfterExec(spec.loader)
        return spec


def hook_peft_lora() -> None:
    """Let plain PEFT put LoRA adapters on ``SignLockLinear`` layers: now if PEFT's LoRA model module is imported,
    else as soon as it is (idempotent; without PEFT installed, the finder just waits)."""
    module = sys.modules.get(PEFT_LORA_MODULE)
    if module is not None:
        _hook_lora_model(module)
    elif not any(isinstance(finder, _HookAfterPeftImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _HookAfterPeftImport())


hook_peft_lora()

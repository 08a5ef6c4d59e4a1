"""``SignLockLinear``: a compressed ``nn.Linear`` or GPT-2 ``Conv1D`` (a block projection, or an untied LM head).

It stands in for the dense module (weight stored ``[out, in]``, or ``[in, out]`` for ``Conv1D``): the stored shape
and positions are the original parameter's. What it stores, decodes and checks is ``CompressedWeight``'s.

The forward pass decodes the weight once, multiplies, and lets it go: nothing weight-sized is kept for the backward
pass, which decodes again (the base weight is frozen; only the input's gradient needs it). Training LoRA adapters on
top (``hf_signlock.quantization.lora``) thus holds one layer's dense weight at a time, not the model's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .compressed import CompressedWeight, link_shared_tables

__all__ = ["SignLockLinear", "apply_weight", "decoded_matmul", "layout_of", "link_shared_tables"]


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


class _DecodedMatmul(torch.autograd.Function):
    """``x W^T + b`` (Linear) or ``x W + b`` (Conv1D) with W decoded in forward and again in backward, never saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: CompressedWeight, layout: str) -> torch.Tensor:
        ctx.layer, ctx.layout = layer, layout
        return apply_weight(x, layer.decoded(x.dtype, x.device), bias, layout)

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
        return decoded_matmul(x, self, self.bias, self.layout)

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

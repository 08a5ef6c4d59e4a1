"""``SignLockEmbedding``: a compressed token embedding, and ``SignLockTiedHead``: an LM head that shares it.

The embedding stores its ``[vocab, dim]`` weight as every compressed target does (``CompressedWeight``), and a lookup
decodes only the rows it is asked for: the codes, scales and signs of those rows, not the whole table. Its signs
(regenerated from the seed, or a base's bits with the flips applied) are rebuilt once and kept bit-packed, 1 bit a
weight, so that a lookup does not decode the flip stream again.

A model whose LM head is tied to the embedding (SmolLM2, GPT-2) has one tensor for both: the embedding is the target,
and the head becomes ``SignLockTiedHead``, which multiplies by the embedding's decoded weight and stores nothing of
its own. transformers ties the two by the names in ``model.all_tied_weights_keys``; while the head is compressed that
tie is taken out (there is no ``weight`` parameter to tie), and dequantizing puts it back, so a dense model is tied
again and saves the tensor once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import matmul as kernel_matmul
from .compressed import CompressedWeight
from .linear import decoded_matmul


class SignLockEmbedding(CompressedWeight):
    """A compressed ``nn.Embedding``: lookups decode the rows they need. The arguments are ``CompressedWeight``'s,
    plus the embedding's ``padding_idx``."""

    def __init__(self, param_name: str, record: dict, config, shape: tuple[int, int], padding_idx: int | None = None,
                 dtype: torch.dtype = torch.float32, device="meta"):
        super().__init__(param_name, record, config, shape, "embedding", False, dtype, device)
        self.num_embeddings, self.embedding_dim = self.shape
        self.padding_idx = padding_idx

    @classmethod
    def like(cls, module: nn.Embedding, param_name: str, record: dict, config, device="meta") -> SignLockEmbedding:
        """The compressed stand-in of the dense ``module`` (meta or real)."""
        return cls(param_name, record, config, tuple(module.weight.shape), module.padding_idx, module.weight.dtype,
                   device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.pinned_signs is not None:  # refinement: the tables are trained through the decoded weight
            return F.embedding(input_ids, self.decode_weight(dtype=self.dtype), self.padding_idx)
        rows = input_ids.reshape(-1)
        compiling = torch.compiler.is_compiling()
        operands = self.kernel_operands() if compiling or kernel_matmul.compiled() else None
        if operands is not None:  # the kernels decode each row straight from the payload (and check the ids)
            decoded = kernel_matmul.gather_rows(operands, rows.cpu(), self.dtype)
        else:
            kernel_matmul.check_token_ids(rows, self.num_embeddings)
            decoded = self.codec.decode_rows(self.magnitude_tensors(), self.shape, self.codec_params,
                                             self.sign_bits(), rows.to(self.payload.device), self.dtype)
        return decoded.view(*input_ids.shape, self.embedding_dim).to(input_ids.device)

    def dense(self, sign_bits: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> nn.Embedding:
        """The plain ``nn.Embedding`` this layer stands for, holding its decoded weight."""
        module = nn.Embedding.__new__(nn.Embedding)  # built empty, without the random init of its constructor
        nn.Module.__init__(module)
        module.num_embeddings, module.embedding_dim, module.padding_idx = *self.shape, self.padding_idx
        module.max_norm, module.norm_type, module.scale_grad_by_freq, module.sparse = None, 2.0, False, False
        module.weight = nn.Parameter(self.decode_weight(sign_bits, dtype or self.dtype), requires_grad=True)
        return module

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, "
                f"signs={self.sign_source}, codec={self.config.codec}, dtype={self.dtype}")


class SignLockTiedHead(nn.Module):
    """An LM head tied to a compressed token embedding: ``logits = x E^T``, ``E`` decoded from the embedding's
    payload in forward (and again in backward), nothing stored here.

    Args:
        embedding: the model's ``SignLockEmbedding``.
        tied_keys: the model's ties to the embedding (``{"lm_head.weight": "model.embed_tokens.weight"}``), put back
            when the model is dequantized.
    """

    def __init__(self, embedding: SignLockEmbedding, tied_keys: dict[str, str]):
        super().__init__()
        self._embedding = (embedding,)  # a tuple, not a submodule: the embedding is stored once, under its own name
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        self.tied_keys = dict(tied_keys)

    @property
    def embedding(self) -> SignLockEmbedding:
        return self._embedding[0]

    @property
    def weight(self) -> torch.Tensor:
        """The embedding's decoded weight (see ``CompressedWeight.weight``)."""
        return self.embedding.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return decoded_matmul(x, self.embedding, None, "linear")

    def dense(self, embedding: nn.Embedding) -> nn.Linear:
        """A plain bias-free ``nn.Linear`` whose weight is ``embedding``'s (the same Parameter: tied)."""
        module = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(module)
        module.in_features, module.out_features = self.in_features, self.out_features
        module.weight = embedding.weight
        module.register_parameter("bias", None)
        return module

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to {self.embedding.param_name}"


def untie_for_compression(model: nn.Module, embedding: SignLockEmbedding) -> SignLockTiedHead:
    """Put a ``SignLockTiedHead`` in place of ``model``'s output embeddings (tied to the weight ``embedding`` now
    compresses) and take the tie out of ``model.all_tied_weights_keys``; returns the head."""
    ties = getattr(model, "all_tied_weights_keys", None) or {}
    tied = {target: source for target, source in ties.items() if source == embedding.param_name}
    head = SignLockTiedHead(embedding, tied)
    model.set_output_embeddings(head)
    model.all_tied_weights_keys = {k: v for k, v in ties.items() if k not in tied}
    return head


def retie(model: nn.Module, head: SignLockTiedHead, embedding: nn.Embedding) -> None:
    """Undo ``untie_for_compression`` once ``embedding`` is dense: a plain head sharing its weight, and the tie back
    in ``model.all_tied_weights_keys`` (so that ``save_pretrained`` writes the tensor once)."""
    model.set_output_embeddings(head.dense(embedding))
    model.all_tied_weights_keys = {**(getattr(model, "all_tied_weights_keys", None) or {}), **head.tied_keys}

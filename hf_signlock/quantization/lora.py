"""LoRA on compressed SignLock layers (the QLoRA habit): PEFT adapters train on top of frozen ``SignLockLinear``s.

Load the checkpoint with its layers kept compressed and use PEFT as for a bitsandbytes or GPTQ model: a plain
``peft.LoraConfig``, ``get_peft_model``, the ordinary ``transformers.Trainer``, ``save_pretrained``, and
``PeftModel.from_pretrained`` (or transformers' ``model.load_adapter``) to load the adapter back::

    import hf_signlock
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(repo, quantization_config=hf_signlock.SignLockConfig(dequantize=False))
    model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))  # or name them: ["q_proj", ...]
    ...  # Trainer(model=model, ...).train()
    model.save_pretrained(adapter_dir)  # the adapter weights only, as for any PEFT model
    model = PeftModel.from_pretrained(fresh_compressed_model, adapter_dir)  # is_trainable=True to go on training

PEFT picks each layer's LoRA kind from a fixed list of dispatchers; loading a compressed model hooks that choice
(``hf_signlock.quantization.linear.hook_peft_lora``) so that every targeted ``SignLockLinear`` gets a
``SignLockLoraLinear`` (``dispatch_compressed``), and "all-linear" counts ``SignLockLinear`` layers as the linear
layers they stand for, the LM head excepted as PEFT excepts it (``include_compressed_in_all_linear``).
``get_lora_config`` and ``register_lora_modules`` still map the layers explicitly, through PEFT's custom-module
hook, for code written against them.

Adapters are interchangeable with the dense model's: A and B have the same shapes, whatever the base layer stores.

Merging: a compressed payload cannot absorb an adapter. bitsandbytes and HQQ dequantize, add the delta and quantize
again (lossy); GPTQ and AQLM refuse. Here ``merge_adapter()`` (merging in place) is refused with a
``SignLockError`` that names the way out, and ``merge_and_unload()`` puts a plain ``nn.Linear`` / ``Conv1D`` holding
the decoded weight plus the adapters' delta in each layer's place (exact: nothing is re-quantized); ``unload()``
gives the compressed layers back. The merged model still carries the SignLock quantization config (it can no longer
be saved as a SignLock checkpoint): ``merged.dequantize()`` drops it, after which ``save_pretrained`` writes a plain
dense model.

Plain LoRA only: DoRA and the other variants, and initialisations that rewrite the base weight (PiSSA, OLoRA,
LoftQ, ...), raise ``SignLockConfigError``. The compressed token embedding and a head tied to it take no adapters
(``SignLockConfigError`` naming the module).

Memory: the base layer decodes its weight once in the forward pass and again in the backward pass and keeps nothing
weight-sized in between (``SignLockLinear``), so training holds one layer's dense weight at a time.

Without ``peft`` installed this module still imports; using it raises ``MissingDependencyError``.
"""

from __future__ import annotations

from typing import Any

import torch
from packaging.version import Version
from torch import nn

from ..errors import MissingDependencyError, SignLockConfigError, SignLockError
from .compressed import CompressedWeight
from .embedding import SignLockTiedHead
from .linear import SignLockLinear

PEFT_MIN_VERSION = "0.19"  # custom LoRA layers get the LoraConfig (and update_layer takes it) from 0.19 on

try:
    import peft  # the top-level package first: a blocked or missing peft fails here
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
except ImportError as error:
    _PEFT_IMPORT_ERROR: ImportError | None = error

    class LoraLayer:
        """Stand-in base so that this module imports without peft; building a layer raises."""

        def __init__(self, *args, **kwargs):
            _require_peft()
else:
    _PEFT_IMPORT_ERROR = None

# init_lora_weights values that only set up A and B: the others (PiSSA, OLoRA, LoftQ, ...) rewrite the base weight
_PLAIN_INITS = (True, False, "gaussian")


def _require_peft() -> None:
    if _PEFT_IMPORT_ERROR is not None:
        raise MissingDependencyError(
            'LoRA on SignLock layers needs the `peft` package: pip install "hf-signlock[peft]" '
            f"({_PEFT_IMPORT_ERROR})"
        ) from _PEFT_IMPORT_ERROR
    if Version(peft.__version__) < Version(PEFT_MIN_VERSION):
        raise MissingDependencyError(
            f"LoRA on SignLock layers needs peft>={PEFT_MIN_VERSION}, found {peft.__version__}: "
            'pip install -U "hf-signlock[peft]"'
        )


class SignLockLoraLinear(nn.Module, LoraLayer):
    """LoRA adapters on a compressed ``SignLockLinear`` (either layout): ``base(x) + sum B(A(dropout(x))) * scaling``
    over the active adapters. PEFT builds it for every targeted ``SignLockLinear`` (``dispatch_compressed``, or a
    config passed through ``register_lora_modules``).

    Args:
        base_layer: the ``SignLockLinear`` (frozen; its payload and bias never change).
        adapter_name: the adapter's name.
        config: the ``peft.LoraConfig``; plain LoRA only (no DoRA or other variants, no initialisation that
            rewrites the base weight).
        r, lora_alpha: the adapter's rank and alpha (PEFT passes them per layer, after rank/alpha patterns).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0, lora_alpha: int = 1,
                 **kwargs: Any) -> None:
        _require_peft()
        if config.init_lora_weights not in _PLAIN_INITS:
            raise SignLockConfigError(
                f"init_lora_weights={config.init_lora_weights!r} rewrites the base weight, which a SignLock layer "
                f"stores compressed and frozen; use one of {_PLAIN_INITS}."
            )
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = False  # the base layer knows its own layout; A and B are always nn.Linear
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        """Plain LoRA only: DoRA and the other variants read or rescale the base weight."""
        try:
            if getattr(config, "use_dora", False):  # peft < 0.21 lets a layer without variants ignore it silently
                raise ValueError("use_dora=True")
            return super().resolve_lora_variant(config=config, **kwargs)
        except ValueError as error:
            raise SignLockConfigError(
                f"SignLock layers take plain LoRA adapters only ({error}); turn off use_dora and the other LoRA "
                "variants in the LoraConfig."
            ) from error

    def _get_in_out_features(self, module: nn.Module):
        if isinstance(module, SignLockLinear):  # PEFT knows the type only by its attributes, and warns
            return module.in_features, module.out_features
        return super()._get_in_out_features(module)

    def _get_base_layer_device_and_dtype(self, base_layer):
        # PEFT reads `.weight` for these, which would decode the whole weight just to learn its device and dtype.
        if isinstance(base_layer, SignLockLinear):
            return base_layer.payload.device, base_layer.dtype
        return super()._get_base_layer_device_and_dtype(base_layer)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer's output plus each active adapter's (``adapter_names`` mixes adapters per sample)."""
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for active_adapter in self.active_adapters:
            if active_adapter not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[active_adapter], self.lora_B[active_adapter]
            # as PEFT's Linear: the input in the adapter's dtype, the sum back in the base layer's
            x = self._cast_input_dtype(x, lora_A.weight.dtype)
            result = result + lora_B(lora_A(self.lora_dropout[active_adapter](x))) * self.scaling[active_adapter]
        return result.to(result_dtype)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``scaling * B A`` of ``adapter``, in the base weight's stored layout (``[out, in]``, or ``[in, out]`` for
        Conv1D) and the adapter's dtype."""
        weight_A, weight_B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        dtype = weight_B.dtype
        if weight_B.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            weight_A, weight_B = weight_A.float(), weight_B.float()  # half matmuls are slow on many CPUs
        delta = (weight_B @ weight_A) * self.scaling[adapter]
        if self.get_base_layer().layout == "conv1d":
            delta = delta.T
        return delta.to(dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Refused: the base weight is stored compressed. ``merge_and_unload()`` gives a dense layer instead."""
        raise SignLockError(
            "A SignLock layer stores its weight compressed and cannot absorb a LoRA adapter in place; call "
            "merge_and_unload() for a dense model with the adapters merged, or keep the adapters unmerged."
        )

    def unmerge(self) -> None:
        """Nothing to undo: adapters are never merged into a compressed layer."""

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool,
                                           adapter_names: list[str] | None) -> nn.Module:
        """What ``unload()`` / ``merge_and_unload()`` put in this layer's place: the compressed base layer, or (with
        ``merge``) a plain ``nn.Linear`` / ``Conv1D`` holding the decoded weight plus the adapters' delta, in the
        base layer's dtype, frozen as the base was."""
        base = self.get_base_layer()
        if not merge:
            return base
        dense = base.dense()  # a fresh decoded weight: the adapters are added to it in place
        with torch.no_grad():
            for adapter in check_adapters_to_merge(self, adapter_names):
                if adapter not in self.lora_A:
                    continue
                delta = self.get_delta_weight(adapter).to(dense.weight)
                if safe_merge and not torch.isfinite(dense.weight + delta).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
                dense.weight.add_(delta)
                if self.lora_bias[adapter]:
                    if dense.bias is None:
                        dense.bias = nn.Parameter(dense.weight.new_zeros(base.out_features))
                    dense.bias.add_((self.lora_B[adapter].bias * self.scaling[adapter]).to(dense.bias))
        return dense.requires_grad_(False)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _base_layer(target: nn.Module) -> nn.Module:
    return target.get_base_layer() if isinstance(target, BaseTunerLayer) else target


def dispatch_compressed(lora_config: LoraConfig, adapter_name: str, target: nn.Module, **kwargs: Any) -> nn.Module | None:
    """PEFT's LoRA layer for ``target``, where it is compressed; None leaves the choice to PEFT's dispatchers.

    A ``SignLockLinear`` gets a ``SignLockLoraLinear``, unless the config's own custom modules claim it (those come
    first, as in PEFT). The compressed token embedding and a head tied to it are refused by name: PEFT would say
    only that their type "is not supported". Called by the hook on ``LoraModel._create_new_module`` with its
    arguments (``target_name``, ``r``, ``lora_alpha``, ...)."""
    base = _base_layer(target)
    if not isinstance(base, (CompressedWeight, SignLockTiedHead)) or kwargs.get("parameter_name") is not None:
        return None
    if any(isinstance(base, kind) for kind in (getattr(lora_config, "_custom_modules", None) or {})):
        return None
    if isinstance(base, SignLockLinear):
        _require_peft()
        return SignLockLoraLinear(target, adapter_name, config=lora_config, **kwargs)
    name = kwargs.get("target_name") or type(base).__name__
    raise SignLockConfigError(
        f"{name} is a compressed {'token embedding' if isinstance(base, CompressedWeight) else 'LM head tied to it'} "
        f"({type(base).__name__}), which takes no LoRA adapter; take it out of the LoraConfig's target_modules, or "
        "load the model with SignLockConfig(dequantize=True) for dense layers."
    )


def include_compressed_in_all_linear(config, model: nn.Module) -> None:
    """Expand ``target_modules="all-linear"`` in ``config`` (in place) as PEFT would for the dense model: its
    ``nn.Linear`` / ``Conv1D`` layers and the ``SignLockLinear`` layers standing for them, less the output embeddings
    and what lies inside adapter layers. PEFT's own expansion matches types, so it would miss every compressed layer.
    Nothing changes for other configs or for a model without ``SignLockLinear`` layers."""
    targets = getattr(config, "target_modules", None)
    if not (isinstance(targets, str) and targets.lower() == "all-linear"):
        return
    named = list(model.named_modules())
    if not any(isinstance(module, SignLockLinear) for _, module in named):
        return
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers  # private: imported only where needed

    _maybe_include_all_linear_layers(config, model)  # the dense ones, by PEFT's rules (it drops the head by identity)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tuner_prefixes = tuple(f"{name}." for name, module in named if isinstance(module, BaseTunerLayer))
    config.target_modules = set(config.target_modules) | {
        name for name, module in named
        if isinstance(module, SignLockLinear) and module is not head and not name.startswith(tuner_prefixes)
    }


def register_lora_modules(config: LoraConfig) -> LoraConfig:
    """Map ``SignLockLinear`` to ``SignLockLoraLinear`` in ``config`` (a ``peft.LoraConfig``), in place; returns it.

    Not needed since loading a compressed model hooks PEFT's dispatch (see the module's docstring); kept for code
    written against it, e.g. ``PeftModel.from_pretrained(model, path, config=register_lora_modules(
    LoraConfig.from_pretrained(path)))``."""
    _require_peft()
    if not isinstance(config, LoraConfig):
        raise SignLockConfigError(f"register_lora_modules takes a peft.LoraConfig, got {type(config).__name__}.")
    config._register_custom_module({SignLockLinear: SignLockLoraLinear})  # PEFT's (experimental) custom-layer hook
    return config


def get_lora_config(**lora_kwargs: Any) -> LoraConfig:
    """A ``peft.LoraConfig(**lora_kwargs)`` whose adapters wrap compressed ``SignLockLinear`` layers (as well as
    whatever dense layers it targets); a plain ``LoraConfig`` does as well once a compressed model is loaded."""
    _require_peft()
    return register_lora_modules(LoraConfig(**lora_kwargs))

"""LoRA on the Q-Former (through peft) and folding every LoRA adapter of a model back for export.

The LLM's LoRA lives in :class:`ibkit.models.language.LanguageModel` (peft ``get_peft_model``). The
Q-Former is a plain ``nn.Module`` without a transformers config, so its adapters are injected in place
with ``peft.inject_adapter_in_model``: the wrapped ``nn.Linear`` keeps working, its weight moves to
``<name>.base_layer.weight`` and the adapters appear as ``<name>.lora_A.default.weight`` /
``<name>.lora_B.default.weight``. The transformers layout has no adapters, so export goes through
:func:`merged_copy`, which folds them into the base weights of a copy and leaves the user's model as is.
"""

from __future__ import annotations

import copy
from typing import TypeVar

from torch import nn

from ibkit.models.language import LoraSettings

#: a model with a ``language_model`` (:class:`~ibkit.models.language.LanguageModel`) and a ``qformer``:
#: InstructBLIP, which imports its folder format, which imports this module (so no import of the class here)
ModelT = TypeVar("ModelT", bound=nn.Module)

#: The attention projections LoRA adapts by default (self- and cross-attention), as in the LoRA paper.
QFORMER_LORA_TARGETS = ["query", "value"]


def _tuner_layer_type() -> type:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer


def apply_qformer_lora(qformer: nn.Module, settings: LoraSettings | None = None, train_base: bool = False) -> nn.Module:
    """Inject LoRA adapters into the Q-Former's ``query``/``value`` Linear layers (in place).

    ``settings.target_modules`` picks other Linear names (``key``, ``dense``, ...). With ``train_base=False``
    (parameter-efficient tuning) only the adapters of the Q-Former train; ``train_base=True`` keeps the
    whole Q-Former trainable next to its adapters.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if has_lora(qformer):
        raise ValueError("the Q-Former already carries LoRA adapters; merge them first (merge_lora_modules)")
    settings = settings or LoraSettings()
    targets = list(settings.target_modules or QFORMER_LORA_TARGETS)
    names = {name.rsplit(".", 1)[-1] for name, m in qformer.named_modules() if isinstance(m, nn.Linear)}
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise ValueError(f"LoRA target_modules {unknown} name no Linear layer of the Q-Former; it has {sorted(names)}")
    base_trainable = {name for name, p in qformer.named_parameters() if p.requires_grad}
    config = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets, **settings.extra
    )
    inject_adapter_in_model(config, qformer)
    if train_base:  # peft freezes everything but the adapters; give back what trained before
        for name, p in qformer.named_parameters():
            if name.replace(".base_layer.", ".") in base_trainable:
                p.requires_grad_(True)
    return qformer


def has_lora(module: nn.Module) -> bool:
    """Whether any sub-module is a peft adapter layer (Q-Former LoRA) or a LoRA-wrapped LLM."""
    if getattr(module, "lora", None) is not None:  # LanguageModel with peft adapters
        return True
    tuner = _tuner_layer_type()
    return any(isinstance(m, tuner) for m in module.modules())


def merge_lora_modules(module: nn.Module) -> nn.Module:
    """Fold every injected adapter into its base layer and put the plain layer back (in place).

    Afterwards the parameter names are the original ones again (``...query.weight``).
    """
    tuner = _tuner_layer_type()
    wrapped = [(name, m) for name, m in module.named_modules() if isinstance(m, tuner)]
    for name, layer in wrapped:
        layer.merge()
        base = layer.get_base_layer()
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, base)
    return module


def _shallow_module_copy(module: nn.Module) -> nn.Module:
    """A new module object whose registries are new dicts (assignments on it never reach the original)."""
    out = copy.copy(module)
    out._modules = dict(module._modules)
    out._parameters = dict(module._parameters)
    out._buffers = dict(module._buffers)
    return out


def merged_copy(model: ModelT) -> ModelT:
    """``model`` with every LoRA adapter (LLM and Q-Former) folded in, for export.

    Only the parts that carry adapters are deep-copied; the rest is shared with ``model``, which keeps its
    adapters and weights untouched. Returns ``model`` itself when it has no adapters.
    """
    llm_lora = model.language_model.lora is not None
    qformer_lora = has_lora(model.qformer)
    if not (llm_lora or qformer_lora):
        return model
    out = _shallow_module_copy(model)
    if llm_lora:
        language_model = copy.deepcopy(model.language_model)
        language_model.merge_lora()
        out._modules["language_model"] = language_model
    if qformer_lora:
        out._modules["qformer"] = merge_lora_modules(copy.deepcopy(model.qformer))
    return out


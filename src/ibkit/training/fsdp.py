"""FSDP wrapping and activation checkpointing for InstructBLIP, as plain functions.

Wrapping units follow the model's blocks: EVA/open_clip/HF vision blocks, Q-Former layers and LLM
decoder/encoder blocks, then each component (vision encoder, Q-Former, LLM) for what is left over
(embeddings, final norms, heads). FSDP flattens each unit's parameters into one tensor, so a unit
must never mix frozen and trainable parameters (FSDP with ``use_orig_params=False`` refuses it, and
with ``True`` it keeps gradient memory for the frozen half) nor dtypes (a bf16 frozen LLM next to an
fp32 Q-Former). :func:`wrap_plan` guarantees both: when a module's leftover parameters would be
mixed (LoRA inside a frozen LLM block), its minority children become units of their own. BLIP-2's
stage-1 model (``Blip2Stage1``: the encoder and Q-Former, no LLM) gets the same plan without the LLM.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from ibkit.models.state import clean_name


def _kind(param: nn.Parameter) -> tuple[bool, torch.dtype]:
    return (bool(param.requires_grad), param.dtype)


def find_composed_model(root: nn.Module) -> nn.Module | None:
    """The ``InstructBLIP`` inside ``root`` (a LightningModule, a wrapper, or the model itself), or the
    ``Blip2Stage1`` of BLIP-2 pre-training: the same encoder and Q-Former, no LLM."""
    from ibkit.models.blip2 import Blip2Stage1
    from ibkit.models.instructblip import InstructBLIP

    for module in root.modules():
        if isinstance(module, (InstructBLIP, Blip2Stage1)):
            return module
    return None


def block_classes(model: nn.Module) -> dict[str, set[type[nn.Module]]]:
    """The transformer block classes of each component: ``{"vision": ..., "qformer": ..., "llm": ...}``."""
    from ibkit.models.qformer import QFormerLayer

    found = find_composed_model(model)
    if found is None:
        raise ValueError(
            f"no InstructBLIP or Blip2Stage1 inside {type(model).__name__}: cannot find its block classes"
        )
    vision = getattr(found.vision_encoder, "block_class", None)
    llm = getattr(found, "language_model", None)  # BLIP-2 stage 1 has none
    return {
        "vision": {vision} if vision is not None else set(),
        "qformer": {QFormerLayer},
        "llm": set(llm.block_classes) if llm is not None else set(),
    }


def wrap_plan(
    root: nn.Module, classes: Iterable[type[nn.Module]], components: Iterable[nn.Module] = ()
) -> list[nn.Module]:
    """Modules to wrap as FSDP units (``root`` itself is the outermost unit and is not listed).

    Blocks of ``classes`` and the ``components`` become units when they own parameters. Walking the
    tree bottom-up, whenever the parameters a module would keep (its own plus those of children that
    are not units) mix kinds ((requires_grad, dtype)), the children of the minority kind become units
    first. A module whose *own* parameters mix kinds cannot be split and raises ``ValueError``.
    """
    classes = tuple(classes)
    component_ids = {id(m) for m in components}
    names = {id(m): n for n, m in root.named_modules()}
    plan: list[nn.Module] = []
    seen: set[int] = set()  # parameters already assigned (tied weights belong to their first owner)

    def visit(module: nn.Module) -> list[nn.Parameter]:
        own = []
        for p in module._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                own.append(p)
        children = []
        for child in module.children():
            leftover = visit(child)
            if leftover:
                children.append((child, leftover))
        kept = own + [p for _, left in children for p in left]
        kinds = {_kind(p) for p in kept}
        if len(kinds) > 1:
            own_kinds = {_kind(p) for p in own}
            if len(own_kinds) > 1:
                where = names.get(id(module)) or type(module).__name__
                raise ValueError(
                    f"{where}: holds frozen/trainable (or different dtype) parameters directly; "
                    "no FSDP unit boundary can separate them"
                )
            if own_kinds:
                majority = own_kinds.pop()
            else:
                numel: dict[tuple[bool, torch.dtype], int] = {}
                for p in kept:
                    numel[_kind(p)] = numel.get(_kind(p), 0) + p.numel()
                majority = max(numel, key=numel.get)
            kept = list(own)
            for child, left in children:
                if _kind(left[0]) != majority:  # a child's leftover is uniform (invariant)
                    plan.append(child)
                else:
                    kept.extend(left)
        is_unit = isinstance(module, classes) or id(module) in component_ids
        if is_unit and kept and module is not root:
            plan.append(module)
            return []
        return kept

    visit(root)
    return plan


def instructblip_wrap_plan(root: nn.Module) -> list[nn.Module]:
    """:func:`wrap_plan` with the block classes and components of the InstructBLIP (or BLIP-2 stage-1
    model) inside ``root``."""
    model = find_composed_model(root)
    if model is None:
        raise ValueError(f"no InstructBLIP or Blip2Stage1 inside {type(root).__name__}")
    classes = set().union(*block_classes(root).values())
    components = (model.vision_encoder, model.qformer, getattr(model, "language_model", None))
    return wrap_plan(root, classes, components=tuple(c for c in components if c is not None))


def unit_parameters(root: nn.Module, plan: Iterable[nn.Module]) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Which parameters each unit would flatten (unit name -> [(param name, param)]); '' is the root.

    Mirrors FSDP: a parameter belongs to its innermost enclosing unit. Used to check a plan.
    """
    units = {id(m) for m in plan}
    out: dict[str, list[tuple[str, nn.Parameter]]] = {"": []}
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str, unit: str) -> None:
        for name, p in module._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                out.setdefault(unit, []).append((clean_name(prefix + name), p))
        for child_name, child in module.named_children():
            child_prefix = f"{prefix}{child_name}."
            walk(child, child_prefix, child_prefix.rstrip(".") if id(child) in units else unit)

    walk(root, "", "")
    return out


def policy_from_plan(plan: Iterable[nn.Module]) -> Callable[[nn.Module, bool, int], bool]:
    """An FSDP ``auto_wrap_policy`` callable that wraps exactly the modules of ``plan``."""
    ids = frozenset(id(m) for m in plan)

    def policy(module: nn.Module, recurse: bool, nonwrapped_numel: int = 0) -> bool:
        return True if recurse else id(module) in ids

    return policy


def instructblip_wrap_policy(root: nn.Module) -> Callable[[nn.Module, bool, int], bool]:
    return policy_from_plan(instructblip_wrap_plan(root))


def checkpointing_check_fn(classes: Iterable[type[nn.Module]]) -> Callable[[nn.Module], bool]:
    classes = tuple(classes)
    return lambda module: isinstance(module, classes)


class InstructBLIPFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP with ibkit's wrapping plan and activation checkpointing of the LLM blocks.

    The plan needs the built model, so it is made in ``_setup_model`` (after ``configure_model``).
    An explicit ``auto_wrap_policy`` / ``activation_checkpointing_policy`` still wins.
    """

    strategy_name = "ibkit_fsdp"

    def __init__(self, *args: Any, checkpoint_llm_blocks: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.checkpoint_llm_blocks = checkpoint_llm_blocks

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        already_wrapped = any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
        if not already_wrapped and "auto_wrap_policy" not in self.kwargs:
            self.kwargs["auto_wrap_policy"] = instructblip_wrap_policy(model)
        if self.checkpoint_llm_blocks and not self._activation_checkpointing_kwargs:
            llm_blocks = block_classes(model)["llm"]
            if llm_blocks:
                self._activation_checkpointing_kwargs = {"check_fn": checkpointing_check_fn(llm_blocks)}
        return super()._setup_model(model)


def refuse_fast_paths_under_fsdp(trainer: Any) -> None:
    """``fast_paths`` stores frozen parts in bf16 beside fp32 trainable ones; FSDP shards flat parameters of one
    dtype per unit, so under FSDP the strategy's mixed precision is the way (a clear error, not a crash later)."""
    if trainer is not None and "fsdp" in type(trainer.strategy).__name__.lower():
        raise ValueError("fast_paths: FSDP shards flat parameters of one dtype; use the strategy's "
                         "mixed precision (trainer.precision: bf16-mixed) instead")

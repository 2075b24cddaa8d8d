"""State-dict names that survive wrapping: which keys a model's trainable state is made of.

FSDP, activation checkpointing and torch.compile insert wrapper names into parameter names; the
training checkpoint and ``init_from`` (:mod:`ibkit.convert.weights`) compare names without them.
"""

from __future__ import annotations

from torch import nn

# Names the wrappers insert; their state_dict hooks strip them, so names are compared without them.
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def persistent_keys(module: nn.Module, prefix: str = "") -> set[str]:
    """State-dict keys worth saving: trainable parameters, and persistent buffers of modules whose own
    parameters all train (a frozen tower's buffers come back with its pretrained weights)."""
    keys: set[str] = set()
    for module_name, sub in module.named_modules(remove_duplicate=False):
        base = f"{prefix}{module_name}." if module_name else prefix
        own = [p for p in sub._parameters.values() if p is not None]
        for name, param in sub._parameters.items():
            if param is not None and param.requires_grad:
                keys.add(clean_name(base + name))
        if own and all(p.requires_grad for p in own):
            for name, buf in sub._buffers.items():
                if buf is not None and name not in sub._non_persistent_buffers_set:
                    keys.add(clean_name(base + name))
    return keys


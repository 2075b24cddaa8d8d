"""Copy weights into a built model from any file ibkit reads: the dispatch behind ``init_from``.

A transformers/ibkit folder (InstructBlip, or BLIP-2's ``Blip2ForImageTextRetrieval`` /
``Blip2ForConditionalGeneration``: a pre-training stage's export), an ibkit ``.safetensors`` file or
training ``.ckpt`` (instruction tuning or either pre-training stage), a LAVIS ``.pth``
(EVA ViT, BLIP-2 or InstructBLIP, renamed by :mod:`ibkit.convert.lavis`) or a BERT folder (the
Q-Former starts from BERT, :mod:`ibkit.convert.bert_init`). It lives in convert/ because most of
these are foreign formats; the training module only names the files.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
from pathlib import Path

import torch

from ibkit.models.blip2 import Blip2Stage1
from ibkit.models.instructblip import InstructBLIP
from ibkit.models.state import clean_name, persistent_keys

log = logging.getLogger(__name__)


def load_model_folder(path: str | Path, dtype: str | None = None, instruction_aware: bool | None = None) -> InstructBLIP:
    """An InstructBLIP from a transformers InstructBlip folder or a BLIP-2 ``Blip2ForConditionalGeneration``
    folder (a stage-2 export, ``Salesforce/blip2-*``), local or a hub id, in eval mode.

    ``instruction_aware`` None keeps the folder's Q-Former kind (a BLIP-2 folder has no text side); True on a
    BLIP-2 folder gives InstructBLIP's Q-Former with a fresh text side (copy BERT or a stage-1 result into it).
    """
    from ibkit.models.transformers_io import _resolve

    directory = _resolve(path)
    if model_type(directory) == "blip-2":
        from ibkit.models.blip2_transformers_io import load_blip2_generation

        return load_blip2_generation(directory, dtype=dtype, instruction_aware=bool(instruction_aware))
    return InstructBLIP.from_pretrained(directory, dtype=dtype, instruction_aware=instruction_aware)


def folder_state(path: Path) -> dict[str, torch.Tensor]:
    """ibkit names of every tensor of a model folder: InstructBlip layout or either BLIP-2 layout (with
    ibkit's stage-1 side file: ITG head and temperature)."""
    from ibkit.models.transformers_io import hf_to_ibkit_state, read_weights

    if model_type(path) == "blip-2":
        from ibkit.models.blip2_transformers_io import hf_to_ibkit_blip2_state

        return hf_to_ibkit_blip2_state(read_weights(path))
    return hf_to_ibkit_state(read_weights(path))


def load_initial_weights(
    model: InstructBLIP | Blip2Stage1, path: str | Path, fold_token_type: bool = True, warn: bool = True
) -> dict[str, list[str]]:
    """Copy weights into ``model`` from a transformers/ibkit directory, an ibkit ``.safetensors`` file,
    an ibkit training ``.ckpt``, a LAVIS ``.pth`` (EVA ViT, BLIP-2 or InstructBLIP) or a BERT folder
    (the Q-Former starts from BERT, as in BLIP-2 pre-training and LAVIS's InstructBLIP;
    ``fold_token_type``: see :mod:`ibkit.convert.bert_init`, False is LAVIS's).

    Keys the file does not have keep their current values (the frozen LLM usually comes from its own
    folder); a key with another shape is an error. Returns ``{"loaded", "missing", "unexpected",
    "initialised"}``: "initialised" are the tensors BERT initialisation draws afresh on purpose
    (cross-attention, as LAVIS does).
    """
    path = Path(path)
    if path.is_dir() and model_type(path) == "bert":
        from ibkit.convert.bert_init import init_qformer_from_bert

        report = init_qformer_from_bert(model.qformer, path, fold_token_type=fold_token_type)
        log.info("init_from %s: Q-Former from BERT (%d tensors copied, %d initialised)",
                 path, len(report.copied), len(report.initialised))
        fresh = ["qformer." + k for k in report.initialised if "[" not in k]  # not "word_embeddings.weight[30522:]"
        return {"loaded": ["qformer." + k for k in report.copied], "missing": [], "unexpected": report.unused,
                "initialised": fresh}
    if path.is_dir():
        state = folder_state(path)
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    elif path.suffix == ".ckpt":
        raw = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]  # an ibkit training checkpoint
        # (instruction tuning or a BLIP-2 stage: the modules keep the network as ``model``)
        state = {clean_name(k).removeprefix("model."): v for k, v in raw.items()}
    elif path.suffix in (".pth", ".pt", ".bin"):
        state = lavis_state(path)
    elif not path.exists():
        raise FileNotFoundError(f"init_from: {path} does not exist")
    else:
        raise ValueError(f"init_from: {path}: expected a model folder, .safetensors, .ckpt or a LAVIS .pth file")
    own = model.state_dict()
    loaded, unexpected = [], []
    with torch.no_grad():
        for key, value in state.items():
            if key not in own:
                unexpected.append(key)
                continue
            if tuple(own[key].shape) != tuple(value.shape):
                raise ValueError(
                    f"init_from {path}: {key} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}"
                )
            own[key].copy_(value.to(own[key].dtype))
            loaded.append(key)
    missing = sorted(set(own) - set(loaded))
    trainable_missing = sorted(set(missing) & persistent_keys(model))
    log.info("init_from %s: loaded %d tensors, %d not in the file (%d of them trainable), %d unused",
             path, len(loaded), len(missing), len(trainable_missing), len(unexpected))
    if trainable_missing and warn:
        log.warning("init_from %s: trainable weights left at their initial values: %s", path, trainable_missing[:10])
    return {"loaded": loaded, "missing": missing, "unexpected": unexpected, "initialised": []}


def load_initial_weights_in_order(
    model: InstructBLIP | Blip2Stage1, sources: str | Path | list[str | Path] | None, fold_token_type: bool = True
) -> set[str]:
    """``init_from`` as a list: each source in order (a later one wins where two hold a tensor), then ONE
    warning naming the trainable tensors that no source covered. (Each file alone covers part of a model by
    design, e.g. an encoder file then a stage checkpoint, so a warning per file would only be noise.)
    Returns the names loaded or deliberately initialised."""
    sources = [sources] if isinstance(sources, (str, Path)) else list(sources or [])
    covered: set[str] = set()
    for source in sources:
        report = load_initial_weights(model, source, fold_token_type=fold_token_type, warn=False)
        covered.update(report["loaded"], report["initialised"])
    left = sorted(persistent_keys(model) - covered)
    if sources and left:
        log.warning("init_from %s: trainable weights left at their initial values: %s%s", [str(s) for s in sources],
                    left[:10], f" and {len(left) - 10} more" if len(left) > 10 else "")
    return covered


def uninitialised_qformer_tensors(model: InstructBLIP, covered: set[str], allow: bool | list[str] = False) -> list[str]:
    """The Q-Former's parameters that no ``init_from`` file set (``covered``: every "loaded" and
    "initialised" name), less those ``allow`` permits (True: all; a list: fnmatch patterns such as
    ``qformer.embeddings.*``)."""
    if allow is True:
        return []
    patterns = list(allow or [])
    names = ["qformer." + clean_name(n) for n, _ in model.qformer.named_parameters()]
    return [n for n in names if n not in covered and not any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def check_qformer_initialised(
    model: InstructBLIP, covered: set[str], sources: list[str], allow: bool | list[str] = False
) -> None:
    """Refuse a start that leaves Q-Former tensors at their random construction values.

    LAVIS builds the Q-Former from bert-base-uncased and loads the BLIP-2 file over it; a BLIP-2 stage-2
    file alone has no word/position embeddings and no text feed-forward layers, so the instruction path
    would train from N(0, 0.02). ``allow`` opts in (True, or fnmatch patterns of tensor names).
    """
    left = uninitialised_qformer_tensors(model, covered, allow)
    if not left:
        return
    raise ValueError(
        f"init_from {sources} leaves {len(left)} Q-Former tensors at random initial values: "
        f"{summarise_names(left)}. Put the Q-Former's BERT folder (checkpoints/bert-base-uncased) or BLIP-2's "
        "first-stage blip2_pretrained.pth first in init_from (LAVIS builds the Q-Former from BERT, then loads the "
        "BLIP-2 file over it), or opt in with allow_uninitialized: true (or a list of name patterns, e.g. "
        "['qformer.embeddings.*'])"
    )


def summarise_names(names: list[str], limit: int = 12) -> str:
    """Names with layer indices collapsed (``qformer.encoder.layer.*.output.dense.weight (x12)``)."""
    groups: dict[str, int] = {}
    for name in names:
        pattern = re.sub(r"\.\d+\.", ".*.", name)
        groups[pattern] = groups.get(pattern, 0) + 1
    items = [f"{k} (x{n})" if n > 1 else k for k, n in groups.items()]
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def model_type(directory: Path) -> str | None:
    """The ``model_type`` of a folder's ``config.json`` (None without one)."""
    config = directory / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as error:
        raise ValueError(f"{config}: not a JSON object ({error})") from error


def lavis_state(path: Path) -> dict[str, torch.Tensor]:
    """ibkit names of a LAVIS file: an InstructBLIP/BLIP-2 ``.pth`` or the EVA ViT's ``eva_vit_g.pth``."""
    from ibkit.convert.lavis import lavis_key_to_ibkit, vit_key_to_ibkit

    raw = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(raw, dict) and isinstance(raw.get(wrapper), dict):
            raw = raw[wrapper]
            break
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ValueError(f"init_from {path}: not a state dict of tensors")
    state = {}
    for key, value in raw.items():
        name = lavis_key_to_ibkit(key) or vit_key_to_ibkit(key)
        if name is not None:
            state[name] = value
    if not state:
        raise ValueError(f"init_from {path}: no tensor has a LAVIS InstructBLIP/BLIP-2/EVA-ViT name")
    return state

"""Start a Q-Former from a pretrained BERT, as BLIP-2 does with bert-base-uncased.

What BLIP-2/LAVIS does (``Blip2Base.init_Qformer`` and ``blip2_qformer.py``): load BERT's embeddings and
self-attention, copy each layer's feed-forward into both the text FFN and the query FFN, initialise the
cross-attention layers afresh (N(0, 0.02), zero bias, LayerNorm 1/0), and grow the word embeddings by one
row for the ``[DEC]`` token (vocab 30522 -> 30523).

One deliberate difference, on by default: BERT adds ``token_type_embeddings[0]`` to every text token and
the Q-Former has no token types. LAVIS drops that vector; ``fold_token_type=True`` adds it to the position
embeddings instead, so the Q-Former's text path computes exactly what BERT computes. Pass
``fold_token_type=False`` to reproduce LAVIS.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ibkit.models.qformer import QFormer, QFormerConfig

log = logging.getLogger(__name__)

#: BERT config fields that must equal the Q-Former's (the weights are copied one to one).
_MATCHING_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")


@dataclass
class BertInitReport:
    """Which Q-Former parameters came from BERT, which were initialised, which BERT tensors went unused."""

    copied: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)


def read_bert_config(bert_dir: str | Path) -> dict:
    path = Path(bert_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{bert_dir}: no config.json; expected a transformers BERT directory")
    return json.loads(path.read_text())


def read_bert_weights(bert_dir: str | Path) -> dict[str, torch.Tensor]:
    """BERT tensors with plain names (``embeddings.*``, ``encoder.layer.{i}.*``).

    Accepts safetensors or ``pytorch_model.bin`` (read with ``weights_only=True``), a ``bert.`` prefix
    (``BertForPreTraining`` checkpoints such as bert-base-uncased's) and TF-era LayerNorm names
    (``gamma``/``beta``).
    """
    directory = Path(bert_dir)
    files = sorted(directory.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    if files:
        from safetensors.torch import load_file

        for f in files:
            state.update(load_file(str(f)))
    else:
        files = sorted(directory.glob("pytorch_model*.bin"))
        if not files:
            raise FileNotFoundError(f"{directory}: no *.safetensors or pytorch_model*.bin weights found")
        for f in files:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
    out = {}
    for key, value in state.items():
        name = key.removeprefix("bert.")
        if name.endswith(".gamma"):
            name = name.removesuffix(".gamma") + ".weight"
        elif name.endswith(".beta"):
            name = name.removesuffix(".beta") + ".bias"
        out[name] = value
    return out


def _check_shapes(cfg: QFormerConfig, bert_cfg: dict, bert_dir: str | Path) -> None:
    for name in _MATCHING_FIELDS:
        if bert_cfg.get(name) != getattr(cfg, name):
            raise ValueError(
                f"{bert_dir}: BERT has {name}={bert_cfg.get(name)} but the Q-Former has {getattr(cfg, name)}; "
                "layer count and widths must match to copy the weights"
            )
    if bert_cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{bert_dir}: position_embedding_type {bert_cfg['position_embedding_type']!r}; "
                         "the Q-Former has absolute positions only")
    if bert_cfg.get("hidden_act", "gelu") != cfg.hidden_act:
        raise ValueError(f"{bert_dir}: BERT uses hidden_act={bert_cfg.get('hidden_act')!r}, the Q-Former {cfg.hidden_act!r}")
    if cfg.instruction_aware:
        if cfg.vocab_size < bert_cfg.get("vocab_size", 0):
            raise ValueError(f"{bert_dir}: BERT's vocab_size {bert_cfg['vocab_size']} exceeds the Q-Former's {cfg.vocab_size}")
        if cfg.max_position_embeddings > bert_cfg.get("max_position_embeddings", 512):
            raise ValueError(
                f"{bert_dir}: the Q-Former wants {cfg.max_position_embeddings} positions, "
                f"BERT has {bert_cfg.get('max_position_embeddings')}"
            )
    eps = bert_cfg.get("layer_norm_eps", 1e-12)
    if eps != cfg.layer_norm_eps:
        log.warning("%s: BERT layer_norm_eps %s differs from the Q-Former's %s", bert_dir, eps, cfg.layer_norm_eps)


def _reinit(module: nn.Module, std: float, prefix: str, report: BertInitReport) -> None:
    """BERT's initialiser (what LAVIS's ``from_pretrained`` gives layers missing from the checkpoint)."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, std=std)
            nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
    report.initialised += [f"{prefix}.{n}" for n, _ in module.named_parameters()]


@torch.no_grad()
def init_qformer_from_bert(
    qformer: QFormer, bert_dir: str | Path, fold_token_type: bool = True
) -> BertInitReport:
    """Overwrite ``qformer``'s weights with BERT's (in place), BLIP-2 style; see the module docstring.

    Rows of the word embeddings beyond BERT's vocabulary (``[DEC]``) and the cross-attention layers are
    drawn from N(0, ``initializer_range``) with the global torch RNG (seed it for reproducibility).
    """
    cfg = qformer.config
    bert_cfg = read_bert_config(bert_dir)
    _check_shapes(cfg, bert_cfg, bert_dir)
    bert = read_bert_weights(bert_dir)
    used: set[str] = set()
    report = BertInitReport()

    def take(src: str, dst: nn.Parameter, dst_name: str, rows: int | None = None) -> torch.Tensor:
        if src not in bert:
            raise KeyError(f"{bert_dir}: BERT weights lack {src!r}")
        value = bert[src] if rows is None else bert[src][:rows]
        fits = value.shape == dst.shape if rows is None else value.shape[1:] == dst.shape[1:]
        if not fits:
            raise ValueError(f"{bert_dir}: {src} has shape {tuple(bert[src].shape)}, {dst_name} needs {tuple(dst.shape)}")
        dst[: value.shape[0]].copy_(value.to(dst.dtype))
        used.add(src)
        report.copied.append(dst_name)
        return value

    emb = qformer.embeddings
    take("embeddings.LayerNorm.weight", emb.layernorm.weight, "embeddings.layernorm.weight")
    take("embeddings.LayerNorm.bias", emb.layernorm.bias, "embeddings.layernorm.bias")
    if cfg.instruction_aware:
        words = emb.word_embeddings.weight
        bert_vocab = take("embeddings.word_embeddings.weight", words, "embeddings.word_embeddings.weight",
                          rows=words.shape[0]).shape[0]
        if words.shape[0] > bert_vocab:  # [DEC] and any other added token: fresh rows, as resize_token_embeddings
            nn.init.normal_(words[bert_vocab:], std=cfg.initializer_range)
            report.initialised.append(f"embeddings.word_embeddings.weight[{bert_vocab}:]")
        positions = emb.position_embeddings.weight
        take("embeddings.position_embeddings.weight", positions, "embeddings.position_embeddings.weight",
             rows=positions.shape[0])
        token_type = bert.get("embeddings.token_type_embeddings.weight")
        if token_type is not None:
            used.add("embeddings.token_type_embeddings.weight")
            if fold_token_type:
                positions.add_(token_type[0].to(positions.dtype))

    for i, layer in enumerate(qformer.encoder.layer):
        src = f"encoder.layer.{i}"
        dst = f"encoder.layer.{i}"
        for proj in ("query", "key", "value"):
            core = getattr(layer.attention.attention, proj)
            for kind in ("weight", "bias"):
                take(f"{src}.attention.self.{proj}.{kind}", getattr(core, kind), f"{dst}.attention.attention.{proj}.{kind}")
        for part in ("dense", "LayerNorm"):
            mod = getattr(layer.attention.output, part)
            for kind in ("weight", "bias"):
                take(f"{src}.attention.output.{part}.{kind}", getattr(mod, kind), f"{dst}.attention.output.{part}.{kind}")
        # BERT's one FFN seeds both the text FFN and the query FFN
        ffns = [("intermediate_query", "output_query")]
        if cfg.instruction_aware:
            ffns.append(("intermediate", "output"))
        for inter_name, out_name in ffns:
            inter, out = getattr(layer, inter_name), getattr(layer, out_name)
            for kind in ("weight", "bias"):
                take(f"{src}.intermediate.dense.{kind}", getattr(inter.dense, kind), f"{dst}.{inter_name}.dense.{kind}")
                take(f"{src}.output.dense.{kind}", getattr(out.dense, kind), f"{dst}.{out_name}.dense.{kind}")
                take(f"{src}.output.LayerNorm.{kind}", getattr(out.LayerNorm, kind), f"{dst}.{out_name}.LayerNorm.{kind}")
        if layer.has_cross_attention:
            _reinit(layer.crossattention, cfg.initializer_range, f"{dst}.crossattention", report)

    report.unused = sorted(k for k in bert if k not in used and not k.endswith("position_ids"))
    log.info(
        "Q-Former from %s: %d tensors copied, %d initialised (cross-attention%s), unused BERT tensors: %s",
        bert_dir, len(report.copied), len(report.initialised),
        ", new vocabulary rows" if any("word_embeddings" in n for n in report.initialised) else "",
        report.unused or "none",
    )
    return report


def qformer_from_bert(
    bert_dir: str | Path,
    encoder_width: int,
    extra_tokens: int = 1,
    cross_attention_freq: int = 2,
    instruction_aware: bool = True,
    fold_token_type: bool = True,
) -> QFormer:
    """A Q-Former shaped like the BERT in ``bert_dir`` (plus ``extra_tokens`` vocabulary rows for ``[DEC]``),
    initialised from it."""
    bert_cfg = read_bert_config(bert_dir)
    fields = QFormerConfig.__dataclass_fields__
    values = {k: bert_cfg[k] for k in fields if k in bert_cfg and bert_cfg[k] is not None}
    values["vocab_size"] = int(bert_cfg.get("vocab_size", 30522)) + extra_tokens
    values.update(cross_attention_freq=cross_attention_freq, instruction_aware=instruction_aware)
    qformer = QFormer(QFormerConfig(**values), encoder_width=encoder_width)
    init_qformer_from_bert(qformer, bert_dir, fold_token_type=fold_token_type)
    return qformer

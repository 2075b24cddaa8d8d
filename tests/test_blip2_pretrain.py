"""BLIP-2 pre-training through `ibkit fit`: stage 1 -> stage 2 -> instruction tuning on the tiny preset,
each stage initialised from the previous one's output; retrieval recall; caption batches."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch  # noqa: F401 - imported outside capsys: its log handler must not bind a captured stream
import pytest
import torch

from ibkit.app import main
from ibkit.eval.retrieval import reranked_recall, retrieval_recall

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"


def _common(workspace: Path, run: Path) -> list[str]:
    return [f"--data.init_args.root={workspace}", f"--trainer.default_root_dir={run}",
            f"--trainer.logger.init_args.save_dir={run}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.max_steps=3", "--trainer.val_check_interval=3"]


def _metrics(run: Path) -> dict[str, float]:
    import csv

    rows = list(csv.DictReader(next(run.rglob("metrics.csv")).open()))
    out: dict[str, float] = {}
    for row in rows:
        out.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return out


def test_stage1_stage2_instruction_tuning_chain(tmp_path):
    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    from ibkit.shapes.datamodule import prepare_tiny_workspace

    workspace = tmp_path / "ws"
    prepare_tiny_workspace(workspace)
    s1, s2, it = tmp_path / "stage1", tmp_path / "stage2", tmp_path / "instruct"

    # stage 1: ITC/ITM/ITG; validation logs retrieval recall and CIDEr
    stage1 = ["--config", str(TINY / "blip2_stage1.yaml"), *_common(workspace, s1)]
    assert main(["fit", *stage1]) == 0
    logged = _metrics(s1)
    for key in ("train/loss_itc", "train/loss_itm", "train/loss_itg", "val/loss", "val/itc_i2t_r1", "val/itc_t2i_r5",
                "val/itm_i2t_r1", "val/itm_t2i_r5", "val/cider"):
        assert key in logged, key
    ckpt1 = s1 / "checkpoints" / "last.ckpt"
    state1 = torch.load(ckpt1, map_location="cpu", weights_only=True)
    assert state1["ibkit"]["blip2_stage"] == 1
    assert not any(k.startswith("model.vision_encoder.") for k in state1["state_dict"])  # frozen: not saved
    assert "model.itm_head.weight" in state1["state_dict"] and "model.temp" in state1["state_dict"]
    export1 = s1 / "export"
    assert main(["export", *stage1, f"--ckpt_path={ckpt1}", f"--output={export1}"]) == 0
    _, info = Blip2ForImageTextRetrieval.from_pretrained(export1, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    # stage 2 from stage 1's exported folder: prefix LM through the frozen tiny T5
    from ibkit.app.config import build_from_config

    module2, _ = build_from_config([TINY / "blip2_stage2.yaml"], {"data.init_args.root": str(workspace),
                                                                  "model.init_args.init_from": str(export1)})
    torch.testing.assert_close(module2.model.query_tokens, state1["state_dict"]["model.query_tokens"])
    torch.testing.assert_close(module2.model.ln_vision.weight, state1["state_dict"]["model.ln_vision.weight"])
    stage2 = ["--config", str(TINY / "blip2_stage2.yaml"), *_common(workspace, s2),
              f"--model.init_args.init_from={export1}"]
    assert main(["fit", *stage2]) == 0
    assert {"train/loss", "val/loss", "val/cider"} <= set(_metrics(s2))
    ckpt2 = s2 / "checkpoints" / "last.ckpt"
    state2 = torch.load(ckpt2, map_location="cpu", weights_only=True)["state_dict"]
    assert "model.language_projection.weight" in state2 and "model.qformer.embeddings.word_embeddings.weight" not in state2
    export2 = s2 / "export"
    assert main(["export", *stage2, f"--ckpt_path={ckpt2}", f"--output={export2}"]) == 0
    _, info = Blip2ForConditionalGeneration.from_pretrained(export2, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    # instruction tuning: text side from the stage-1 checkpoint, the rest from stage 2's folder
    overrides = {"data.init_args.root": str(workspace),
                 "model.init_args.init_from": [str(ckpt1), str(export2)]}
    module, _ = build_from_config([TINY / "fit.yaml", TINY / "blip2_instruct.yaml"], overrides)
    net = module.model
    exported = Blip2ForConditionalGeneration.from_pretrained(export2)
    torch.testing.assert_close(net.query_tokens, state2["model.query_tokens"])
    torch.testing.assert_close(net.language_projection.weight, state2["model.language_projection.weight"])
    torch.testing.assert_close(net.qformer.embeddings.word_embeddings.weight,
                               state1["state_dict"]["model.qformer.embeddings.word_embeddings.weight"])
    torch.testing.assert_close(net.language_model.base_model.shared.weight,
                               exported.language_model.shared.weight)  # the frozen LLM stage 2 trained with
    instruct = ["--config", str(TINY / "fit.yaml"), "--config", str(TINY / "blip2_instruct.yaml"),
                *_common(workspace, it), f"--model.init_args.init_from=[{ckpt1}, {export2}]",
                "--model.init_args.val_protocol=false"]
    assert main(["fit", *instruct]) == 0
    assert (it / "checkpoints" / "last.ckpt").is_file()


def test_retrieval_recall_counts_any_own_text():
    # 2 images, 3 texts: texts 0, 1 describe image 0, text 2 image 1
    text_image = torch.tensor([0, 0, 1])
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.8, 0.0, 0.2]])
    recall = retrieval_recall(scores, text_image, ks=(1, 2))
    assert recall["i2t_r1"] == 50.0 and recall["i2t_r2"] == 100.0  # image 1's own text ranks 2nd
    # text 0 prefers image 1 (0.8 > 0.1); text 1 image 0; text 2 image 0 (0.5 > 0.2)
    assert recall["t2i_r1"] == pytest.approx(100 / 3) and recall["t2i_r2"] == 100.0
    with pytest.raises(ValueError, match="text_image"):
        retrieval_recall(scores, torch.tensor([0, 1]))


def test_itm_reranking_rescores_only_the_top_k():
    text_image = torch.tensor([0, 1])
    similarity = torch.tensor([[0.2, 0.3], [0.1, 0.0]])
    calls = []

    def match(rows, cols):
        calls.append((rows.tolist(), cols.tolist()))
        return (rows == cols).float() * 10  # ITM knows the true pairs

    recall = reranked_recall(similarity, text_image, k=2, pair_scores=match)
    assert recall["i2t_r1"] == 100.0 and recall["t2i_r1"] == 100.0
    assert retrieval_recall(similarity, text_image)["i2t_r1"] == 0.0  # ITC alone gets both images wrong
    recall_k1 = reranked_recall(similarity, text_image, k=1, pair_scores=match)
    assert recall_k1["i2t_r1"] == 0.0  # each image's own text is not in its ITC top 1: never re-scored
    assert all(len(rows) <= 2 for rows, _ in calls)


def test_caption_collator_batches(tmp_path):
    from transformers import AutoTokenizer

    from ibkit.data.pretrain import CaptionCollator
    from ibkit.shapes.datamodule import prepare_tiny_workspace

    paths = prepare_tiny_workspace(tmp_path / "ws")
    qtok, ltok = AutoTokenizer.from_pretrained(paths["qformer"]), AutoTokenizer.from_pretrained(paths["llm"])
    pixels = torch.zeros(3, 8, 8)
    items = [
        {"pixel_values": pixels, "target": "a red circle", "sample_id": "1", "dataset": "d", "image": "x.png",
         "answers": ["a red circle", "red circle"]},
        {"pixel_values": pixels, "target": "a blue square", "sample_id": "2", "dataset": "d", "image": "x.png",
         "answers": ["a blue square"]},
        {"pixel_values": None, "sample_id": "3", "dataset": "d", "skipped": [("d", "missing_file", "y", "3")]},
    ]
    batch = CaptionCollator(qtok, ltok, "train", max_target_len=4)(items)
    assert batch["input_ids"].shape == (2, 4) and batch["input_ids"][0, 0] == qtok.cls_token_id
    assert batch["input_ids"][0, -1] == qtok.sep_token_id  # cut on the right, [SEP] kept
    assert batch["image_ids"][0] == batch["image_ids"][1]  # one image file: never each other's negative
    assert batch["caption_ids"][0] == ltok("a red circle", add_special_tokens=False)["input_ids"][:3]
    assert batch["skipped"] == [("d", "missing_file", "y", "3")]
    held_out = CaptionCollator(qtok, None, "generate")(items)
    assert held_out["text_image"].tolist() == [0, 0, 1] and "caption_ids" not in held_out
    with pytest.raises(ValueError, match="d/1: no caption"):
        CaptionCollator(qtok)([{**items[0], "target": None}])


class _TrainingDtypes(lightning.pytorch.Callback):
    """Output dtypes of the Q-Former's linears in training forwards (grad on), and the LLM's attention
    kernel at each training batch."""

    def __init__(self) -> None:
        self.dtypes: set[torch.dtype] = set()
        self.kernels: set[str] = set()

    def on_fit_start(self, trainer, pl_module) -> None:
        for linear in (m for m in pl_module.model.qformer.modules() if isinstance(m, torch.nn.Linear)):
            linear.register_forward_hook(lambda m, i, o: self.dtypes.add(o.dtype) if torch.is_grad_enabled() else None)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        lm = getattr(pl_module.model, "language_model", None)
        if lm is not None:
            self.kernels.add(lm.base_model.config._attn_implementation)


@pytest.mark.parametrize("forced", ["1", "0"], ids=["bf16", "fp32"])
@pytest.mark.parametrize("stage", [1, 2])
def test_fast_paths_in_both_stages_follow_the_precision_decision(tmp_path, monkeypatch, stage, forced):
    """``fast_paths``: bf16 autocast in training only where bf16 is fast (forced either way here), stage 2's
    frozen T5 stored in bf16 there and training with T5's eager attention on CPU, validating with SDPA."""
    import lightning.pytorch as pl

    from ibkit.app.config import build_from_config
    from ibkit.models.precision import CPU_BF16_ENV, ExplicitEVAAttention
    from ibkit.shapes.datamodule import prepare_tiny_workspace

    monkeypatch.setenv(CPU_BF16_ENV, forced)
    workspace = tmp_path / "ws"
    prepare_tiny_workspace(workspace)
    module, data = build_from_config([TINY / f"blip2_stage{stage}.yaml"],
                                     {"data.init_args.root": str(workspace), "model.init_args.fast_paths": True,
                                      "model.init_args.init_from": None})  # random weights do here
    record = _TrainingDtypes()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, val_check_interval=2, limit_val_batches=1,
                         check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False, callbacks=[record],
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path / "run")
    trainer.fit(module, datamodule=data)
    bf16 = forced == "1"
    assert record.dtypes == {torch.bfloat16 if bf16 else torch.float32}
    assert all(type(m) is ExplicitEVAAttention for m in module.model.vision_encoder.modules()
               if "Attention" in type(m).__name__ and hasattr(m, "qkv"))
    assert all(p.dtype == torch.float32 for p in module.parameters() if p.requires_grad)  # fp32 masters
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["train/loss"])))
    if stage == 2:
        lm = module.model.language_model.base_model
        assert lm.shared.weight.dtype == (torch.bfloat16 if bf16 else torch.float32)
        assert record.kernels == {"eager"} and lm.config._attn_implementation == "sdpa"  # validated last
        assert "val/cider" in trainer.callback_metrics

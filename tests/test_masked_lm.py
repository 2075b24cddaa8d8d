"""Masked-LM pretraining of a small BERT (MaskedLMModule, the demo's miniature of bert-base-uncased), its
export, and the Q-Former that starts from the export as BLIP-2's starts from bert-base-uncased."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from fixtures_text import write_text_corpus

from ibkit.data.collate import IGNORE_INDEX
from ibkit.data.text import MaskedTextCollator, TextDataModule
from ibkit.training.checkpoint import RunCheckpoint
from ibkit.training.masked_lm import MaskedLMModule, mask_tokens
from ibkit.training.optim import OptimSettings

TINY_BERT = {"vocab_size": 256, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 64, "hidden_dropout_prob": 0.0,
             "attention_probs_dropout_prob": 0.0}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Shapes corpus records (JSONL train, JSON val) and a BERT-like word-level tokenizer covering them."""
    return write_text_corpus(tmp_path_factory.mktemp("text"), "bert", train=64, val=16)


def _data(corpus) -> TextDataModule:
    return TextDataModule(train_files=[str(corpus / "train.jsonl")], val_files=[str(corpus / "val.json")],
                          batch_size=16, max_prompt_len=64)


def _module(corpus) -> MaskedLMModule:
    return MaskedLMModule(TINY_BERT, tokenizer=str(corpus / "tok"),
                          optim=OptimSettings(lr=3e-3, warmup_start_lr=1e-4, warmup_steps=2, weight_decay=0.0))


def test_masking_follows_berts_rule_and_never_touches_special_or_padding_tokens():
    specials, mask_id, vocab = [0, 1, 2, 3], 1, 50
    rows = torch.randint(4, vocab, (64, 40))
    rows[:, 0], rows[:, -1] = 2, 3  # [CLS] ... [SEP]
    attention = torch.ones_like(rows)
    attention[::2, 30:] = 0
    rows[::2, 30:] = 0  # padding
    generator = torch.Generator().manual_seed(0)
    inputs, labels = mask_tokens(rows, attention, specials, mask_id, vocab, 0.15, generator)
    chosen = labels != IGNORE_INDEX
    candidates = attention.bool() & (rows >= 4)
    assert not (chosen & ~candidates).any()  # never a special token or padding
    assert torch.equal(labels[chosen], rows[chosen]) and torch.equal(inputs[~chosen], rows[~chosen])
    assert abs(chosen.sum().item() / candidates.sum().item() - 0.15) < 0.02
    masked = (inputs == mask_id) & chosen
    kept = (inputs == rows) & chosen
    swapped = chosen & ~masked & ~kept
    share = chosen.sum().item()
    assert abs(masked.sum().item() / share - 0.8) < 0.05
    assert 0.05 < kept.sum().item() / share < 0.16 and 0.04 < swapped.sum().item() / share < 0.16
    assert (inputs[swapped] >= 4).all()  # a random token is never a special one
    again = mask_tokens(rows, attention, specials, mask_id, vocab, 0.15, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)  # the generator decides


def test_a_short_batch_always_has_a_masked_token():
    rows = torch.tensor([[2, 7, 3]])
    for seed in range(20):
        _, labels = mask_tokens(rows, torch.ones_like(rows), [0, 1, 2, 3], 1, 10, 0.15,
                                torch.Generator().manual_seed(seed))
        assert labels.tolist() == [[IGNORE_INDEX, 7, IGNORE_INDEX]]
    with pytest.raises(ValueError, match="probability"):
        mask_tokens(rows, torch.ones_like(rows), [0], 1, 10, 1.5)
    with pytest.raises(ValueError, match="random_share"):  # refused when the module is built, before a step
        MaskedLMModule(TINY_BERT, mask_share=0.9, random_share=0.2)


def test_all_chosen_tokens_can_become_the_mask_token():
    rows = torch.randint(4, 50, (32, 32))
    inputs, labels = mask_tokens(rows, torch.ones_like(rows), [0, 1, 2, 3], 1, 50, 0.3,
                                 torch.Generator().manual_seed(1), mask_share=1.0, random_share=0.0)
    chosen = labels != IGNORE_INDEX
    assert chosen.sum() > 200 and (inputs[chosen] == 1).all() and torch.equal(inputs[~chosen], rows[~chosen])


def test_collator_frames_each_prompt_and_cuts_it_on_the_left(corpus):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(corpus / "tok")
    collate = MaskedTextCollator(tokenizer, max_len=6)
    batch = collate([{"id": "a", "kind": "k", "prompt": "a red circle", "target": "x"},
                     {"id": "b", "kind": "k", "prompt": "a large blue square on the left", "target": "y"}])
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    words = tokenizer("on the left", add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][1].tolist() == [cls, tokenizer.convert_tokens_to_ids("square"), *words, sep]
    assert batch["input_ids"][0].tolist()[-1] == tokenizer.pad_token_id
    assert batch["attention_mask"].sum(1).tolist() == [5, 6]
    with pytest.raises(ValueError, match="no room"):
        MaskedTextCollator(tokenizer, max_len=2)


def test_training_lowers_the_masked_loss_and_the_export_starts_a_qformer_that_reproduces_the_bert(corpus, tmp_path):
    from transformers import BertModel

    from ibkit.app.export import export_checkpoint
    from ibkit.convert.weights import load_initial_weights
    from ibkit.models.blip2 import Blip2Stage1
    from ibkit.models.qformer import QFormerConfig
    from ibkit.models.vision.eva_vit import EVAViT, EVAViTConfig

    pl.seed_everything(0)
    module, data = _module(corpus), _data(corpus)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=60, val_check_interval=60,
                         check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path / "run",
                         callbacks=[RunCheckpoint(save_top_k=0, save_last=True)])
    data.connect(module.processor(), is_encoder_decoder=False, masked=True)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    assert set(batch) >= {"input_ids", "attention_mask"} and "labels" not in batch  # the prompt alone

    def val_loss() -> float:
        with torch.no_grad():
            return float(module._masked_loss(batch, torch.Generator().manual_seed(0))[0])

    before = val_loss()
    trainer.fit(module, datamodule=data)
    assert val_loss() < 0.75 * before  # 5.55 (ln 256) -> 3.74 here
    assert 0.0 < trainer.callback_metrics["val/acc"] <= 1.0

    # ibkit export's path: a fresh module of the same configuration, the checkpoint's weights, save_model
    out = export_checkpoint(_module(corpus), _data(corpus), tmp_path / "run" / "checkpoints", tmp_path / "bert")
    assert (out / "tokenizer.json").is_file()
    vision = EVAViT(EVAViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=16, patch_size=8), frozen=True)
    qformer = QFormerConfig(vocab_size=257, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64, cross_attention_freq=1,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, instruction_aware=True)
    stage1 = Blip2Stage1(vision, qformer, num_query_tokens=4, embed_dim=16, dec_token_id=256)
    report = load_initial_weights(stage1, out)
    assert any("crossattention" in key for key in report["initialised"])
    bert = BertModel.from_pretrained(out).eval()
    stage1.eval()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        expected = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        got = stage1.qformer.forward_hidden(torch.zeros(ids.shape[0], 0, 32), None, ids, mask)
    rows = mask.bool()
    torch.testing.assert_close(got[rows], expected[rows], atol=1e-5, rtol=1e-4)
    layer = stage1.qformer.encoder.layer[0]  # the query feed-forward starts as a copy of the text one (LAVIS)
    assert torch.equal(layer.intermediate_query.dense.weight, layer.intermediate.dense.weight)


def test_tokenizer_larger_than_the_bert_is_refused(corpus):
    module = MaskedLMModule({**TINY_BERT, "vocab_size": 8}, tokenizer=str(corpus / "tok"))
    module.processor()
    with pytest.raises(ValueError, match="vocab_size"):
        module.configure_model()


def test_shapes_questions_join_a_masked_lm_text_only(tmp_path):
    from ibkit.shapes.datamodule import ShapesTextDataModule
    from ibkit.shapes.text_corpus import TEXT_CORPUS
    from ibkit.shapes.writer import TINY_SIZES

    sizes = {**TINY_SIZES, f"{TEXT_CORPUS}.train": 40, f"{TEXT_CORPUS}.val": 10}
    data = ShapesTextDataModule(root=str(tmp_path), sizes=sizes, question_texts_of=["shapes_vqa"], batch_size=8)
    data.prepare_data()
    data.setup("fit")
    questions = json.loads((tmp_path / "shapes" / "shapes_vqa" / "train.json").read_text())["records"]
    added = [r for r in data.train_set.records if r["kind"] == "shapes_vqa_question"]
    assert len(data.train_set.records) == 40 + 2 * len(questions) == 40 + len(added)
    first = questions[0]["question"]
    assert {r["prompt"] for r in added[:2]} == {first, f"Question: {first} Short answer:"}
    assert all(r["kind"] != "shapes_vqa_question" for r in data.val_set.records)
    data.connect(None, is_encoder_decoder=True)  # a T5 would learn to answer without the image: refused
    with pytest.raises(ValueError, match="need the image"):
        data.train_dataloader()
    data.connect(None, is_encoder_decoder=False, masked=True)
    assert "input_ids" in next(iter(data.train_dataloader()))
    missing = ShapesTextDataModule(root=str(tmp_path), sizes=sizes, question_texts_of=["shapes_nothing"])
    with pytest.raises(FileNotFoundError, match="shapes_nothing"):
        missing.setup("fit")


def test_a_masked_lm_can_take_random_batches_instead_of_batches_of_one_length(corpus):
    from ibkit.data.text import LengthGroupedBatches

    lengths = [1] * 64 + [50] * 64

    def mixed(batches) -> int:
        return sum(len({lengths[i] for i in batch}) > 1 for batch in batches)

    grouped, drawn = (list(LengthGroupedBatches(lengths, 8, seed=0, group=group)) for group in (64, 1))
    assert mixed(grouped) <= 1 and mixed(drawn) >= 10  # of 16 batches
    assert sorted(i for batch in drawn for i in batch) == list(range(128))  # every record once an epoch
    data = TextDataModule(train_files=[str(corpus / "train.jsonl")], batch_size=8, group_by_length=False)
    data.connect(_module(corpus).processor(), is_encoder_decoder=False, masked=True)
    data.setup("fit")
    assert data.train_dataloader().batch_sampler.group == 1

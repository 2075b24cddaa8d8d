"""Readers of the official annotation formats, checked on tiny fixture files through the templates."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from fixtures_datasets import FIXTURE_SPLITS, write_fixture_root

from ibkit.data.errors import MalformedRecordError, SkipCounter
from ibkit.data.registry import get_spec, load_samples, resolve_paths
from ibkit.data.templates import MAX_OCR_TOKENS, TEMPLATES, fill_instruction, zero_shot_instruction


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data")
    write_fixture_root(path)
    return path


def load(root: Path, name: str, split: str, **kwargs):
    return load_samples(name, root, split, strict=True, **kwargs)


def fill_all(sample, template_set: str, seeds: int = 40) -> list[str]:
    return [fill_instruction(sample, template_set, random.Random(seed)).instruction for seed in range(seeds)]


def test_every_fixture_split_reads_cleanly_with_existing_absolute_media(root):
    for name, splits in FIXTURE_SPLITS.items():
        for split in splits:
            samples = load(root, name, split)
            assert len({s.sample_id for s in samples}) == len(samples), (name, split)
            for sample in samples:
                assert sample.dataset == name
                media = sample.video if get_spec(name).modality == "video" else sample.image
                assert Path(media).is_absolute() and Path(media).is_file(), (name, split, media)


def test_readers_never_open_media(root, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(root, bare, ignore=shutil.ignore_patterns("*.jpg", "*.png", "*.avi", "*.mp4"))
    for name, split in (
        ("coco_caption", "val"),
        ("vqav2", "train"),
        ("msvd_qa", "test"),
        ("scienceqa", "test"),
    ):
        assert len(load(bare, name, split)) == len(load(root, name, split)) > 0


# ------------------------------------------------------------------------------------------ captioning


def test_coco_karpathy_train_rows_and_val_references(root):
    train = load(root, "coco_caption", "train")
    assert [s.target for s in train] == [
        "a cat sitting on a red couch",
        "a small cat resting on a sofa",
        "a man riding a bike down a street",
    ]
    assert train[2].image.endswith("coco/images/val2014/COCO_val2014_000000000042.jpg")  # restval image
    (val,) = load(root, "coco_caption", "val")
    assert val.sample_id == "391895" and len(val.answers) == 3 and val.target is None
    filled = fill_instruction(val, "caption", random.Random(3))
    assert filled.instruction in TEMPLATES["caption"] and filled.target in val.answers


def test_coco_original_captions_format(root, tmp_path):
    path = tmp_path / "captions_train2014.json"
    path.write_text(
        json.dumps(
            {
                "info": {},
                "licenses": [],
                "images": [
                    {
                        "license": 1,
                        "file_name": "COCO_train2014_000000000009.jpg",
                        "coco_url": "",
                        "height": 8,
                        "width": 8,
                        "date_captured": "2013-11-14 11:18:45",
                        "flickr_url": "",
                        "id": 9,
                    }
                ],
                "annotations": [
                    {"image_id": 9, "id": 1, "caption": "a cat on a couch"},
                    {"image_id": 9, "id": 2, "caption": "a sleeping cat"},
                ],
            }
        )
    )
    samples = load(root, "coco_caption", "train", overrides={"train": str(path)})
    assert [s.target for s in samples] == ["a cat on a couch", "a sleeping cat"]
    assert samples[0].image == str(root / "coco/images/train2014/COCO_train2014_000000000009.jpg")


def test_textcaps_carries_ocr_tokens_into_instructions(root):
    train = load(root, "textcaps", "train")
    assert [s.ocr_tokens for s in train] == [["STOP", "ALL", "WAY"], ["STOP", "ALL", "WAY"], None]
    instructions = fill_all(train[0], "caption_ocr")
    assert all("STOP, ALL, WAY" in text for text in instructions)
    assert not any(
        "OCR" in text or "text detected" in text.lower() for text in fill_all(train[2], "caption_ocr")
    )
    (val,) = load(root, "textcaps", "val")  # two caption rows of one image -> one evaluation sample
    assert len(val.answers) == 2 and val.target is None


def test_capfilt_urls_map_to_hashed_local_files(root):
    samples = load(root, "capfilt", "train")
    assert samples[1].image.endswith(".png") and samples[1].extra["url"].startswith(
        "http://example.com/photos/"
    )
    assert samples[0].target == "a beach with palm trees and blue water"


def test_nocaps_and_flickr30k_references(root):
    nocaps = load(root, "nocaps", "val")
    assert [len(s.answers) for s in nocaps] == [2, 1]
    assert nocaps[0].image.endswith("nocaps/images/val/0013ea2087020901.jpg")
    assert zero_shot_instruction(nocaps[0], get_spec("nocaps")) == "A short image description:"
    assert [len(load(root, "flickr30k", split)) for split in ("train", "val", "test")] == [2, 1, 1]
    (test,) = load(root, "flickr30k", "test")
    assert test.answers == ["A man in a red shirt sings.", "A singer on stage.", "Someone performing music."]


# ------------------------------------------------------------------------------------------ VQA family


def test_vqav2_answers_target_and_coco_image(root):
    first, second = load(root, "vqav2", "train")
    assert (
        first.question == "what animal is this?" and first.answers.count("cat") == 8 and first.target == "cat"
    )
    assert second.target == "1"  # 6 x "1" beat 4 x "one"
    assert first.image == str(root / "coco/images/train2014/COCO_train2014_000000000009.jpg")
    texts = fill_all(first, "vqa")
    assert all("what animal is this?" in text for text in texts)
    assert zero_shot_instruction(first, get_spec("vqav2")) == "Question: what animal is this? Short answer:"


def test_okvqa_uses_the_lemmatised_answers(root):
    (sample,) = load(root, "okvqa", "train")
    assert sample.target == "sleep" and "sleeping" not in sample.answers


def test_aokvqa_direct_answers_and_choices(root):
    (train,) = load(root, "aokvqa", "train")
    assert train.candidates == ["skateboarder", "train", "delivery", "cab"] and train.label == 3
    assert train.target == "ride"  # most frequent direct answer (ties broken by first occurrence)
    assert train.image.endswith("coco/images/train2017/000000000299.jpg")


def test_aokvqa_lavis_copy_with_image_field(root, tmp_path):
    record = json.loads((root / "aokvqa/aokvqa_v1p0_val.json").read_text())[0]
    record["image"] = "val2017/000000208716.jpg"
    path = tmp_path / "aokvqa_v1p0_val.json"
    path.write_text(json.dumps([record]))
    (sample,) = load(root, "aokvqa", "val", overrides={"val": str(path)})
    assert sample.image == str(root / "coco/images/val2017/000000208716.jpg")


def test_ocrvqa_filters_by_split_code_and_keeps_the_image_extension(root):
    train = load(root, "ocrvqa", "train")
    assert [(s.question, s.target) for s in train] == [
        ("Who wrote this book?", "Jane Doe"),
        ("What is the title of this book?", "Cooking at Home"),
    ]
    (val,) = load(root, "ocrvqa", "val")
    assert val.image.endswith("ocrvqa/images/B00ZZZ0001.png") and val.target == "No"


def test_textvqa_ocr_tokens_are_capped_at_30_in_the_zero_shot_prompt(root):
    first, second = load(root, "textvqa", "val")
    assert len(first.ocr_tokens) == 35 and first.target == "coca cola"
    prompt = zero_shot_instruction(first, get_spec("textvqa"))
    assert prompt.startswith("OCR tokens: tok0, tok1,")
    assert f"tok{MAX_OCR_TOKENS - 1}." in prompt and f"tok{MAX_OCR_TOKENS}" not in prompt
    assert prompt.endswith("Question: what brand is the bottle? Short answer:")
    assert second.ocr_tokens is None
    assert (
        zero_shot_instruction(second, get_spec("textvqa"))
        == "Question: what number is on the jersey? Short answer:"
    )


def test_gqa_official_dict_and_lavis_list(root, tmp_path):
    official = load(root, "gqa", "testdev")
    assert [(s.sample_id, s.target) for s in official] == [("20968379", "yes"), ("20968380", "white")]
    assert official[0].image == str(root / "gqa/images/n288870.jpg")
    lavis = tmp_path / "testdev_balanced_questions.json"
    lavis.write_text(
        json.dumps(
            [
                {
                    "image": "n288870.jpg",
                    "question": "Is the table made of wood?",
                    "answer": "yes",
                    "question_id": "20968379",
                }
            ]
        )
    )
    (sample,) = load(root, "gqa", "testdev", overrides={"testdev": str(lavis)})
    assert (sample.sample_id, sample.image, sample.target) == ("20968379", official[0].image, "yes")


def test_vizwiz_images_live_in_their_split_folder(root):
    first, second = load(root, "vizwiz", "val")
    assert first.image.endswith("vizwiz/images/val/VizWiz_val_00000000.jpg") and first.target == "soup"
    assert second.target == "unanswerable"


def test_vqg_turns_the_answer_into_the_input(root):
    for name in ("vqg_vqav2", "vqg_okvqa", "vqg_aokvqa"):
        sample = load(root, name, "train")[0]
        source = load(root, name.removeprefix("vqg_"), "train")[0]
        assert sample.target == source.question and sample.extra["answer"] == source.target
        for text in fill_all(sample, "vqg"):
            assert source.target in text and source.question not in text


# ------------------------------------------------------------------------------------------ ranking


def test_vsr_true_false_candidates(root):
    false_sample, true_sample = load(root, "vsr", "test")
    assert false_sample.candidates[false_sample.label] == "false"
    assert true_sample.candidates[true_sample.label] == "true"
    assert zero_shot_instruction(true_sample, get_spec("vsr")) == (
        "Based on the image, is this statement true or false? The cat is on top of the laptop."
    )


def test_iconqa_choose_txt_with_options(root):
    first, second = load(root, "iconqa", "test")
    assert (first.candidates, first.label, first.target) == (["2", "3", "4"], 1, "3")
    assert first.image.endswith("iconqa_data/iconqa/test/choose_txt/100/image.png")
    assert zero_shot_instruction(first, get_spec("iconqa")) == (
        "Question: How many shapes are blue? Options: (a) 2 (b) 3 (c) 4. Short answer:"
    )
    assert all("(a) 2 (b) 3 (c) 4" in text for text in fill_all(first, "multiple_choice"))


def test_scienceqa_keeps_only_image_questions_with_hint_as_context(root):
    samples = load(root, "scienceqa", "test")
    assert [s.sample_id for s in samples] == ["5", "6"]  # "7" has no image
    duck = samples[1]
    assert duck.context == "Ducks live near water." and duck.target == "duck"
    assert duck.image.endswith("scienceqa/images/test/6/image.png")
    assert zero_shot_instruction(duck, get_spec("scienceqa")) == (
        "Context: Ducks live near water. Question: Which animal's feet are adapted for swimming? "
        "Options: (a) duck (b) horse. Answer:"
    )
    no_hint = fill_instruction(samples[0], "multiple_choice", random.Random(0)).instruction
    assert "(a) Maine (b) Texas (c) Ohio" in no_hint and "Context" not in no_hint


def test_visdial_rounds_with_history_and_100_way_candidates(root):
    rounds = load(root, "visdial", "val")
    assert [s.question for s in rounds] == [
        "is the photo in color?",
        "how many people are there?",
        "are they outside?",
    ]
    assert [s.candidates[s.label] for s in rounds] == [s.target for s in rounds] == ["yes", "2", "no"]
    assert rounds[0].context == "two people stand in a kitchen."
    assert rounds[2].context == (
        "two people stand in a kitchen. Q: is the photo in color? A: yes. Q: how many people are there? A: 2."
    )
    prompt = zero_shot_instruction(rounds[2], get_spec("visdial"))
    assert prompt.startswith("Dialog history: two people") and prompt.endswith(
        "are they outside? Short answer:"
    )


def test_visdial_test_split_ranks_only_the_last_round(tmp_path):
    path = tmp_path / "visdial" / "visdial_1.0_test.json"
    path.parent.mkdir()
    path.write_text(
        json.dumps(
            {
                "version": "1.0",
                "split": "test2018",
                "data": {
                    "questions": ["is it sunny", "any people"],
                    "answers": ["yes", "no", "maybe"],
                    "dialogs": [
                        {
                            "image_id": 7,
                            "caption": "a park",
                            "dialog": [
                                {"question": 0, "answer": 0},
                                {"question": 1, "answer_options": [0, 1, 2]},
                            ],
                        }
                    ],
                },
            }
        )
    )
    (sample,) = load_samples("visdial", tmp_path, "test", strict=True)
    assert sample.label is None and sample.candidates == ["yes", "no", "maybe"]
    assert sample.context == "a park. Q: is it sunny? A: yes."
    assert sample.image.endswith("VisualDialog_test2018/VisualDialog_test2018_000000000007.jpg")


def test_hatefulmemes_escaped_paths_and_labels(root):
    hateful, benign = load(root, "hatefulmemes", "dev_seen")
    assert hateful.image == str(root / "hatefulmemes/img/08291.png")
    assert (hateful.label, hateful.candidates[hateful.label]) == (1, "yes")
    assert (benign.label, benign.target) == (0, "no")
    assert zero_shot_instruction(benign, get_spec("hatefulmemes")) == (
        'This is an image with: "bravery at its finest" written on it. Is it hateful? Answer:'
    )
    assert all("bravery at its finest" in text for text in fill_all(benign, "classification"))


# ------------------------------------------------------------------------------------------ video


def test_msvd_qa_vocabulary_from_train_and_clip_names(root):
    cook, guitar = load(root, "msvd_qa", "test")
    assert cook.candidates == ["man", "cook"]  # train answers, most frequent first
    assert cook.candidates[cook.label] == "cook"
    assert guitar.label is None  # outside the vocabulary: always wrong under ranking
    assert cook.video == str(root / "msvd_qa/videos/-_aaMGK6GGw_57_61.avi")
    assert cook.candidates is guitar.candidates  # one shared vocabulary, not one copy per sample


def test_msrvtt_qa_and_ivqa(root):
    dance, car = load(root, "msrvtt_qa", "test")
    assert dance.video.endswith("msrvtt_qa/videos/video7010.mp4") and dance.candidates[dance.label] == "dance"
    onion, tool = load(root, "ivqa", "test")
    assert onion.answers == ["onion", "onion", "onions", "garlic", "onion"] and onion.target == "onion"
    assert (onion.extra["start"], onion.extra["end"]) == (12.0, 25.0)
    assert tool.question == "what tool, if any, is used" and tool.target == "knife"
    assert all(tool.question in text for text in fill_all(tool, "video_qa"))


# ------------------------------------------------------------------------------------------ LLaVA


def test_llava_every_turn_is_a_sample_with_earlier_turns_as_context(root):
    turns = load(root, "llava_conversation", "train")
    assert [s.question for s in turns] == [
        "What are the colors of the bus in the image?",
        "What feature can be seen on the back of the bus?",
        "Is the bus driving down the street or pulled off to the side?",
    ]
    assert turns[0].context is None
    assert turns[2].context == (
        "User: What are the colors of the bus in the image?\n"
        "Assistant: The bus in the image is white and red.\n"
        "User: What feature can be seen on the back of the bus?\n"
        "Assistant: The back of the bus features an advertisement."
    )
    assert turns[2].target == "The bus is driving down the street."
    for text in fill_all(turns[2], "llava"):
        assert "The back of the bus features an advertisement." in text and "<image>" not in text
    for text in fill_all(turns[0], "llava"):
        assert "Assistant: The" not in text and "history" not in text.lower()
    (detail,) = load(root, "llava_detail", "train")
    assert detail.question == "Describe the following image."


# ------------------------------------------------------------------------------------------ malformed input


def _vqav2_with_broken_question(root: Path, tmp_path: Path) -> Path:
    data = json.loads((root / "vqav2/v2_OpenEnded_mscoco_train2014_questions.json").read_text())
    del data["questions"][1]["question"]
    path = tmp_path / "questions.json"
    path.write_text(json.dumps(data))
    return path


def test_malformed_records_are_skipped_and_counted(root, tmp_path):
    path = _vqav2_with_broken_question(root, tmp_path)
    skips = SkipCounter("vqav2")
    samples = load_samples("vqav2", root, "train", overrides={"train.questions": str(path)}, skips=skips)
    assert [s.sample_id for s in samples] == ["9000"]
    assert skips.counts == {"missing field 'question'": 1}
    assert "questions.json: record 1 (question_id=9001)" in skips.summary()


def test_strict_mode_names_file_and_record(root, tmp_path):
    path = _vqav2_with_broken_question(root, tmp_path)
    with pytest.raises(
        MalformedRecordError, match=r"questions\.json: record 1 \(question_id=9001\): missing field"
    ):
        load_samples("vqav2", root, "train", overrides={"train.questions": str(path)}, strict=True)
    jsonl = tmp_path / "dev_seen.jsonl"
    jsonl.write_text('{"id": 1, "img": "img/00001.png", "label": 0, "text": "fine"}\n{"id": 2, "img": \n')
    with pytest.raises(MalformedRecordError, match=r"dev_seen\.jsonl: record line 2: invalid JSON"):
        load_samples("hatefulmemes", root, "dev_seen", overrides={"dev_seen": str(jsonl)}, strict=True)


@pytest.mark.parametrize(
    ("name", "split", "role", "mutate", "reason"),
    [
        ("scienceqa", "test", "test", lambda d: d["5"].update(answer=9), "out of range"),
        ("llava_conversation", "train", "train", lambda d: d[0]["conversations"].pop(), "human/gpt pairs"),
        (
            "visdial",
            "val",
            "val",
            lambda d: d["data"]["dialogs"][0]["dialog"][1].update(question=99),
            "outside data.questions",
        ),
        ("ocrvqa", "train", "train", lambda d: d["1931498917"]["answers"].pop(), "2 questions but 1 answers"),
        ("msrvtt_qa", "test", "test", lambda d: d[1].pop("video_id"), "missing field 'video_id'"),
    ],
)
def test_malformed_records_per_format(root, tmp_path, name, split, role, mutate, reason):
    spec_path = resolve_paths(get_spec(name), root)[role]
    data = json.loads(spec_path.read_text())
    mutate(data)
    broken = tmp_path / spec_path.name
    broken.write_text(json.dumps(data))
    skips = SkipCounter(name)
    load_samples(name, root, split, overrides={role: str(broken)}, skips=skips)
    assert skips.total == 1 and reason in next(iter(skips.counts))
    with pytest.raises(MalformedRecordError, match=reason):
        load_samples(name, root, split, overrides={role: str(broken)}, strict=True)


def test_wrong_top_level_structure_is_an_error_naming_the_file(root, tmp_path):
    path = tmp_path / "val.json"
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match=r"vizwiz: .*val\.json: top level should be a JSON list"):
        load(root, "vizwiz", "val", overrides={"val": str(path)})

"""Tiny copies of every InstructBLIP dataset, written in each dataset's official annotation format.

``write_fixture_root(root)`` lays out the registry's default paths under ``root`` with a few records
per dataset and tiny real media files (8x8 images, 4-frame videos), so readers, the sampler, the
datamodule and ``ibkit data check`` can all be tested without any download. Only some splits are
written (``FIXTURE_SPLITS``), so "missing" paths can be tested on the same root.
"""

from __future__ import annotations

import hashlib
import json
from fractions import Fraction
from pathlib import Path
from typing import Any

# dataset -> the splits this fixture writes (every other split of the spec is absent on purpose)
FIXTURE_SPLITS: dict[str, tuple[str, ...]] = {
    "coco_caption": ("train", "val"),
    "capfilt": ("train",),
    "textcaps": ("train", "val"),
    "vqav2": ("train", "val"),
    "okvqa": ("train",),
    "aokvqa": ("train", "val"),
    "ocrvqa": ("train", "val", "test"),
    "llava_conversation": ("train",),
    "llava_detail": ("train",),
    "llava_reasoning": ("train",),
    "vqg_vqav2": ("train", "val"),
    "vqg_okvqa": ("train",),
    "vqg_aokvqa": ("train", "val"),
    "nocaps": ("val",),
    "flickr30k": ("train", "val", "test"),
    "gqa": ("testdev",),
    "vsr": ("test",),
    "iconqa": ("train", "val", "test"),
    "textvqa": ("val",),
    "vizwiz": ("val",),
    "scienceqa": ("train", "val", "test", "minival"),
    "visdial": ("val",),
    "hatefulmemes": ("dev_seen",),
    "msvd_qa": ("train", "test"),
    "msrvtt_qa": ("test",),
    "ivqa": ("test",),
}


def _json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _jsonl(path: Path, records: list[dict], escape_slashes: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(record, separators=(",", ":")) for record in records]
    if escape_slashes:  # the Hateful Memes release writes "img\/01235.png"
        lines = [line.replace("/", "\\/") for line in lines]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _image(path: Path, shade: int = 0) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    color = ((40 * shade) % 256, (90 + 30 * shade) % 256, 160)
    Image.new("RGB", (8, 8), color).save(path, format="PNG" if path.suffix == ".png" else "JPEG")


def write_clip(path: Path, frames: list, rate: int, codec: str = "mpeg4") -> None:
    """Encode RGB arrays (H, W, 3) as a clip, on one thread.

    PyAV's default gives the encoder FFmpeg's pool of one slice thread per core, a pool whose kind has
    been seen to deadlock beside PyTorch (see ``ibkit.data.video``); a fixture has no use for it.
    """
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, rate)
        stream.codec_context.thread_count = 1
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _video(path: Path, frames: int = 4) -> None:
    """A 4-frame 16x16 clip (mpeg4 in .avi/.mp4); skipped silently when PyAV is not installed."""
    try:
        import av  # noqa: F401
        import numpy as np
    except ImportError:
        return
    write_clip(path, [np.full((16, 16, 3), 30 * index, dtype=np.uint8) for index in range(frames)], rate=4)


def _coco2014(root: Path, subset: str, image_id: int, shade: int = 0) -> str:
    name = f"{subset}/COCO_{subset}_{image_id:012d}.jpg"
    _image(root / "coco/images" / name, shade)
    return name


def _vqa_answers(words: list[str]) -> list[dict]:
    return [{"answer": w, "answer_confidence": "yes", "answer_id": k + 1} for k, w in enumerate(words)]


def _write_coco_family(root: Path, out: dict[str, Path]) -> None:
    # COCO Caption, Karpathy split (BLIP/LAVIS distribution)
    train_a = _coco2014(root, "train2014", 9, 1)
    restval_b = _coco2014(root, "val2014", 42, 2)
    val_c = _coco2014(root, "val2014", 391895, 3)
    out["coco_caption"] = _json(
        root / "coco_caption/coco_karpathy_train.json",
        [
            {"caption": "a cat sitting on a red couch", "image": train_a, "image_id": "coco_9"},
            {"caption": "a small cat resting on a sofa", "image": train_a, "image_id": "coco_9"},
            {"caption": "a man riding a bike down a street", "image": restval_b, "image_id": "coco_42"},
        ],
    )
    _json(
        root / "coco_caption/coco_karpathy_val.json",
        [
            {
                "image": val_c,
                "caption": ["a dog on the beach", "a brown dog runs on sand", "dog playing by the sea"],
            },
        ],
    )
    # VQAv2: official questions + annotations pair, question_id = image_id * 1000 + k
    for split, image_id, questions in (
        (
            "train",
            9,
            [
                ("what animal is this?", ["cat"] * 8 + ["kitten"] * 2),
                ("how many cats are there?", ["1"] * 6 + ["one"] * 4),
            ],
        ),
        ("val", 391895, [("what color is the dog?", ["brown"] * 7 + ["tan"] * 3)]),
    ):
        subset = f"{split}2014"
        _coco2014(root, subset, image_id)
        qs = [
            {"image_id": image_id, "question": q, "question_id": image_id * 1000 + k}
            for k, (q, _) in enumerate(questions)
        ]
        anns = [
            {
                "question_type": "what",
                "multiple_choice_answer": a[0],
                "answers": _vqa_answers(a),
                "image_id": image_id,
                "answer_type": "other",
                "question_id": image_id * 1000 + k,
            }
            for k, (_, a) in enumerate(questions)
        ]
        path = _json(
            root / f"vqav2/v2_OpenEnded_mscoco_{split}2014_questions.json",
            {
                "info": {"description": "fixture"},
                "task_type": "Open-Ended",
                "data_type": "mscoco",
                "license": {"name": "fixture"},
                "data_subtype": subset,
                "questions": qs,
            },
        )
        _json(
            root / f"vqav2/v2_mscoco_{split}2014_annotations.json",
            {"info": {}, "license": {}, "data_subtype": subset, "annotations": anns, "data_type": "mscoco"},
        )
        if split == "train":
            out["vqav2"] = out["vqg_vqav2"] = path
    # OK-VQA (train only), question_id = image_id * 10 + k, lemmatised answer + raw_answer
    okvqa_answers = ["sleep"] * 6 + ["nap"] * 4
    out["okvqa"] = out["vqg_okvqa"] = _json(
        root / "okvqa/OpenEnded_mscoco_train2014_questions.json",
        {
            "license": {},
            "data_subtype": "train2014",
            "task_type": "Open-Ended",
            "info": {},
            "data_type": "mscoco",
            "questions": [
                {"image_id": 9, "question": "what is this animal likely to do next?", "question_id": 90}
            ],
        },
    )
    _json(
        root / "okvqa/mscoco_train2014_annotations.json",
        {
            "license": {},
            "data_subtype": "train2014",
            "question_types": {"one": "Vehicles and Transportation"},
            "info": {},
            "data_type": "mscoco",
            "annotations": [
                {
                    "image_id": 9,
                    "answer_type": "other",
                    "question_type": "other",
                    "question_id": 90,
                    "confidence": 3,
                    "answers": [
                        {"answer_id": k + 1, "raw_answer": a + "ing", "answer_confidence": "yes", "answer": a}
                        for k, a in enumerate(okvqa_answers)
                    ],
                }
            ],
        },
    )
    # A-OKVQA: COCO 2017 images
    for split, image_id in (("train", 299), ("val", 208716)):
        _image(root / f"coco/images/{split}2017/{image_id:012d}.jpg")
    out["aokvqa"] = out["vqg_aokvqa"] = _json(
        root / "aokvqa/aokvqa_v1p0_train.json",
        [
            {
                "split": "train",
                "image_id": 299,
                "question_id": "22MexNkBPpdZGX6sxbxVBH",
                "question": "What is the man by the bags awaiting?",
                "choices": ["skateboarder", "train", "delivery", "cab"],
                "correct_choice_idx": 3,
                "direct_answers": [
                    "ride",
                    "ride",
                    "bus",
                    "taxi",
                    "travelling",
                    "traffic",
                    "taxi",
                    "cab",
                    "cab",
                    "his ride",
                ],
                "difficult_direct_answer": False,
                "rationales": ["A train would not be on the street."],
            },
        ],
    )
    _json(
        root / "aokvqa/aokvqa_v1p0_val.json",
        [
            {
                "split": "val",
                "image_id": 208716,
                "question_id": "3Gz7VMKBxmxUDYkHH5umPF",
                "question": "What is the dog looking at?",
                "choices": ["ball", "owner", "food", "cat"],
                "correct_choice_idx": 0,
                "direct_answers": ["ball"] * 7 + ["toy"] * 3,
                "difficult_direct_answer": False,
                "rationales": ["It waits for the ball."],
            },
        ],
    )
    # LLaVA-Instruct-150K parts: COCO train2017 file names
    _image(root / "coco/images/train2017/000000033471.jpg")
    conversation = [
        {"from": "human", "value": "What are the colors of the bus in the image?\n<image>"},
        {"from": "gpt", "value": "The bus in the image is white and red."},
        {"from": "human", "value": "What feature can be seen on the back of the bus?"},
        {"from": "gpt", "value": "The back of the bus features an advertisement."},
        {"from": "human", "value": "Is the bus driving down the street or pulled off to the side?"},
        {"from": "gpt", "value": "The bus is driving down the street."},
    ]
    out["llava_conversation"] = _json(
        root / "llava_instruct/conversation_58k.json",
        [{"id": "000000033471", "image": "000000033471.jpg", "conversations": conversation}],
    )
    out["llava_detail"] = _json(
        root / "llava_instruct/detail_23k.json",
        [
            {
                "id": "000000033471",
                "image": "000000033471.jpg",
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the following image."},
                    {
                        "from": "gpt",
                        "value": "A white and red bus drives down a city street past parked cars.",
                    },
                ],
            }
        ],
    )
    out["llava_reasoning"] = _json(
        root / "llava_instruct/complex_reasoning_77k.json",
        [
            {
                "id": "000000033471",
                "image": "000000033471.jpg",
                "conversations": [
                    {"from": "human", "value": "What challenges might the bus driver face here?\n<image>"},
                    {
                        "from": "gpt",
                        "value": "Parked cars narrow the street, so the driver must steer carefully.",
                    },
                ],
            }
        ],
    )


def _write_captioning(root: Path, out: dict[str, Path]) -> None:
    url_a = "http://example.com/images/beach.jpg"
    url_b = "http://example.com/photos/12345.png?size=large"
    out["capfilt"] = _json(
        root / "capfilt/ccs_synthetic_filtered_large.json",
        [
            {"url": url_a, "caption": "a beach with palm trees and blue water"},
            {"url": url_b, "caption": "a red car parked on a street"},
        ],
    )
    for url, suffix in ((url_a, ".jpg"), (url_b, ".png")):
        _image(root / "capfilt/images" / (hashlib.sha1(url.encode()).hexdigest() + suffix))

    # TextCaps 0.1: one entry per caption; images shared with TextVQA (train_images/)
    def textcaps_entry(
        split: str, image_id: str, caption_id: int, caption: str, references: list[str]
    ) -> dict:
        return {
            "image_id": image_id,
            "image_classes": ["Poster"],
            "flickr_original_url": "http://x/o.jpg",
            "flickr_300k_url": "http://x/3.jpg",
            "image_width": 1024,
            "image_height": 768,
            "set_name": split,
            "image_name": image_id,
            "image_path": f"train/{image_id}.jpg",
            "caption_id": caption_id,
            "caption_str": caption,
            "caption_tokens": caption.split(),
            "reference_strs": references,
            "reference_tokens": [r.split() for r in references],
        }

    refs_a = ["a sign that says stop", "a red stop sign on a pole"]
    refs_b = ["a bottle of coca cola"]
    refs_c = ["a book called deep learning", "the cover of a book titled deep learning"]
    out["textcaps"] = _json(
        root / "textcaps/TextCaps_0.1_train.json",
        {
            "dataset_type": "train",
            "dataset_name": "textcaps",
            "dataset_version": "0.1",
            "data": [
                textcaps_entry("train", "011e7e629fb9ae7b", 1, refs_a[0], refs_a),
                textcaps_entry("train", "011e7e629fb9ae7b", 2, refs_a[1], refs_a),
                textcaps_entry("train", "0a1b2c3d4e5f6071", 3, refs_b[0], refs_b),
            ],
        },
    )
    _json(
        root / "textcaps/TextCaps_0.1_val.json",
        {
            "dataset_type": "val",
            "dataset_name": "textcaps",
            "dataset_version": "0.1",
            "data": [
                textcaps_entry("val", "1a2b3c4d5e6f7081", 10, refs_c[0], refs_c),
                textcaps_entry("val", "1a2b3c4d5e6f7081", 11, refs_c[1], refs_c),
            ],
        },
    )
    for image_id in ("011e7e629fb9ae7b", "0a1b2c3d4e5f6071", "1a2b3c4d5e6f7081"):
        _image(root / f"textvqa/images/train_images/{image_id}.jpg")
    _json(
        root / "textvqa/TextVQA_Rosetta_OCR_v0.2_train.json",
        {
            "dataset_type": "train",
            "dataset_name": "textvqa",
            "dataset_version": "0.2",
            "data": [
                {
                    "image_id": "011e7e629fb9ae7b",
                    "ocr_tokens": ["STOP", "ALL", "WAY"],
                    "ocr_info": [{"word": "STOP", "bounding_box": {"top_left_x": 0.1}}],
                },
                {"image_id": "1a2b3c4d5e6f7081", "ocr_tokens": ["DEEP", "LEARNING"], "ocr_info": []},
            ],
        },
    )
    # NoCaps val (COCO-style, images under images/val/)
    oids = ["0013ea2087020901", "0036fd3ec1ad8852"]
    out["nocaps"] = _json(
        root / "nocaps/nocaps_val_4500_captions.json",
        {
            "licenses": [],
            "info": {"url": "http://nocaps.org"},
            "images": [
                {
                    "id": k,
                    "open_images_id": oid,
                    "height": 768,
                    "width": 1024,
                    "file_name": f"{oid}.jpg",
                    "coco_url": f"https://s3.amazonaws.com/nocaps/val/{oid}.jpg",
                    "license": 0,
                    "date_captured": "2018-11-06 11:04:33",
                }
                for k, oid in enumerate(oids)
            ],
            "annotations": [
                {"image_id": 0, "id": 0, "caption": "a jellyfish in dark water"},
                {"image_id": 0, "id": 1, "caption": "an orange jellyfish floating"},
                {"image_id": 1, "id": 2, "caption": "a red fire truck on a road"},
            ],
        },
    )
    for oid in oids:
        _image(root / f"nocaps/images/val/{oid}.jpg")
    # Flickr30K, Karpathy dataset_flickr30k.json (split per image)
    images = []
    for imgid, (split, sentences) in enumerate(
        (
            ("train", ["two dogs play in the grass", "dogs running on a lawn"]),
            ("val", ["a girl climbs a wall"]),
            ("test", ["a man in a red shirt sings", "a singer on stage", "someone performing music"]),
        )
    ):
        file_name = f"{1000092795 + imgid}.jpg"
        _image(root / "flickr30k/flickr30k-images" / file_name)
        sents = [
            {"tokens": s.split(), "raw": s.capitalize() + ".", "imgid": imgid, "sentid": 10 * imgid + k}
            for k, s in enumerate(sentences)
        ]
        images.append(
            {
                "sentids": [s["sentid"] for s in sents],
                "imgid": imgid,
                "sentences": sents,
                "split": split,
                "filename": file_name,
            }
        )
    out["flickr30k"] = _json(
        root / "flickr30k/dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"}
    )


def _write_reasoning_and_qa(root: Path, out: dict[str, Path]) -> None:
    # GQA test-dev balanced questions: dict keyed by question id
    out["gqa"] = _json(
        root / "gqa/testdev_balanced_questions.json",
        {
            "20968379": {
                "semantic": [{"operation": "select", "dependencies": [], "argument": "table (1)"}],
                "entailed": [],
                "equivalent": ["20968379"],
                "question": "Is the table made of wood?",
                "imageId": "n288870",
                "isBalanced": True,
                "groups": {"global": None, "local": "10c-table"},
                "answer": "yes",
                "semanticStr": "select: table",
                "annotations": {"answer": {}, "question": {"2": "1"}, "fullAnswer": {}},
                "types": {"detailed": "materialVerify", "semantic": "attr", "structural": "verify"},
                "fullAnswer": "Yes, the table is made of wood.",
            },
            "20968380": {
                "question": "What color is the cup on the left?",
                "imageId": "n161313",
                "isBalanced": True,
                "answer": "white",
                "fullAnswer": "The cup is white.",
                "types": {},
                "semantic": [],
            },
        },
    )
    for image_id in ("n288870", "n161313"):
        _image(root / f"gqa/images/{image_id}.jpg")
    # VSR zero-shot test split (validator ids stored as strings, as in the real files)
    out["vsr"] = _jsonl(
        root / "vsr/splits/zeroshot/test.jsonl",
        [
            {
                "image": "000000085637.jpg",
                "image_link": "http://images.cocodataset.org/train2017/000000085637.jpg",
                "caption": "The umbrella is under the bed.",
                "label": 0,
                "relation": "under",
                "subj": "umbrella",
                "obj": "bed",
                "annotator_id": 4,
                "vote_true_validator_id": "[]",
                "vote_false_validator_id": "[18, 2]",
            },
            {
                "image": "000000273878.jpg",
                "image_link": "http://images.cocodataset.org/val2017/000000273878.jpg",
                "caption": "The cat is on top of the laptop.",
                "label": 1,
                "relation": "on top of",
                "subj": "cat",
                "obj": "laptop",
                "annotator_id": 7,
                "vote_true_validator_id": "[3]",
                "vote_false_validator_id": "[]",
            },
        ],
    )
    for name in ("000000085637.jpg", "000000273878.jpg"):
        _image(root / "vsr/images" / name)
    # IconQA: problems.json + pid_splits.json, choose_txt images
    problems = {
        "100": {
            "question": "How many shapes are blue?",
            "choices": ["2", "3", "4"],
            "answer": 1,
            "ques_type": "choose_txt",
            "grade": "grade1",
            "label": "S1",
            "split": "test",
        },
        "101": {
            "question": "Which shape comes next?",
            "choices": ["circle", "square"],
            "answer": 0,
            "ques_type": "choose_txt",
            "grade": "prek",
            "label": "S2",
            "split": "test",
        },
        "200": {
            "question": "What time is shown?",
            "choices": ["3:00", "6:30"],
            "answer": 1,
            "ques_type": "choose_txt",
            "grade": "grade2",
            "label": "S3",
            "split": "train",
        },
    }
    out["iconqa"] = _json(root / "iconqa/iconqa_data/problems.json", problems)
    _json(
        root / "iconqa/iconqa_data/pid_splits.json",
        {
            "choose_txt_train": ["200"],
            "choose_txt_val": [],
            "choose_txt_test": ["100", "101"],
            "choose_img_test": [],
            "fill_in_blank_test": [],
        },
    )
    for pid, problem in problems.items():
        _image(root / f"iconqa/iconqa_data/iconqa/{problem['split']}/choose_txt/{pid}/image.png")
    # TextVQA 0.5.1 val + Rosetta OCR (val images live in train_images/)
    out["textvqa"] = _json(
        root / "textvqa/TextVQA_0.5.1_val.json",
        {
            "dataset_type": "val",
            "dataset_name": "textvqa",
            "dataset_version": "0.5.1",
            "data": [
                {
                    "question": "what brand is the bottle?",
                    "image_id": "003a8ae2ef43b901",
                    "image_classes": ["Bottle"],
                    "flickr_original_url": "http://x/o.jpg",
                    "flickr_300k_url": "http://x/3.jpg",
                    "image_width": 1024,
                    "image_height": 683,
                    "answers": ["coca cola"] * 6 + ["coke"] * 4,
                    "question_tokens": ["what", "brand", "is", "the", "bottle"],
                    "question_id": 34602,
                    "set_name": "val",
                },
                {
                    "question": "what number is on the jersey?",
                    "image_id": "00c359f294f7dcd9",
                    "image_classes": [],
                    "flickr_original_url": "",
                    "flickr_300k_url": "",
                    "image_width": 800,
                    "image_height": 600,
                    "answers": ["23"] * 9 + ["twenty three"],
                    "question_tokens": [],
                    "question_id": 34603,
                    "set_name": "val",
                },
            ],
        },
    )
    _json(
        root / "textvqa/TextVQA_Rosetta_OCR_v0.2_val.json",
        {
            "dataset_type": "val",
            "dataset_name": "textvqa",
            "dataset_version": "0.2",
            "data": [
                {
                    "image_id": "003a8ae2ef43b901",
                    "ocr_tokens": [f"tok{k}" for k in range(35)],
                    "ocr_info": [],
                },
            ],
        },
    )
    for image_id in ("003a8ae2ef43b901", "00c359f294f7dcd9"):
        _image(root / f"textvqa/images/train_images/{image_id}.jpg")
    # VizWiz val
    out["vizwiz"] = _json(
        root / "vizwiz/val.json",
        [
            {
                "image": "VizWiz_val_00000000.jpg",
                "question": "What is this?",
                "answers": [
                    {"answer": a, "answer_confidence": "yes"} for a in ["soup"] * 6 + ["can of soup"] * 4
                ],
                "answer_type": "other",
                "answerable": 1,
            },
            {
                "image": "VizWiz_val_00000001.jpg",
                "question": "Can you tell me what this is?",
                "answers": [{"answer": "unanswerable", "answer_confidence": "maybe"}] * 10,
                "answer_type": "unanswerable",
                "answerable": 0,
            },
        ],
    )
    for k in range(2):
        _image(root / f"vizwiz/images/val/VizWiz_val_{k:08d}.jpg")
    # ScienceQA problems.json + pid_splits.json (one text-only problem to be filtered out)
    sqa = {
        "5": {
            "question": "Which of these states is farthest north?",
            "choices": ["Maine", "Texas", "Ohio"],
            "answer": 0,
            "hint": "",
            "image": "image.png",
            "task": "closed choice",
            "grade": "grade2",
            "subject": "social science",
            "topic": "geography",
            "category": "Geography",
            "skill": "Read a map",
            "lecture": "Maps show directions.",
            "solution": "Maine is farthest north.",
            "split": "test",
        },
        "6": {
            "question": "Which animal's feet are adapted for swimming?",
            "choices": ["duck", "horse"],
            "answer": 0,
            "hint": "Ducks live near water.",
            "image": "image.png",
            "task": "closed choice",
            "grade": "grade3",
            "subject": "natural science",
            "topic": "biology",
            "category": "Adaptations",
            "skill": "Animal adaptations",
            "lecture": "",
            "solution": "",
            "split": "test",
        },
        "7": {
            "question": "What is 2 + 2?",
            "choices": ["4", "5"],
            "answer": 0,
            "hint": "",
            "image": None,
            "task": "closed choice",
            "grade": "grade1",
            "subject": "language science",
            "topic": "x",
            "category": "x",
            "skill": "x",
            "lecture": "",
            "solution": "",
            "split": "test",
        },
        "8": {
            "question": "Which material is softer?",
            "choices": ["rock", "wool"],
            "answer": 1,
            "hint": "",
            "image": "image.png",
            "task": "closed choice",
            "grade": "grade1",
            "subject": "natural science",
            "topic": "physics",
            "category": "Materials",
            "skill": "x",
            "lecture": "",
            "solution": "",
            "split": "train",
        },
    }
    out["scienceqa"] = _json(root / "scienceqa/problems.json", sqa)
    _json(
        root / "scienceqa/pid_splits.json",
        {"train": ["8"], "val": [], "test": ["5", "6", "7"], "minival": []},
    )
    for pid in ("5", "6", "8"):
        _image(root / f"scienceqa/images/{sqa[pid]['split']}/{pid}/image.png")


def _write_dialog_classification_video(root: Path, out: dict[str, Path]) -> None:
    # Visual Dialog v1.0 val (4 options per round here; the real file has 100)
    questions = ["is the photo in color", "how many people are there", "are they outside"]
    answers = ["yes", "no", "2", "3", "yes it is", "maybe"]
    rounds = [
        {"question": 0, "answer": 0, "answer_options": [1, 0, 4, 5], "gt_index": 1},
        {"question": 1, "answer": 2, "answer_options": [2, 3, 0, 1], "gt_index": 0},
        {"question": 2, "answer": 1, "answer_options": [0, 5, 4, 1], "gt_index": 3},
    ]
    out["visdial"] = _json(
        root / "visdial/visdial_1.0_val.json",
        {
            "version": "1.0",
            "split": "val2018",
            "data": {
                "dialogs": [
                    {"image_id": 185565, "caption": "two people stand in a kitchen", "dialog": rounds}
                ],
                "answers": answers,
                "questions": questions,
            },
        },
    )
    _image(root / "visdial/images/VisualDialog_val2018/VisualDialog_val2018_000000185565.jpg")
    # Hateful Memes dev_seen.jsonl, slashes escaped as in the release
    out["hatefulmemes"] = _jsonl(
        root / "hatefulmemes/dev_seen.jsonl",
        [
            {"id": 8291, "img": "img/08291.png", "label": 1, "text": "white people is this a shooting range"},
            {"id": 46971, "img": "img/46971.png", "label": 0, "text": "bravery at its finest"},
        ],
        escape_slashes=True,
    )
    for meme_id in (8291, 46971):
        _image(root / f"hatefulmemes/img/{meme_id:05d}.png")
    # MSVD-QA: {split}_qa.json + youtube_mapping.txt, clips named <youtubeid>_<start>_<end>.avi
    clips = {1: "-4wsuPCjDBc_5_15", 1301: "-_aaMGK6GGw_57_61"}
    (root / "msvd_qa").mkdir(parents=True, exist_ok=True)
    (root / "msvd_qa/youtube_mapping.txt").write_text(
        "".join(f"{clip} vid{number}\n" for number, clip in clips.items()), encoding="utf-8"
    )
    _json(
        root / "msvd_qa/train_qa.json",
        [
            {"answer": "man", "id": 0, "question": "who is cooking?", "video_id": 1},
            {"answer": "cook", "id": 1, "question": "what is the man doing?", "video_id": 1},
            {"answer": "man", "id": 2, "question": "who stirs the pot?", "video_id": 1},
        ],
    )
    out["msvd_qa"] = _json(
        root / "msvd_qa/test_qa.json",
        [
            {"answer": "cook", "id": 30933, "question": "what is a man doing?", "video_id": 1301},
            {"answer": "guitar", "id": 30934, "question": "what is played?", "video_id": 1301},
        ],
    )
    for clip in clips.values():
        _video(root / f"msvd_qa/videos/{clip}.avi")
    # MSRVTT-QA test (no train file: the vocabulary falls back to the test answers)
    out["msrvtt_qa"] = _json(
        root / "msrvtt_qa/test_qa.json",
        [
            {
                "answer": "dance",
                "category_id": 3,
                "id": 158581,
                "question": "what are people doing?",
                "video_id": 7010,
            },
            {"answer": "car", "category_id": 9, "id": 158582, "question": "what is shown?", "video_id": 7011},
        ],
    )
    for number in (7010, 7011):
        _video(root / f"msrvtt_qa/videos/video{number}.mp4")
    # iVQA test.csv
    ivqa = root / "ivqa/test.csv"
    ivqa.parent.mkdir(parents=True, exist_ok=True)
    out["ivqa"] = ivqa
    ivqa.write_text(
        "video_id,start,end,question,answer1,answer2,answer3,answer4,answer5,type\n"
        "3ZRxJDH3uS0,12,25,what is the person cutting,onion,onion,onions,garlic,onion,0\n"
        '_hbbfOIXKTE,0,9.5,"what tool, if any, is used",knife,knife,knife,scissors,blade,0\n',
        encoding="utf-8",
    )
    for video_id in ("3ZRxJDH3uS0", "_hbbfOIXKTE"):
        _video(root / f"ivqa/videos/{video_id}.mp4")


def write_fixture_root(root: Path) -> dict[str, Path]:
    """Write all 26 datasets under ``root``; returns dataset name -> its first annotation file written."""
    root = Path(root)
    out: dict[str, Path] = {}
    _write_coco_family(root, out)
    _write_captioning(root, out)
    _write_reasoning_and_qa(root, out)
    _write_dialog_classification_video(root, out)
    _json(
        root / "ocrvqa/dataset.json",
        {
            "1931498917": {
                "imageURL": "http://ecx.images-amazon.com/images/I/51Dr0ZDAQ1L.jpg",
                "questions": ["Who wrote this book?", "What is the title of this book?"],
                "answers": ["Jane Doe", "Cooking at Home"],
                "title": "Cooking at Home",
                "authorName": "Jane Doe",
                "genre": "Cookbooks, Food & Wine",
                "split": 1,
            },
            "B00ZZZ0001": {
                "imageURL": "http://ecx.images-amazon.com/images/I/41abc.png",
                "questions": ["Is this a comic book?"],
                "answers": ["No"],
                "title": "Tax Law",
                "authorName": "A. Smith",
                "genre": "Law",
                "split": 2,
            },
            "0000000003": {
                "imageURL": "http://ecx.images-amazon.com/images/I/41xyz.jpg",
                "questions": ["What is the genre of this book?"],
                "answers": ["Travel"],
                "title": "Go",
                "authorName": "B. Jones",
                "genre": "Travel",
                "split": 3,
            },
        },
    )
    out["ocrvqa"] = root / "ocrvqa/dataset.json"
    for name in ("1931498917.jpg", "B00ZZZ0001.png", "0000000003.jpg"):
        _image(root / "ocrvqa/images" / name)
    return out

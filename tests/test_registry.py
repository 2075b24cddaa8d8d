"""The dataset registry, templates and ``ibkit data list/check``."""

from __future__ import annotations

import random
import re
import string
import sys
from pathlib import Path

import pytest
from fixtures_datasets import FIXTURE_SPLITS, write_fixture_root

from ibkit.app import main
from ibkit.data import registry
from ibkit.data.catalog import check_root, dataset_rows, format_check
from ibkit.data.registry import (
    FAMILIES,
    DatasetSpec,
    get_spec,
    list_specs,
    load_samples,
    register,
    resolve_paths,
)
from ibkit.data.sample import Sample
from ibkit.data.templates import (
    TEMPLATES,
    fill_instruction,
    format_options,
    template_rng,
    zero_shot_instruction,
)

# The paper's split of the 26 datasets (InstructBLIP Figure 2 / reference/instructblip.md).
HELD_IN = {
    "coco_caption",
    "capfilt",
    "textcaps",
    "vqav2",
    "okvqa",
    "aokvqa",
    "ocrvqa",
    "llava_conversation",
    "llava_detail",
    "llava_reasoning",
    "vqg_vqav2",
    "vqg_okvqa",
    "vqg_aokvqa",
}
# The zero-shot protocol table of reference/instructblip.md: dataset -> (metric, eval mode)
PROTOCOL = {
    "nocaps": ("cider", "generate"),
    "flickr30k": ("cider", "generate"),
    "gqa": ("accuracy", "generate"),
    "vsr": ("accuracy", "rank"),
    "iconqa": ("accuracy", "rank"),
    "textvqa": ("vqa_accuracy", "generate"),
    "vizwiz": ("vqa_accuracy", "generate"),
    "scienceqa": ("accuracy", "rank"),
    "visdial": ("mrr", "rank"),
    "hatefulmemes": ("auc", "rank"),
    "msvd_qa": ("accuracy", "rank"),
    "msrvtt_qa": ("accuracy", "rank"),
    "ivqa": ("ivqa_accuracy", "generate"),
}
ENTIRELY_HELD_OUT_FAMILIES = {
    "visual_reasoning",
    "video_qa",
    "visual_conversational_qa",
    "image_classification",
}


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_fixture_root(root)
    return root


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def _toy_spec(name: str = "toy", suite: str = "instructblip", **changes) -> DatasetSpec:
    fields = dict(
        name=name,
        family="image_qa",
        held_in=True,
        files={"train": "toy/train.json", "images": "toy/img"},
        reader=lambda paths, split: [],
        splits=("train",),
        metric="accuracy",
        eval_mode="generate",
        prompt="Question: {question} Short answer:",
        templates="vqa",
        suite=suite,
    )
    return DatasetSpec(**(fields | changes))


# ------------------------------------------------------------------------------------------ registry


def test_instructblip_suite_has_the_papers_26_datasets_in_11_families():
    specs = list_specs(suite="instructblip")
    assert len(specs) == 26
    assert {s.name for s in specs if s.held_in} == HELD_IN
    assert len([s for s in specs if not s.held_in]) == 13
    assert {s.family for s in specs} == set(FAMILIES) and len(FAMILIES) == 11
    held_in_families = {s.family for s in specs if s.held_in}
    assert ENTIRELY_HELD_OUT_FAMILIES.isdisjoint(held_in_families)
    assert {s.family for s in specs if not s.held_in} >= ENTIRELY_HELD_OUT_FAMILIES


def test_held_out_protocol_matches_the_paper():
    for name, (metric, eval_mode) in PROTOCOL.items():
        spec = get_spec(name)
        assert (spec.metric, spec.eval_mode) == (metric, eval_mode), name
        assert spec.eval_split in spec.splits
        if eval_mode == "generate":
            assert spec.generation["num_beams"] == 5
    assert get_spec("msvd_qa").modality == get_spec("ivqa").modality == "video"
    assert get_spec("nocaps").generation["min_new_tokens"] == 10  # captions are long; VQA answers are short
    assert get_spec("gqa").generation["max_new_tokens"] == 10


def test_every_spec_names_an_existing_template_set_and_a_renderable_prompt():
    sample = Sample(
        "x",
        "1",
        question="q",
        answers=["a"],
        candidates=["a", "b"],
        context="c",
        ocr_tokens=["t"],
        extra={"answer": "a"},
    )
    for spec in list_specs(suite="instructblip"):
        assert spec.templates in TEMPLATES, spec.name
        assert "{" not in zero_shot_instruction(sample, spec), spec.name


def test_get_spec_unknown_name_lists_known_names():
    with pytest.raises(KeyError, match="unknown dataset 'vqa3'.*coco_caption.*vqav2"):
        get_spec("vqa3")


def test_register_rejects_duplicates_and_bad_fields(isolated_registry):
    register(_toy_spec())
    with pytest.raises(ValueError, match="already registered"):
        register(_toy_spec())
    with pytest.raises(ValueError, match="unknown family"):
        _toy_spec(family="captioning")
    with pytest.raises(ValueError, match="unknown metric"):
        _toy_spec(metric="bleu")
    with pytest.raises(ValueError, match="split 'val' has no file role"):
        _toy_spec(splits=("train", "val"))


def test_list_specs_imports_optional_suite_modules_lazily(isolated_registry, tmp_path, monkeypatch):
    module = tmp_path / "fake_shapes_suite.py"
    module.write_text(
        "from ibkit.data.registry import DatasetSpec, register\n"
        "register(DatasetSpec(name='fake_suite_vqa', family='image_qa', held_in=True,\n"
        "    files={'train': 'shapes/train.jsonl'}, reader=lambda paths, split: [], splits=('train',),\n"
        "    metric='accuracy', eval_mode='generate', prompt='{question}', templates='vqa', suite='fake'))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "OPTIONAL_SUITE_MODULES", ("fake_shapes_suite", "ibkit.data.no_such_suite"))
    monkeypatch.delitem(sys.modules, "fake_shapes_suite", raising=False)
    assert [s.name for s in list_specs(suite="fake")] == ["fake_suite_vqa"]
    assert len(list_specs(suite="instructblip")) == 26
    assert get_spec("fake_suite_vqa").suite == "fake"


def test_resolve_paths_with_overrides(tmp_path):
    spec = get_spec("vqav2")
    custom = tmp_path / "elsewhere" / "q.json"
    paths = resolve_paths(spec, tmp_path, {"val.questions": str(custom), "images": "coco2014"})
    assert paths["val.questions"] == custom
    assert paths["images"] == tmp_path / "coco2014"
    assert paths["train.annotations"] == tmp_path / "vqav2/v2_mscoco_train2014_annotations.json"
    with pytest.raises(KeyError, match="unknown file role.*'questions'"):
        resolve_paths(spec, tmp_path, {"questions": "x"})


def test_load_samples_missing_file_names_dataset_and_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_samples("okvqa", tmp_path, "val")
    expected = tmp_path / "okvqa" / "OpenEnded_mscoco_val2014_questions.json"
    assert "okvqa" in str(error.value) and str(expected) in str(error.value)
    with pytest.raises(ValueError, match="unknown split 'dev'.*'train', 'val'"):
        load_samples("okvqa", tmp_path, "dev")


def test_optional_roles_may_be_missing(fixture_root, tmp_path):
    # TextVQA's OCR file is optional: without it the prompt simply has no OCR part
    samples = load_samples(
        "textvqa", fixture_root, "val", overrides={"val.ocr": str(tmp_path / "absent.json")}
    )
    assert samples and all(s.ocr_tokens is None for s in samples)
    prompt = zero_shot_instruction(samples[0], get_spec("textvqa"))
    assert prompt == f"Question: {samples[0].question} Short answer:"


# ------------------------------------------------------------------------------------------ templates


def _uses(template: str) -> set[str]:
    return {
        name
        for _, name, _, _ in string.Formatter().parse(template.replace("[[", "").replace("]]", ""))
        if name
    }


def test_template_sets_follow_the_papers_rules():
    assert (len(TEMPLATES["caption"]), len(TEMPLATES["vqa"]), len(TEMPLATES["vqg"])) == (13, 10, 6)  # Table 5
    own = set(TEMPLATES) - {"caption", "vqa", "vqg"}
    assert own >= {
        "caption_ocr",
        "vqa_ocr",
        "multiple_choice",
        "dialog",
        "classification",
        "video_qa",
        "llava",
    }
    short = re.compile(r"short|brief|few words|no more than|one or two words", re.IGNORECASE)
    for name, templates in TEMPLATES.items():
        assert len(set(templates)) == len(templates), name
        if name in own:
            assert 10 <= len(templates) <= 15, name
        if name not in ("llava", "vqg"):  # only some templates ask for a short answer
            asking = sum(bool(short.search(t)) for t in templates)
            assert 0 < asking < len(templates), name
        for template in templates:
            assert _uses(template) <= {"question", "answer", "options", "context", "ocr", "text"}
            assert "<Image>" not in template
    for template in TEMPLATES["caption_ocr"] + TEMPLATES["vqa_ocr"]:
        assert "{ocr}" in template
    for template in TEMPLATES["multiple_choice"]:
        assert "{options}" in template and "{question}" in template
    for template in TEMPLATES["vqg"]:
        assert "{answer}" in template


def test_format_options():
    assert format_options(["red", "blue", "green"]) == "(a) red (b) blue (c) green"
    assert format_options([str(k) for k in range(28)]).endswith("(z) 25 (aa) 26 (ab) 27")


def test_fill_instruction_is_seeded_reproducible_and_does_not_mutate():
    sample = Sample("vqav2", "1", question="what is it?", answers=["cat", "dog", "cat"])
    first = [fill_instruction(sample, "vqa", template_rng(7, "vqav2", k)).instruction for k in range(40)]
    again = [fill_instruction(sample, "vqa", template_rng(7, "vqav2", k)).instruction for k in range(40)]
    assert first == again
    assert len(set(first)) > 3  # different keys reach different templates
    filled = fill_instruction(sample, "vqa", random.Random(0))
    assert filled.target == "cat" and "what is it?" in filled.instruction
    assert sample.instruction is None and sample.target is None


def test_ocr_segment_is_dropped_when_there_are_no_tokens():
    with_ocr = Sample("textvqa", "1", question="what brand?", answers=["nike"], ocr_tokens=["NIKE", "JUST"])
    without = Sample("textvqa", "2", question="what brand?", answers=["nike"])
    for seed in range(30):
        assert "NIKE, JUST" in fill_instruction(with_ocr, "vqa_ocr", random.Random(seed)).instruction
        text = fill_instruction(without, "vqa_ocr", random.Random(seed)).instruction
        assert "what brand?" in text and "{" not in text and ":." not in text and not text.startswith(".")


def test_caption_target_is_one_of_the_references_chosen_by_the_seed():
    sample = Sample("coco_caption", "1", answers=["a cat", "a dog", "a bird"])
    targets = {fill_instruction(sample, "caption", random.Random(seed)).target for seed in range(30)}
    assert targets == {"a cat", "a dog", "a bird"}


# ------------------------------------------------------------------------------------------ catalog


def test_data_list_table():
    rows = dataset_rows("instructblip")
    assert len(rows) == 26
    by_name = {row["name"]: row for row in rows}
    assert by_name["visdial"]["split"] == "held-out" and by_name["visdial"]["metric"] == "mrr"
    assert by_name["vqg_okvqa"]["family"] == "image_question_generation"


def test_data_check_reports_found_counts_and_exact_missing_paths(fixture_root, capsys):
    results = {r.name: r for r in check_root(fixture_root)}
    assert set(results) == {s.name for s in list_specs("instructblip")}
    for name, splits in FIXTURE_SPLITS.items():
        for split in results[name].splits:
            assert (split.status == "found") == (split.split in splits), (name, split.split)
    assert results["vqav2"].status == "found"
    counts = {s.split: s.count for s in results["coco_caption"].splits}
    assert counts["train"] == len(load_samples("coco_caption", fixture_root, "train")) == 3
    assert counts["val"] == 1
    nocaps_test = next(s for s in results["nocaps"].splits if s.split == "test")
    assert nocaps_test.missing == [fixture_root / "nocaps" / "nocaps_test_image_info.json"]
    okvqa_val = next(s for s in results["okvqa"].splits if s.split == "val")
    assert set(okvqa_val.missing) == {
        fixture_root / "okvqa/OpenEnded_mscoco_val2014_questions.json",
        fixture_root / "okvqa/mscoco_val2014_annotations.json",
    }
    report = format_check(list(results.values()))
    assert f"test: missing {fixture_root / 'nocaps' / 'nocaps_test_image_info.json'}" in report
    assert main(["data", "check", "--root", str(fixture_root), "--dataset", "vsr"]) == 0
    assert "test: found, 2 samples" in capsys.readouterr().out


def test_data_check_on_an_empty_root_and_a_broken_file(tmp_path, capsys):
    assert main(["data", "check", "--root", str(tmp_path), "--dataset", "gqa"]) == 1
    assert str(tmp_path / "gqa" / "testdev_balanced_questions.json") in capsys.readouterr().out
    (tmp_path / "gqa").mkdir()
    (tmp_path / "gqa" / "testdev_balanced_questions.json").write_text("{not json")
    result = check_root(tmp_path, names=["gqa"])[0]
    assert result.status == "error"
    assert "testdev_balanced_questions.json is not valid JSON" in format_check([result])


def test_data_check_counts_malformed_records(tmp_path):
    path = tmp_path / "hatefulmemes" / "dev_seen.jsonl"
    path.parent.mkdir()
    path.write_text(
        '{"id": 1, "img": "img/00001.png", "label": 0, "text": "ok"}\n{broken\n'
        '{"id": 3, "img": "img/00003.png", "label": 7, "text": "bad label"}\n'
    )
    result = check_root(tmp_path, names=["hatefulmemes"])[0]
    dev_seen = next(s for s in result.splits if s.split == "dev_seen")
    assert (dev_seen.count, dev_seen.skipped) == (1, 2)
    assert result.media_found == {"images": True}  # the data root folder itself holds img/


def test_aokvqa_multiple_choice_variant_ranks_the_official_choices(tmp_path):
    from ibkit.data.templates import zero_shot_instruction

    write_fixture_root(tmp_path)
    direct = registry.load_samples("aokvqa", tmp_path, "val")
    mc = registry.load_samples("aokvqa_mc", tmp_path, "val")
    spec = registry.get_spec("aokvqa_mc")
    assert spec.suite == "finetune" and spec.eval_mode == "rank" and spec.metric == "accuracy"
    assert [s.candidates for s in mc] == [s.candidates for s in direct] and all(len(s.candidates) == 4 for s in mc)
    assert all(0 <= s.label < 4 for s in mc)
    assert "(a) " + mc[0].candidates[0] in zero_shot_instruction(mc[0], spec)
    assert "aokvqa_mc" not in {s.name for s in registry.list_specs("instructblip")}

"""Evaluation metrics: CIDEr-D and PTB tokenisation against pycocoevalcap (and its Java tokenizer), the
official VQA accuracy on hand-worked cases, iVQA, AUC, MRR, top-1 accuracy, the factory, and DDP sync."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ibkit.eval.metrics import (
    CIDEr,
    IVQAAccuracy,
    MeanReciprocalRank,
    TopOneAccuracy,
    VQAAccuracy,
    build_metric,
    cider_d,
    normalize_vqa_answer,
    vqa_accuracy,
    vqa_process_punctuation,
)
from ibkit.eval.ptb_tokenizer import ptb_tokenize_lines, tokenize_captions
from ibkit.metrics import BinaryAUC as ReexportedAUC
from ibkit.metrics import CIDEr as ReexportedCIDEr

# --------------------------------------------------------------------------------------------------------
# Random caption sets: case, punctuation, apostrophes, hyphens, numbers, abbreviations, a little Unicode.
# --------------------------------------------------------------------------------------------------------
_WORDS = [
    "a", "an", "the", "man", "woman", "dog", "cat", "dogs", "two", "three", "people", "sitting", "on", "of",
    "with", "in", "next", "to", "red", "blue", "large", "small", "street", "table", "pizza", "train", "giraffe",
    "skateboard", "kitchen", "snow", "player", "field", "water", "boat", "sign", "clock", "bird",
]  # fmt: skip
_SPECIAL = [
    "don't", "can't", "isn't", "it's", "man's", "dogs'", "I'm", "they're", "we'll", "o'clock", "'90s",
    "cannot", "gonna", "U.S.", "Mr.", "Dr.", "St.", "e.g.", "etc.", "vs.", "a.m.", "No.", "Inc.", "I.",
    "x-ray", "t-shirt", "well-known", "black-and-white", "3-year-old", "mid-1990s", "1/2", "3 1/2", "3.5",
    "1,000", "10:30", "20s", "2nd", "5km", "$5", "50%", "&", "and/or", "w/", "#1", "(", ")", "[", "]", '"',
    "'", "`", "--", "-", "...", "\u2026", "\u2014", "\u201cquoted\u201d", "\u2018single\u2019", "caf\u00e9",
    "na\u00efve", "it\u2019s", "\u00bd", "C++", "AT&T", "hot_dog", "a+b", ":)", ";", ":", "!", "?", "?!",
    "y'all", "'em", "rock'n'roll", "O'Neil", "Jan.", "Calif.", "www.example.com", "me@x.com", "<b>", "....",
    ". . .", "(650) 555-1212", "9/11/2001", "-5", "*", "=", "/", "<", ">", "{", "}", "@home", "#tag", "\u00a3",
]  # fmt: skip
_AFTER = [".", ",", "!", "?", ";", ":", "...", "'", '"', ")", "'s", "-", "--"]
_BEFORE = ['"', "'", "(", "[", "`", "\u201c", "-", "$", "#"]


def _random_caption(rng: random.Random) -> str:
    words = []
    for _ in range(rng.randint(1, 14)):
        roll = rng.random()
        word = (
            rng.choice(_WORDS)
            if roll < 0.6
            else rng.choice(_SPECIAL)
            if roll < 0.9
            else str(rng.randint(0, 999))
        )
        case = rng.random()
        word = word.capitalize() if case < 0.15 else word.upper() if case < 0.2 else word
        if rng.random() < 0.1:
            word = rng.choice(_BEFORE) + word
        if rng.random() < 0.2:
            word += rng.choice(_AFTER)
        words.append(word + rng.choice([" "] * 10 + ["", "  ", "\t"]))
    text = "".join(words).strip()
    if text and rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    return text + rng.choice(["", ".", " .", "!", "?"])


@pytest.fixture(scope="module")
def caption_sets() -> tuple[list[str], list[list[str]]]:
    rng = random.Random(1234)
    preds = [_random_caption(rng) for _ in range(300)]
    refs = [[_random_caption(rng) for _ in range(rng.randint(1, 5))] for _ in range(300)]
    for i in range(0, 300, 5):  # some exact hits, so that high-order n-grams match too
        refs[i][rng.randrange(len(refs[i]))] = preds[i]
    return preds, refs


def _java_or_skip() -> None:
    if shutil.which("java") is None:
        pytest.skip("java is not on PATH: the comparison with Stanford PTBTokenizer (pycocoevalcap) needs it")


@pytest.fixture
def utf8_java(monkeypatch: pytest.MonkeyPatch) -> None:
    """Java writes its stdout in the locale's charset; make it UTF-8 whatever the machine's locale."""
    _java_or_skip()
    monkeypatch.setenv(
        "JAVA_TOOL_OPTIONS", "-Dfile.encoding=UTF-8 -Dsun.stdout.encoding=UTF-8 -Dstdout.encoding=UTF-8"
    )


def _java_ptb_lines(lines: list[str], tmp_path: Path) -> list[str]:
    """Stanford PTBTokenizer from pycocoevalcap's jar, run as pycocoevalcap runs it, one line per input."""
    ptb = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    jar = Path(ptb.__file__).with_name(ptb.STANFORD_CORENLP_3_4_1_JAR)
    source = tmp_path / "captions.txt"
    source.write_bytes("\n".join(lines).encode("utf-8"))
    cmd = [
        "java",
        "-cp",
        str(jar),
        "edu.stanford.nlp.process.PTBTokenizer",
        "-preserveLines",
        "-lowerCase",
        str(source),
    ]
    out = subprocess.run(cmd, capture_output=True, check=True, timeout=120).stdout.decode("utf-8")
    return out.split("\n")[: len(lines)]


# --------------------------------------------------------------------------------------------------------
# PTB tokenisation
# --------------------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("utf8_java")
def test_ptb_tokens_match_stanford_tokenizer(caption_sets, tmp_path: Path) -> None:
    preds, refs = caption_sets
    lines = [r for group in refs for r in group] + preds
    java = _java_ptb_lines(lines, tmp_path)
    ours = ptb_tokenize_lines(lines)
    mismatches = [
        (line, java_line, " ".join(tokens))
        for line, java_line, tokens in zip(lines, java, ours)
        if (java_line.split(" ") if java_line else []) != tokens
    ]
    assert not mismatches, f"{len(mismatches)} lines differ, first ones: {mismatches[:5]}"


@pytest.mark.usefixtures("utf8_java")
def test_tokenize_captions_matches_pycocoevalcap(caption_sets) -> None:
    ptb = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    preds, refs = caption_sets
    try:
        theirs = ptb.PTBTokenizer().tokenize(
            {i: [{"caption": r} for r in group] for i, group in enumerate(refs)}
        )
    except OSError as err:  # it writes its temporary file next to the jar
        pytest.skip(f"pycocoevalcap's PTBTokenizer cannot run here: {err}")
    ours = tokenize_captions([r for group in refs for r in group])
    flat_theirs = [t for i in range(len(refs)) for t in theirs[i]]
    assert ours == flat_theirs


def test_ptb_conventions_without_java() -> None:
    # Penn Treebank conventions: clitics split off ("do n't", "dog 's"), brackets spelled out (and
    # lower-cased by -lowerCase), opening/closing double quotes as `` and '', "cannot" split, a
    # sentence-final abbreviation keeps its period and a separate period follows, numbers stay whole.
    lines = [
        "Don't touch the dog's (red) ball.",
        '"Cannot" stop',
        "Made in the U.S. The end",
        "1,000 x 3.5 km",
    ]
    assert ptb_tokenize_lines(lines) == [
        ["do", "n't", "touch", "the", "dog", "'s", "-lrb-", "red", "-rrb-", "ball", "."],
        ["``", "can", "not", "''", "stop"],
        ["made", "in", "the", "u.s.", ".", "the", "end"],
        ["1,000", "x", "3.5", "km"],
    ]
    # pycocoevalcap drops "." "``" "''" ... but not the lower-cased bracket names.
    assert tokenize_captions(lines) == [
        "do n't touch the dog 's -lrb- red -rrb- ball",
        "can not stop",
        "made in the u.s. the end",
        "1,000 x 3.5 km",
    ]


# --------------------------------------------------------------------------------------------------------
# CIDEr-D
# --------------------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("utf8_java")
def test_cider_matches_pycocoevalcap(caption_sets) -> None:
    ptb = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    cider = pytest.importorskip("pycocoevalcap.cider.cider")
    preds, refs = caption_sets
    tokenizer = ptb.PTBTokenizer()
    try:
        gts = tokenizer.tokenize({i: [{"caption": r} for r in group] for i, group in enumerate(refs)})
        res = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(preds)})
    except OSError as err:
        pytest.skip(f"pycocoevalcap's PTBTokenizer cannot run here: {err}")
    expected, expected_per_image = cider.Cider().compute_score(gts, res)

    metric = CIDEr()
    metric.update(preds[:100], refs[:100])  # several updates, as batches arrive
    metric.update(preds[100:], refs[100:])
    value = metric.compute()
    assert value.dtype == torch.float64
    assert abs(float(value) - expected) < 1e-6
    assert expected > 0.05  # the sets share words: a degenerate all-zero comparison would prove nothing

    corpus, per_image = cider_d([res[i][0] for i in range(len(preds))], [gts[i] for i in range(len(refs))])
    assert abs(corpus - expected) < 1e-9
    assert max(abs(a - b) for a, b in zip(per_image, expected_per_image)) < 1e-9


def test_cider_hand_worked_example() -> None:
    # Two images, so idf = log(2) - log(df) = log(2) for every reference n-gram (each occurs in one image).
    # Image 1: candidate "a b" equals its only reference: cosine 1 for n = 1, 2 and 0 for n = 3, 4 (no such
    #   n-grams), equal lengths (no penalty) -> mean 0.5 -> x10 = 5.
    # Image 2: candidate "c" vs reference "c d": unigram cosine log2^2 / (log2 * sqrt(2) log2) = 1/sqrt(2);
    #   no bigrams in the candidate; length = number of bigrams: 0 vs 1 -> penalty exp(-1 / (2 * 6^2)).
    #   Score = 10 * (1/sqrt(2)) * exp(-1/72) / 4.
    expected = (5.0 + 10 * math.exp(-1 / 72) / math.sqrt(2) / 4) / 2
    corpus, per_image = cider_d(["a b", "c"], [["a b"], ["c d"]])
    assert per_image[0] == pytest.approx(5.0, abs=1e-12)
    assert corpus == pytest.approx(expected, abs=1e-12)
    metric = CIDEr(tokenize=False)
    metric.update(["a b", "c"], [["a b"], ["c d"]])
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-12)
    # With tokenisation, case and the punctuation tokens pycocoevalcap removes make no difference.
    tokenized = CIDEr()
    tokenized.update(["A B!", "C ."], [["a, b"], ['"c" d']])
    assert float(tokenized.compute()) == pytest.approx(expected, abs=1e-12)


def test_cider_rejects_bad_input() -> None:
    metric = CIDEr()
    with pytest.raises(ValueError, match="targets has 1 entries but preds has 2"):
        metric.update(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match=r"targets\[1\] is empty"):
        metric.update(["a", "b"], [["a"], []])
    with pytest.raises(TypeError, match=r"preds\[0\] must be a string"):
        metric.update([3], [["a"]])
    with pytest.raises(RuntimeError, match="before any update"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics' own warning about the same thing
        CIDEr().compute()


# --------------------------------------------------------------------------------------------------------
# VQA accuracy
# --------------------------------------------------------------------------------------------------------
def test_vqa_answer_normalisation() -> None:
    # Number words -> digits, articles dropped, lower-cased, trailing period dropped.
    assert normalize_vqa_answer("The Two Dogs.") == "2 dogs"
    assert normalize_vqa_answer("none") == "0"
    # A mark glued to letters becomes a space; next to a space it is deleted.
    assert normalize_vqa_answer("hot-dog") == "hot dog"
    assert normalize_vqa_answer("yes !") == "yes"
    # A digit-comma-digit anywhere makes every mark vanish; a period before a digit stays.
    assert vqa_process_punctuation("1,000") == "1000"
    assert normalize_vqa_answer("3.5") == "3.5"
    # Contractions typed without apostrophe are fixed; ':' and "'" are not in the official list.
    assert normalize_vqa_answer("dont know") == "don't know"
    assert normalize_vqa_answer("it's 10:30") == "it's 10:30"
    assert normalize_vqa_answer("  an\tapple\n") == "apple"


def test_vqa_accuracy_hand_worked() -> None:
    # m answers (of n) match the prediction; leaving out a matching answer leaves m-1 matches, leaving out
    # another one leaves m: accuracy = (m * min(1, (m-1)/3) + (n-m) * min(1, m/3)) / n.
    ten_twos = ["2"] * 10
    assert vqa_accuracy("two", ten_twos) == pytest.approx(1.0)  # "two" -> "2", all 10 match
    # m = 3 of 10: (3 * 2/3 + 7 * 1) / 10 = 0.9 ("Two dogs." -> "2 dogs")
    assert vqa_accuracy("Two dogs.", ["2 dogs"] * 3 + ["dogs"] * 7) == pytest.approx(0.9)
    # m = 2 of 10, article removed from the prediction: (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    assert vqa_accuracy("a red car", ["red car"] * 2 + ["blue car"] * 8) == pytest.approx(0.6)
    # m = 1 of 10, contraction fixed: (1 * 0 + 9 * 1/3) / 10 = 0.3
    assert vqa_accuracy("dont know", ["don't know"] + ["no"] * 9) == pytest.approx(0.3)
    # m = 4 of 10: every left-out subset still holds >= 3 matches -> 1
    assert vqa_accuracy("yes", ["yes"] * 4 + ["no"] * 6) == pytest.approx(1.0)
    # differing references get processPunctuation only: "yes!" -> "yes " (mark glued to a letter becomes a
    # space, which nothing strips), so it never equals the prediction's "yes" -> 0
    assert vqa_accuracy("yes", ["yes!"] * 4 + ["no"] * 6) == 0.0
    # fewer than 10 answers, n = 3, m = 2: (2 * 1/3 + 1 * 2/3) / 3 = 4/9
    assert vqa_accuracy("cat", ["cat", "cat", "dog"]) == pytest.approx(4 / 9)
    # a single answer: leaving it out leaves nothing to match -> 0 (as the official loop gives)
    assert vqa_accuracy("cat", ["cat"]) == 0.0
    # official: identical references are left untouched, so a raw "Two" never equals the prediction's "2";
    # "full" normalises them like the prediction.
    assert vqa_accuracy("two", ["Two"] * 10) == 0.0
    assert vqa_accuracy("two", ["Two"] * 10, normalize_answers="full") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least one reference answer"):
        vqa_accuracy("cat", [])


def _official_loop(pred: str, answers: list[str]) -> float:
    """A literal transcription of the official loop over answer records (dicts with unique ids)."""
    records = [{"answer": a, "answer_id": i} for i, a in enumerate(answers)]
    if len({r["answer"] for r in records}) > 1:
        for record in records:
            record["answer"] = vqa_process_punctuation(record["answer"])
    res = normalize_vqa_answer(pred)
    accs = []
    for left_out in records:
        others = [r for r in records if r != left_out]
        accs.append(min(1, float(len([r for r in others if r["answer"] == res])) / 3))
    return sum(accs) / len(accs)


def test_vqa_accuracy_matches_literal_official_loop() -> None:
    rng = random.Random(7)
    pool = [
        "2",
        "two",
        "yes",
        "no",
        "red",
        "a red car",
        "red car",
        "hot-dog",
        "hot dog",
        "1,000",
        "1000",
        "cat",
    ]
    for _ in range(200):
        answers = [rng.choice(pool) for _ in range(rng.randint(1, 10))]
        pred = rng.choice(pool)
        assert vqa_accuracy(pred, answers) == pytest.approx(_official_loop(pred, answers), abs=1e-12)


def test_vqa_accuracy_metric_mean() -> None:
    metric = VQAAccuracy()
    metric.update(["two", "a red car"], [["2"] * 10, ["red car"] * 2 + ["blue car"] * 8])
    metric.update(["dont know"], [["don't know"] + ["no"] * 9])
    assert float(metric.compute()) == pytest.approx((1.0 + 0.6 + 0.3) / 3)


def test_ivqa_accuracy() -> None:
    metric = IVQAAccuracy()
    answers = ["2", "two", "3", "four", "5"]  # normalised: 2, 2, 3, 4, 5
    # "Two" -> 2 matches -> min(1, 2/2) = 1; "3" -> 1 match -> 0.5; "six" -> 0
    metric.update(["Two", "3", "six"], [answers] * 3)
    assert float(metric.compute()) == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------------------
# AUC, MRR, top-1 accuracy, factory
# --------------------------------------------------------------------------------------------------------
def _pairwise_auc(scores: list[float], labels: list[int]) -> float:
    """AUC as the probability that a positive outscores a negative (ties count one half)."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_binary_auc_equals_pairwise_definition() -> None:
    rng = random.Random(3)
    scores = [round(rng.random(), 1) for _ in range(200)]  # rounded: many ties
    labels = [int(rng.random() < 0.3 + 0.4 * s) for s in scores]
    metric = build_metric("auc")
    metric.update(scores[:120], labels[:120])
    metric.update(torch.tensor(scores[120:]), torch.tensor(labels[120:]))
    assert float(metric.compute()) == pytest.approx(_pairwise_auc(scores, labels), abs=1e-6)
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        metric.update([0.5], [2])


def test_mean_reciprocal_rank_hand_cases() -> None:
    metric = MeanReciprocalRank()
    scores = torch.tensor([[0.1, 0.9, 0.5], [3.0, 1.0, 2.0], [0.5, 0.5, 0.1]])
    # row 0: ground truth 2 (0.5) is behind 0.9 -> rank 2; row 1: ground truth 0 is best -> rank 1;
    # row 2: ground truth 1 ties with index 0, which comes first in a stable sort -> rank 2.
    metric.update(scores, torch.tensor([2, 0, 1]))
    assert float(metric.compute()) == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    padded = torch.tensor([[0.2, 0.7, -math.inf, -math.inf]])  # -inf padding never outranks anything
    single = MeanReciprocalRank()
    single.update(padded, torch.tensor([0]))
    assert float(single.compute()) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="must index one of the 4 candidates"):
        single.update(padded, torch.tensor([4]))


def test_top_one_accuracy_text_and_indices() -> None:
    text = TopOneAccuracy()
    # VQA normalisation on both sides: "Two" == "2", "a Cat" == "cat"; "dog" != "bird"; the last one
    # matches one of its several references.
    text.update(["Two", "a Cat", "dog", "left"], ["2", "cat", "bird", ["right", "Left."]])
    assert float(text.compute()) == pytest.approx(3 / 4)
    ranked = build_metric("accuracy")
    ranked.update(
        torch.tensor([[0.1, 0.8], [0.9, 0.3], [0.2, 0.4]]), torch.tensor([1, 1, 1])
    )  # argmax 1, 0, 1
    ranked.update(torch.tensor([2, 0]), torch.tensor([2, 1]))  # chosen indices
    assert float(ranked.compute()) == pytest.approx(3 / 5)


def test_build_metric_names() -> None:
    expected = {
        "cider": CIDEr,
        "vqa_accuracy": VQAAccuracy,
        "accuracy": TopOneAccuracy,
        "auc": ReexportedAUC,
        "mrr": MeanReciprocalRank,
        "ivqa_accuracy": IVQAAccuracy,
    }
    for name, cls in expected.items():
        assert type(build_metric(name)) is cls
    assert ReexportedCIDEr is CIDEr
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        build_metric("bleu")


# --------------------------------------------------------------------------------------------------------
# DDP: two gloo processes give what one process gives
# --------------------------------------------------------------------------------------------------------
def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str, data: dict) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        half = data["split"]
        part = slice(0, half) if rank == 0 else slice(half, None)
        cider = CIDEr()
        cider.update(data["preds"][part], data["refs"][part])
        lonely = CIDEr()  # rank 1 never sees a sample
        if rank == 0:
            lonely.update(data["preds"], data["refs"])
        vqa = VQAAccuracy()
        vqa.update(data["vqa_preds"][part], data["vqa_answers"][part])
        mrr = MeanReciprocalRank()
        mrr.update(torch.tensor(data["scores"][part]), torch.tensor(data["targets"][part]))
        auc = build_metric("auc")
        auc.update(data["auc_scores"][part], data["auc_labels"][part])
        result = {
            "cider": float(cider.compute()),
            "lonely": float(lonely.compute()),
            "vqa": float(vqa.compute()),
            "mrr": float(mrr.compute()),
            "auc": float(auc.compute()),
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_sync_equals_single_process(caption_sets, tmp_path: Path) -> None:
    preds, refs = caption_sets
    rng = random.Random(11)
    data = {
        "split": 13,  # uneven shards: the gathered byte tensors need padding
        "preds": preds[:40],
        "refs": refs[:40],
        "vqa_preds": [rng.choice(["two", "2", "yes", "no"]) for _ in range(40)],
        "vqa_answers": [[rng.choice(["2", "yes", "no"]) for _ in range(10)] for _ in range(40)],
        "scores": [[rng.random() for _ in range(5)] for _ in range(40)],
        "targets": [rng.randrange(5) for _ in range(40)],
        "auc_scores": [round(rng.random(), 2) for _ in range(40)],
        "auc_labels": [i % 2 for i in range(40)],
    }
    single = {}
    for key, metric, args in [
        ("cider", CIDEr(), (data["preds"], data["refs"])),
        ("vqa", VQAAccuracy(), (data["vqa_preds"], data["vqa_answers"])),
        ("mrr", MeanReciprocalRank(), (torch.tensor(data["scores"]), torch.tensor(data["targets"]))),
        ("auc", build_metric("auc"), (data["auc_scores"], data["auc_labels"])),
    ]:
        metric.update(*args)
        single[key] = float(metric.compute())
    single["lonely"] = single["cider"]

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), data), nprocs=2, join=True)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for key, value in single.items():
            assert result[key] == pytest.approx(value, abs=1e-9), (rank, key)

"""ibkit.eval.uncertainty: values equal the protocol's metrics on the same records; standard errors match
independent hand computations (Bernoulli, sample SE, Hanley & McNeil)."""

from __future__ import annotations

import json
import math
import random

import pytest

from ibkit.data.registry import get_spec
from ibkit.eval.protocol import DatasetEvaluator
from ibkit.eval.uncertainty import (
    auc_with_error,
    dataset_with_error,
    grouped_with_error,
    metric_with_error,
    per_sample_scores,
    read_predictions,
)

WORDS = ["a", "red", "blue", "circle", "square", "small", "big", "left", "of", "the", "triangle", "two"]


def _rank_records(rng: random.Random, n: int, candidates: list[str], ties: bool = False) -> list[dict]:
    records = []
    for i in range(n):
        scores = [round(rng.choice([-1.0, -2.0]) if ties else rng.gauss(-3, 2), 5) for _ in candidates]
        best = max(range(len(scores)), key=lambda k: (scores[k], -k))
        records.append({"sample_id": f"s{i}", "prediction": candidates[best], "prediction_index": best,
                        "label": rng.randrange(len(candidates)), "candidates": list(candidates), "scores": scores})
    return records


def _caption(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 7))) + rng.choice(["", ".", " ,"])


def _generate_records(rng: random.Random, n: int, kind: str) -> list[dict]:
    records = []
    for i in range(n):
        if kind == "caption":
            answers = [_caption(rng) for _ in range(rng.randint(1, 4))]
            prediction = rng.choice([_caption(rng), answers[0]])
        else:
            pool = ["red", "Blue", "two", "2", "yes", "no", "the circle"]
            answers = [rng.choice(pool) for _ in range(10 if kind == "vqa" else 1)]
            prediction = rng.choice(pool)
        records.append({"sample_id": f"g{i}", "prediction": prediction, "answers": answers})
    return records


def _protocol_value(dataset: str, records: list[dict]) -> float:
    evaluator = DatasetEvaluator(get_spec(dataset))
    evaluator.update(records[:7])  # in two batches, as an evaluation epoch feeds them
    evaluator.update(records[7:])
    return evaluator.compute()


@pytest.mark.parametrize(
    ("dataset", "make"),
    [
        ("shapes_vsr", lambda rng: _rank_records(rng, 60, ["true", "false"])),
        ("shapes_iconqa", lambda rng: _rank_records(rng, 50, ["A", "B", "C"])),
        ("shapes_visdial", lambda rng: _rank_records(rng, 40, [f"c{k}" for k in range(6)], ties=True)),
        ("shapes_hatefulmemes", lambda rng: _rank_records(rng, 80, ["yes", "no"])),
        ("shapes_hatefulmemes", lambda rng: _rank_records(rng, 40, ["no", "yes"], ties=True)),
        ("shapes_vqa", lambda rng: _generate_records(rng, 50, "vqa")),
        ("shapes_ocrvqa", lambda rng: _generate_records(rng, 50, "word")),
        ("ivqa", lambda rng: _generate_records(rng, 30, "vqa")),
        ("shapes_nocaps", lambda rng: _generate_records(rng, 30, "caption")),
    ],
)
def test_value_equals_the_protocol_metric(dataset, make):
    records = make(random.Random(len(dataset)))
    metric = get_spec(dataset).metric
    result = metric_with_error(records, metric)
    assert result["n"] == len(records)
    assert result["value"] == pytest.approx(_protocol_value(dataset, records), abs=1e-6)
    assert result["stderr"] > 0


def test_mean_metrics_use_the_sample_standard_error():
    # 3 right of 5: p = 0.6, Bernoulli SE sqrt(p (1 - p) / (n - 1)) = sqrt(0.24 / 4)
    records = [{"prediction_index": p, "label": 0} for p in (0, 0, 0, 1, 1)]
    result = metric_with_error(records, "accuracy")
    assert result == {"value": 0.6, "stderr": pytest.approx(math.sqrt(0.24 / 4)), "n": 5}
    # MRR of ranks 1, 2, 4 -> 1, 0.5, 0.25: mean 7/12, sample variance by hand
    ranked = [{"label": 0, "prediction_index": 0, "scores": [0.0, -1.0, -2.0, -3.0]},
              {"label": 0, "prediction_index": 1, "scores": [-1.0, 0.0, -2.0, -3.0]},
              {"label": 3, "prediction_index": 0, "scores": [-1.0, -1.0, -1.0, -1.0]}]  # a tie: lower index first
    mean = 7 / 12
    variance = ((1 - mean) ** 2 + (0.5 - mean) ** 2 + (0.25 - mean) ** 2) / 2
    assert per_sample_scores(ranked, "mrr") == [1.0, 0.5, 0.25]
    assert metric_with_error(ranked, "mrr")["stderr"] == pytest.approx(math.sqrt(variance / 3))
    assert math.isnan(metric_with_error(records[:1], "accuracy")["stderr"])


def test_cider_corpus_value_is_the_mean_of_per_image_scores():
    records = _generate_records(random.Random(3), 12, "caption")
    scores = per_sample_scores(records, "cider")
    assert len(scores) == 12
    assert sum(scores) / 12 == pytest.approx(_protocol_value("shapes_nocaps", records), abs=1e-9)


def test_auc_and_hanley_mcneil_on_a_hand_example():
    # positives 0.9, 0.8, 0.4; negatives 0.7, 0.4, 0.1: of 9 pairs, 7 won, 1 tie (0.4 = 0.4), 1 lost
    scores, targets = [0.9, 0.8, 0.4, 0.7, 0.4, 0.1], [1, 1, 1, 0, 0, 0]
    a = 7.5 / 9
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = math.sqrt((a * (1 - a) + 2 * (q1 - a * a) + 2 * (q2 - a * a)) / 9)
    result = auc_with_error(scores, targets)
    assert result["value"] == pytest.approx(a)
    assert result["stderr"] == pytest.approx(se)
    assert result["n"] == 6


def test_hanley_mcneil_on_fifty_and_fifty_cases():
    """A = 0.8 with 50 positive and 50 negative cases: SE = sqrt((A(1-A) + 49(Q1-A^2) + 49(Q2-A^2)) / 2500)."""
    q1, q2 = 0.8 / 1.2, 2 * 0.64 / 1.8
    expected = math.sqrt((0.16 + 49 * (q1 - 0.64) + 49 * (q2 - 0.64)) / 2500)
    assert expected == pytest.approx(0.0445, abs=1e-4)
    # 40 of 50 positives above every negative, 10 below every one: A = 0.8
    scores = [2.0] * 40 + [-1.0] * 10 + [1.0] * 20 + [0.0] * 30
    result = auc_with_error(scores, [1] * 50 + [0] * 50)
    assert result["value"] == pytest.approx(0.8)
    assert result["stderr"] == pytest.approx(expected)


def test_grouped_scores_are_averaged_per_group():
    records = [{"prediction": p, "answers": [a] * 10, "sample_id": i, "kind": k}
               for i, (p, a, k) in enumerate([("red", "red", "color"), ("blue", "red", "color"),
                                              ("yes", "yes", "exists"), ("two", "2", "count")])]
    groups = grouped_with_error(records, "vqa_accuracy", lambda r: r["kind"])
    assert list(groups) == ["color", "count", "exists"]
    assert groups["color"]["value"] == 0.5 and groups["color"]["n"] == 2
    assert groups["color"]["stderr"] == pytest.approx(0.5)  # sqrt(0.5 / 2)
    assert groups["count"]["value"] == 1.0  # the prediction "two" normalises to "2"


def test_errors_name_the_record_and_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"record s1: no 'label' field"):
        metric_with_error([{"sample_id": "s1", "prediction_index": 0}], "accuracy")
    with pytest.raises(ValueError, match="auc needs ranking records"):
        metric_with_error([{"prediction": "x", "answers": ["x"]}], "auc")
    with pytest.raises(ValueError, match="both classes"):
        metric_with_error(_rank_records(random.Random(0), 3, ["yes", "no"])[:1], "auc")
    with pytest.raises(ValueError, match="no standard error for metric 'none'"):
        metric_with_error([{"prediction": "x"}], "none")
    folder = tmp_path / "predictions"
    folder.mkdir()
    (folder / "shapes_vsr.jsonl").write_text('{"sample_id": 1, "prediction_index": 0, "label": 0}\n{oops\n')
    with pytest.raises(ValueError, match=r"shapes_vsr\.jsonl line 2: not JSON"):
        dataset_with_error(tmp_path, "shapes_vsr")


def test_dataset_with_error_reads_what_ibkit_test_writes(tmp_path):
    from ibkit.eval.protocol import write_results

    records = _rank_records(random.Random(1), 30, ["true", "false"])
    value = _protocol_value("shapes_vsr", records)
    write_results(tmp_path, {"shapes_vsr": {"accuracy": value}}, {"shapes_vsr": records})
    result = dataset_with_error(tmp_path, "shapes_vsr")
    reported = json.loads((tmp_path / "results.json").read_text())["shapes_vsr"]["accuracy"]
    assert result["metric"] == "accuracy" and result["n"] == 30
    assert result["value"] == pytest.approx(reported)
    assert len(read_predictions(tmp_path / "predictions" / "shapes_vsr.jsonl")) == 30

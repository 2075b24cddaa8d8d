"""ibkit.shapes.report: results.md lists each table once, the figures have one panel per family, and a bad
layout names the field."""

from __future__ import annotations

import copy
import math

import pytest

from ibkit.shapes.plotting import running_mean
from ibkit.shapes.report import (
    CURVE_WINDOW,
    ablation_figure,
    ablation_markdown,
    check_ablation,
    check_results,
    heldout_mean,
    pipeline_figure,
    plot_ablation,
    plot_pipeline,
    results_markdown,
    summarize,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAMILIES = {"shapes_vsr": ("accuracy", 0.5), "shapes_iconqa": ("accuracy", 1 / 3), "shapes_hatefulmemes": ("auc", 0.5),
            "shapes_visdial": ("mrr", 0.29), "shapes_nocaps": ("cider", 0.0)}


def _cell(metric: str, value: float, stderr: float, n: int = 400) -> dict:
    return {"metric": metric, "value": value, "stderr": stderr, "n": n}


RESULTS = {
    "models": {"blip2": {"label": "BLIP-2 (stage 2)"}, "instructblip": {"label": "InstructBLIP"}},
    "heldout": {
        "blip2": {d: _cell(m, c + 0.02 if m != "cider" else 1.2, 0.03) for d, (m, c) in FAMILIES.items()},
        "instructblip": {d: _cell(m, c + 0.2 if m != "cider" else 3.4, 0.02) for d, (m, c) in FAMILIES.items()},
    },
    "chance": {d: c for d, (_, c) in FAMILIES.items()},
    "heldin_vqa_by_type": {
        model: {k: {"value": v, "stderr": 0.01, "n": 250} for k, v in zip(["color", "count", "exists"], values)}
        for model, values in (("blip2", (0.5, 0.4, 0.55)), ("instructblip", (0.95, 0.9, 0.88)))
    },
    "heldin_vqa_by_shapes": {
        model: {"color": {str(n): {"value": v, "stderr": 0.05, "n": 60} for n, v in zip((1, 2, 4), values)}}
        for model, values in (("blip2", (0.6, 0.5, 0.4)), ("instructblip", (1.0, 0.75, 0.5)))
    },
    "lm_text_by_shapes": {"color": {str(n): {"value": v, "stderr": 0.03, "n": 200} for n, v in zip((1, 2, 3), (1.0, 0.6, 0.5))}},
    "heldin_questions": 1500,
    "steps": {"encoder": {"label": "encoder pretraining", "seconds": 71.2, "curve": "encoder"},
              "lm": {"label": "LM instruction pretraining", "seconds": 65.0, "curve": "lm"},
              "evaluate": {"label": "evaluate", "seconds": 90.0, "curve": None}},
    "seconds": 226.2,
    "machine": "2-core Xeon",
}
CURVES = {"encoder": [(s, 5.0 * math.exp(-s / 20)) for s in range(100)], "lm": [(s, 0.01 + 1 / (s + 1)) for s in range(60)]}
ABLATION = {
    "seeds": [0, 1, 2],
    "arms": {
        arm: {"label": label, "per_seed": [
            {"shapes_vqa": {"metric": "vqa_accuracy", "value": 0.8 + shift + 0.01 * s},
             **{d: {"metric": m, "value": (3.0 if m == "cider" else c + 0.1) + shift + 0.02 * s}
                for d, (m, c) in FAMILIES.items()}}
            for s in range(3)]}
        for arm, label, shift in (("default", "default", 0.0), ("blip2_qformer", "BLIP-2 Q-Former", -0.05),
                                  ("uniform_mixing", "uniform mixing", -0.02),
                                  ("swapped_encoder", "swapped encoder (ViT)", 0.01))
    },
    "chance": {d: c for d, (_, c) in FAMILIES.items()},
}


def test_results_markdown_has_each_table_once_with_standard_errors():
    text = results_markdown(RESULTS)
    for title in ("## Held-out families", "## Held-in VQA by question type (1500 fresh questions)", "## Time per step"):
        assert text.count(title) == 1
    assert text.count("| family |") == 1 and text.count("| question type | n |") == 1 and text.count("| step |") == 1
    assert "| shapes_vsr | accuracy | 400 | 0.500 | 0.520 ± 0.030 | 0.700 ± 0.020 | yes |" in text
    assert "| shapes_nocaps | cider | 400 | 0.000 | 1.200 ± 0.030 | 3.400 ± 0.020 | yes |" in text
    assert "| color | 250 | 0.500 ± 0.010 | 0.950 ± 0.010 |" in text
    assert "| encoder pretraining | 1 min 11 s |" in text and "| **total** | **3 min 46 s** |" in text
    assert text.count("## Held-in VQA by number of shapes in the picture") == 1
    assert "| question type | model | 1 shape | 2 shapes | 3 shapes | 4 shapes |" in text  # only the counts that occur
    assert "| color | InstructBLIP | 1.00 ± 0.05 (60) | 0.75 ± 0.05 (60) | - | 0.50 ± 0.05 (60) |" in text
    # the T5 from the scenes' descriptions, below the models, explained once
    assert "| color | the T5, from the description | 1.00 ± 0.03 (200) | 0.60 ± 0.03 (200) | 0.50 ± 0.03 (200) | - |" in text
    assert text.index("| color | InstructBLIP |") < text.index("| color | the T5, from the description |")
    assert text.count("*The T5, from the description*") == 1
    without = results_markdown({k: v for k, v in RESULTS.items() if k != "lm_text_by_shapes"})
    assert "the T5, from the description" not in without and "| color | BLIP-2 (stage 2) |" in without
    assert "CIDEr divided by 10" in text


def test_the_mean_held_out_score_puts_cider_on_0_1_and_the_verdict_needs_two_standard_errors():
    # instructblip: (0.7 + 0.5333 + 0.7 + 0.49 + 3.4 / 10) / 5
    expected = (0.7 + 1 / 3 + 0.2 + 0.7 + 0.49 + 0.34) / 5
    mean = heldout_mean(RESULTS, "instructblip")
    assert mean["value"] == pytest.approx(expected) and mean["n"] == 5
    assert mean["stderr"] == pytest.approx(math.sqrt(4 * 0.02**2 + 0.002**2) / 5)
    close = copy.deepcopy(RESULTS)
    close["heldout"]["instructblip"]["shapes_vsr"].update(value=0.539, stderr=0.02)  # 1.95 SE above chance
    assert "| shapes_vsr | accuracy | 400 | 0.500 | 0.520 ± 0.030 | 0.539 ± 0.020 | no |" in results_markdown(close)
    assert f"**{expected:.3f} ± " in results_markdown(RESULTS)


def test_pipeline_figure_has_a_panel_per_family_plus_held_in_and_curves(tmp_path):
    figure = pipeline_figure(RESULTS, CURVES)
    assert len(figure.axes) == len(FAMILIES) + 2
    titles = [ax.get_title() for ax in figure.axes]
    assert "nocaps" in titles and "vsr" in titles
    curves_ax = figure.axes[-1]
    assert curves_ax.get_yscale() == "log"  # 5.0 down to ~0.01: the ranges differ a lot
    lines = curves_ax.get_lines()
    smoothed = [line for line in lines if not line.get_label().startswith("_")]  # the legend's lines
    faint = [line for line in lines if line.get_label().startswith("_")]
    assert [line.get_label() for line in smoothed] == ["encoder pretraining", "LM instruction pretraining"]
    encoder_losses = [loss for _, loss in CURVES["encoder"]]
    assert list(faint[0].get_ydata()) == encoder_losses  # every logged step, drawn faint
    assert list(smoothed[0].get_ydata()) == pytest.approx(running_mean(encoder_losses, CURVE_WINDOW))
    assert faint[0].get_color() == smoothed[0].get_color() and faint[0].get_alpha() < 0.5
    nocaps = figure.axes[titles.index("nocaps")]
    assert nocaps.get_ylim()[1] > 3.4  # CIDEr on its own scale
    assert figure.axes[titles.index("vsr")].get_ylim()[1] < 1.0
    out = plot_pipeline(RESULTS, CURVES, tmp_path / "sub" / "demo.png")
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    width, height = figure.get_size_inches()
    assert (width, height) == (14, 8)


def test_ablation_table_and_figure():
    text = ablation_markdown(ABLATION)
    assert text.count("| task |") == 1
    assert "| shapes_vqa (held-in) | vqa_accuracy | - | 0.810 ± 0.010 (0.800-0.820) |" in text
    assert "swapped encoder (ViT)" in text and "**mean held-out score**" in text
    figure = ablation_figure(ABLATION)
    assert len(figure.axes) == len(FAMILIES) + 1  # one panel per task (held-in VQA included)
    assert len(figure.axes[0].patches) == 4  # a bar per arm


def test_plot_ablation_writes_a_png(tmp_path):
    assert plot_ablation(ABLATION, tmp_path / "ablation.png").read_bytes().startswith(PNG_SIGNATURE)


def test_summarize_mean_and_sample_std_over_seeds():
    a, b = "shapes_vsr", "shapes_visdial"
    per_seed = [{a: {"metric": "accuracy", "value": 0.5}, b: {"metric": "mrr", "value": 0.2}},
                {a: {"metric": "accuracy", "value": 0.7}}, {a: {"metric": "accuracy", "value": 0.6}}]
    summary = summarize(per_seed)
    assert summary[a]["mean"] == pytest.approx(0.6) and summary[a]["std"] == pytest.approx(0.1)
    assert (summary[a]["min"], summary[a]["max"], summary[a]["n"]) == (0.5, 0.7, 3)
    assert summary[b] == {"metric": "mrr", "mean": 0.2, "std": 0.0, "min": 0.2, "max": 0.2, "n": 1}


def _broken(path: tuple, value) -> dict:
    results = copy.deepcopy(RESULTS)
    target = results
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return results


@pytest.mark.parametrize(
    ("results", "field"),
    [
        (_broken(("heldout", "blip2", "shapes_vsr", "stderr"), "small"), "results['heldout']['blip2']['shapes_vsr']['stderr']"),
        (_broken(("heldout", "blip2", "shapes_vsr", "n"), 0), "results['heldout']['blip2']['shapes_vsr']['n']"),
        (_broken(("heldout", "blip2", "shapes_vsr", "metric"), KeyError), "['shapes_vsr']['metric']"),
        (_broken(("chance", "shapes_vsr"), KeyError), "results['chance']['shapes_vsr'] is missing"),
        (_broken(("heldout", "flamingo"), {}), "results['heldout']['flamingo']: not a model"),
        (_broken(("models", "blip2", "label"), 3), "results['models']['blip2']['label']"),
        (_broken(("heldin_vqa_by_type", "instructblip", "color", "value"), None),
         "results['heldin_vqa_by_type']['instructblip']['color']['value']"),
        (_broken(("heldin_vqa_by_shapes", "blip2", "color", "2", "n"), -1),
         "results['heldin_vqa_by_shapes']['blip2']['color']['2']['n']"),
        (_broken(("heldin_vqa_by_shapes", "blip2", "color", "two"), {"value": 0.5, "stderr": 0.1, "n": 3}),
         "key 'two' is not a number of shapes"),
        (_broken(("heldin_vqa_by_shapes", "gpt"), {}), "results['heldin_vqa_by_shapes']['gpt']: not a model"),
        (_broken(("lm_text_by_shapes", "color", "1", "stderr"), "0.03"), "results['lm_text_by_shapes']['color']['1']['stderr']"),
        (_broken(("lm_text_by_shapes", "size"), [0.5]), "results['lm_text_by_shapes']['size']"),
        (_broken(("steps", "lm", "seconds"), "1 min"), "results['steps']['lm']['seconds']"),
        (_broken(("models",), KeyError), "results['models']"),
    ],
)
def test_bad_results_name_the_field(results, field):
    with pytest.raises(ValueError) as error:
        check_results(results)
    assert field in str(error.value)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda a: a["arms"]["default"]["per_seed"][1]["shapes_vsr"].update(value="x"),
         "ablation['arms']['default']['per_seed'][1]['shapes_vsr']['value']"),
        (lambda a: a["arms"]["uniform_mixing"].pop("label"), "ablation['arms']['uniform_mixing']['label']"),
        (lambda a: a["arms"]["default"].update(per_seed=[]), "ablation['arms']['default']['per_seed']"),
        (lambda a: a.update(seeds="0,1,2"), "ablation['seeds']"),
        (lambda a: a["chance"].update(shapes_vsr=None), "ablation['chance']['shapes_vsr']"),
    ],
)
def test_bad_ablation_names_the_field(change, field):
    ablation = copy.deepcopy(ABLATION)
    change(ablation)
    with pytest.raises(ValueError) as error:
        check_ablation(ablation)
    assert field in str(error.value)


def test_load_names_the_file(tmp_path):
    import json

    from ibkit.shapes.report import load_ablation, load_results

    good = tmp_path / "results.json"
    good.write_text(json.dumps(RESULTS))
    assert load_results(good) == RESULTS
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({**RESULTS, "chance": {"shapes_vsr": "half"}}))
    with pytest.raises(ValueError, match=r"wrong\.json: results\['chance'\]\['shapes_vsr'\] must be a number"):
        load_results(wrong)
    broken = tmp_path / "ablation.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=r"ablation\.json: "):
        load_ablation(broken)

"""The VQA-accuracy family: the official VQA answer normalisation and accuracy (``vqaEval.py``) and
iVQA's ``min(1, matches / 2)``, as functions and as torchmetrics ``Metric``s."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ibkit.eval.metric_states import MeanScoreMetric, check_reference_lists, check_texts

__all__ = [
    "VQAAccuracy",
    "IVQAAccuracy",
    "normalize_vqa_answer",
    "vqa_process_punctuation",
    "vqa_accuracy",
    "ivqa_accuracy",
]


# --------------------------------------------------------------------------------------------------------
# VQA answer normalisation (GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py)
# --------------------------------------------------------------------------------------------------------
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset(["a", "an", "the"])
# The official punctuation list (the Python 3 vqaEval.py, also in LAVIS; an older Python 2 version had
# ':' and "'" instead of '{', '}', '-' and '!').
_PUNCTUATION_MARKS = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a (never matching) lookahead, not a
# lookbehind, so every period not followed by a digit goes; it is also called with count=re.UNICODE (32).
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_MAX_PERIODS_REMOVED = 32

# Contraction fixes: a word as typed without its apostrophe(s) -> the official spelling. Keys are
# looked up after lower-casing, so the capitalised ones ("Im") never fire; they are kept for parity.
_CONTRACTION_TABLE = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've
couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've
hadn'tve hadn't've|hasnt hasn't|havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's|howd how'd
howll how'll|hows how's|Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd|itd've it'd've
it'dve it'd've|itll it'll|let's let's|maam ma'am|mightnt mightn't|mightnt've mightn't've
mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've|neednt needn't|notve not've
oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at|'ow'sat 'ow's'at|shant shan't
shed've she'd've|she'dve she'd've|she's she's|shouldve should've|shouldnt shouldn't
shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd|somebodyd've somebody'd've
somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's|someoned someone'd
someoned've someone'd've|someone'dve someone'd've|someonell someone'll|someones someone's
somethingd something'd|somethingd've something'd've|something'dve something'd've
somethingll something'll|thats that's|thered there'd|thered've there'd've|there'dve there'd've
therere there're|theres there's|theyd they'd|theyd've they'd've|they'dve they'd've|theyll they'll
theyre they're|theyve they've|twas 'twas|wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've
werent weren't|whatll what'll|whatre what're|whats what's|whatve what've|whens when's|whered where'd
wheres where's|whereve where've|whod who'd|whod've who'd've|who'dve who'd've|wholl who'll|whos who's
whove who've|whyll why'll|whyre why're|whys why's|wont won't|wouldve would've|wouldnt wouldn't
wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll
yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've
you'dve you'd've|youll you'll|youre you're|youve you've
"""
_CONTRACTIONS: dict[str, str] = dict(
    pair.split(" ") for pair in _CONTRACTION_TABLE.replace("\n", "|").split("|") if pair.strip()
)


def vqa_process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: drop or space out punctuation, then drop periods.

    A mark is deleted when it touches a space anywhere in the answer (or when the answer holds a
    digit-comma-digit, as in ``1,000``), otherwise replaced by a space; periods not followed by a digit
    are deleted (at most 32, as the official call passes ``re.UNICODE`` as the count).
    """
    out = text
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _PUNCTUATION_MARKS:
        if (mark + " " in text or " " + mark in text) or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS_REMOVED)


def _process_digits_articles(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words to digits, drop articles, fix
    contractions."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def normalize_vqa_answer(text: str) -> str:
    """Normalise an answer as the official evaluation normalises a prediction."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digits_articles(vqa_process_punctuation(text))


def vqa_accuracy(pred: str, answers: Sequence[str], normalize_answers: str = "official") -> float:
    """Official VQA accuracy of one prediction: the mean, over leaving out each reference answer in
    turn, of ``min(1, matches among the others / 3)``; any number of answers (usually 10) works.

    ``normalize_answers``: ``"official"`` treats the references as ``vqaEval.py`` does (punctuation
    processing only, and only when the answers are not all identical: the official annotation files
    already hold normalised answers); ``"full"`` gives them the prediction's whole normalisation.
    """
    if not answers:
        raise ValueError("VQA accuracy needs at least one reference answer")
    if normalize_answers == "official":
        refs = [vqa_process_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
    elif normalize_answers == "full":
        refs = [normalize_vqa_answer(a) for a in answers]
    else:
        raise ValueError(f"normalize_answers must be 'official' or 'full', got {normalize_answers!r}")
    pred = normalize_vqa_answer(pred)
    matches = sum(ref == pred for ref in refs)
    total = 0.0
    for ref in refs:
        others_matching = matches - (ref == pred)
        total += min(1.0, others_matching / 3.0)
    return total / len(refs)


def ivqa_accuracy(pred: str, answers: Sequence[str]) -> float:
    """iVQA accuracy of one prediction: ``min(1, matches / 2)`` over the reference answers (five in
    iVQA), prediction and answers both normalised as VQA predictions are."""
    if not answers:
        raise ValueError("iVQA accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(pred)
    matches = sum(normalize_vqa_answer(a) == pred for a in answers)
    return min(1.0, matches / 2.0)


# --------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------
class VQAAccuracy(MeanScoreMetric):
    """Official VQA accuracy (a fraction in [0, 1]; papers report it x100).

    ``update(preds, targets)``: one generated answer per question and that question's reference answers
    (ten in VQAv2/VizWiz/TextVQA). See :func:`vqa_accuracy` for ``normalize_answers``.
    """

    def __init__(self, normalize_answers: str = "official", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if normalize_answers not in ("official", "full"):
            raise ValueError(f"normalize_answers must be 'official' or 'full', got {normalize_answers!r}")
        self.normalize_answers = normalize_answers

    def update(self, preds: Sequence[str], targets: Sequence[Sequence[str]]) -> None:
        preds = check_texts(preds, "preds")
        targets = check_reference_lists(targets, "targets", len(preds))
        self._add_scores([vqa_accuracy(p, t, self.normalize_answers) for p, t in zip(preds, targets)])


class IVQAAccuracy(MeanScoreMetric):
    """iVQA accuracy: ``min(1, matches / 2)`` over the reference answers, VQA-normalised."""

    def update(self, preds: Sequence[str], targets: Sequence[Sequence[str]]) -> None:
        preds = check_texts(preds, "preds")
        targets = check_reference_lists(targets, "targets", len(preds))
        self._add_scores([ivqa_accuracy(p, t) for p, t in zip(preds, targets)])

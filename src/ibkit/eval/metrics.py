"""Evaluation metrics of the InstructBLIP protocol as torchmetrics ``Metric``s (they sync under DDP).

* :class:`CIDEr` - CIDEr-D exactly as pycocoevalcap computes it (PTB tokenisation in pure Python).
* :class:`VQAAccuracy` - the official VQA accuracy (answer normalisation of ``vqaEval.py``).
* :class:`IVQAAccuracy` - iVQA: ``min(1, matches / 2)`` over the (five) reference answers.
* :class:`TopOneAccuracy` - exact match of generated text, or argmax of candidate scores.
* :class:`BinaryAUC` - ROC AUC of scores (HatefulMemes).
* :class:`MeanReciprocalRank` - rank of the ground truth among scored candidates (Visual Dialog).

Text metrics keep their strings as UTF-8 bytes in ``uint8`` list states, so torchmetrics' own gather
moves them between processes; corpus-level statistics (CIDEr's document frequencies) are then computed
over every process's samples.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import BinaryAUROC
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from ibkit.eval.ptb_tokenizer import tokenize_captions

__all__ = [
    "CIDEr",
    "VQAAccuracy",
    "IVQAAccuracy",
    "TopOneAccuracy",
    "BinaryAUC",
    "MeanReciprocalRank",
    "METRIC_NAMES",
    "build_metric",
    "cider_d",
    "normalize_vqa_answer",
    "vqa_process_punctuation",
    "vqa_accuracy",
    "ivqa_accuracy",
]


# --------------------------------------------------------------------------------------------------------
# Input checking
# --------------------------------------------------------------------------------------------------------
def _check_texts(values: Any, field: str) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise TypeError(f"{field} must be a list of strings, got {type(values).__name__}")
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise TypeError(f"{field}[{index}] must be a string, got {type(value).__name__}")
    return list(values)


def _check_reference_lists(values: Any, field: str, expected_len: int) -> list[list[str]]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise TypeError(f"{field} must be a list of lists of strings, got {type(values).__name__}")
    if len(values) != expected_len:
        raise ValueError(f"{field} has {len(values)} entries but preds has {expected_len}")
    checked = []
    for index, refs in enumerate(values):
        refs = _check_texts(refs, f"{field}[{index}]")
        if not refs:
            raise ValueError(f"{field}[{index}] is empty: every sample needs at least one reference")
        checked.append(refs)
    return checked


# --------------------------------------------------------------------------------------------------------
# Strings as tensor states
# --------------------------------------------------------------------------------------------------------
class _TextStateMetric(Metric):
    """A Metric that keeps lists of strings as ``uint8`` byte states plus ``int64`` lengths.

    torchmetrics concatenates list states and gathers the tensors across processes (padding uneven sizes),
    so bytes and lengths travel together in the same rank order and decode back to the same strings.
    """

    def _add_text_state(self, name: str) -> None:
        self.add_state(f"{name}_bytes", default=[], dist_reduce_fx="cat")
        self.add_state(f"{name}_lengths", default=[], dist_reduce_fx="cat")
        self._text_state_names = [*getattr(self, "_text_state_names", []), name]

    def _append_texts(self, name: str, texts: Sequence[str]) -> None:
        encoded = [text.encode("utf-8", "surrogatepass") for text in texts]
        data = b"".join(encoded)
        byte_tensor = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()
            if data
            else torch.zeros(0, dtype=torch.uint8)
        )
        lengths = torch.tensor([len(item) for item in encoded], dtype=torch.long)
        getattr(self, f"{name}_bytes").append(byte_tensor.to(self.device))
        getattr(self, f"{name}_lengths").append(lengths.to(self.device))

    def _texts(self, name: str) -> list[str]:
        data = _cat_or_empty(getattr(self, f"{name}_bytes"), torch.uint8)
        lengths = _cat_or_empty(getattr(self, f"{name}_lengths"), torch.long)
        raw = data.to(torch.uint8).cpu().numpy().tobytes()
        texts, start = [], 0
        for length in lengths.long().cpu().tolist():
            texts.append(raw[start : start + length].decode("utf-8", "surrogatepass"))
            start += length
        return texts

    def _sync_dist(self, dist_sync_fn: Any = gather_all_tensors, process_group: Any | None = None) -> None:
        # A process that saw no samples must still take part in every gather, with tensors of the right
        # dtype (torchmetrics would fill in a float tensor); sync() restores the real state afterwards.
        for name in getattr(self, "_text_state_names", []):
            for suffix, dtype in (("bytes", torch.uint8), ("lengths", torch.long)):
                if not getattr(self, f"{name}_{suffix}"):
                    setattr(self, f"{name}_{suffix}", [torch.zeros(0, dtype=dtype, device=self.device)])
        super()._sync_dist(dist_sync_fn, process_group)


def _cat_or_empty(state: list[Tensor] | Tensor, dtype: torch.dtype) -> Tensor:
    if isinstance(state, Tensor):
        return state
    if not state:
        return torch.zeros(0, dtype=dtype)
    return dim_zero_cat(state)


# --------------------------------------------------------------------------------------------------------
# CIDEr-D
# --------------------------------------------------------------------------------------------------------
def _ngram_counts(sentence: str, n: int) -> Counter[tuple[str, ...]]:
    words = sentence.split()
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_d(
    candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0
) -> tuple[float, list[float]]:
    """CIDEr-D of tokenised ``candidates`` against tokenised ``references`` (one list per candidate).

    Follows pycocoevalcap's ``CiderScorer`` step by step: document frequencies over the evaluated
    references, idf ``log(N_images) - log(max(1, df))``, per-n cosine similarity with the candidate's
    tf-idf clipped by the reference's, a Gaussian length penalty, the mean over n = 1..4, the mean over
    references, times 10. Its length is the number of bigrams (not words); kept for parity.
    Returns ``(corpus score, per-candidate scores)``.
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("CIDEr needs at least one candidate")
    cand_counts = [_ngram_counts(c, n) for c in candidates]
    ref_counts = [[_ngram_counts(r, n) for r in refs] for refs in references]

    doc_freq: Counter[tuple[str, ...]] = Counter()
    for refs in ref_counts:
        doc_freq.update({gram for counts in refs for gram in counts})
    log_num_images = math.log(float(len(ref_counts)))

    def tfidf(counts: Counter[tuple[str, ...]]) -> tuple[list[dict], list[float], int]:
        vectors: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
        norms = [0.0] * n
        bigrams = 0
        for gram, tf in counts.items():
            order = len(gram) - 1
            weight = float(tf) * (log_num_images - math.log(max(1.0, float(doc_freq.get(gram, 0)))))
            vectors[order][gram] = weight
            norms[order] += weight * weight
            if order == 1:
                bigrams += tf
        return vectors, [math.sqrt(v) for v in norms], bigrams

    scores = []
    for cand, refs in zip(cand_counts, ref_counts):
        vec, norm, length = tfidf(cand)
        total = [0.0] * n
        for ref in refs:
            vec_ref, norm_ref, length_ref = tfidf(ref)
            penalty = math.e ** (-(float(length - length_ref) ** 2) / (2 * sigma**2))
            for order in range(n):
                value = 0.0
                for gram, weight in vec[order].items():
                    ref_weight = vec_ref[order].get(gram, 0.0)
                    value += min(weight, ref_weight) * ref_weight
                if norm[order] != 0 and norm_ref[order] != 0:
                    value /= norm[order] * norm_ref[order]
                total[order] += value * penalty
        scores.append(sum(total) / n / len(refs) * 10.0)
    return sum(scores) / len(scores), scores


class CIDEr(_TextStateMetric):
    """Corpus CIDEr-D as pycocoevalcap's ``Cider`` after its ``PTBTokenizer`` (no Java needed).

    ``update(preds, targets)``: ``preds`` one generated caption per image, ``targets`` that image's
    reference captions. ``compute()`` tokenises all references and all predictions (each set as one
    text, as pycocoevalcap does) and returns the corpus score as a float64 tensor (pycocoevalcap scale:
    1.05 is the "105" of papers). ``tokenize=False`` takes captions as already tokenised.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, n: int = 4, sigma: float = 6.0, tokenize: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if n < 1:
            raise ValueError(f"CIDEr n must be >= 1, got {n}")
        if sigma <= 0:
            raise ValueError(f"CIDEr sigma must be > 0, got {sigma}")
        self.n, self.sigma, self.tokenize = n, sigma, tokenize
        self._add_text_state("preds")
        self._add_text_state("refs")
        self.add_state("ref_counts", default=[], dist_reduce_fx="cat")

    def _sync_dist(self, dist_sync_fn: Any = gather_all_tensors, process_group: Any | None = None) -> None:
        if not self.ref_counts:
            self.ref_counts = [torch.zeros(0, dtype=torch.long, device=self.device)]
        super()._sync_dist(dist_sync_fn, process_group)

    def update(self, preds: Sequence[str], targets: Sequence[Sequence[str]]) -> None:
        preds = _check_texts(preds, "preds")
        targets = _check_reference_lists(targets, "targets", len(preds))
        self._append_texts("preds", preds)
        self._append_texts("refs", [ref for refs in targets for ref in refs])
        self.ref_counts.append(
            torch.tensor([len(refs) for refs in targets], dtype=torch.long, device=self.device)
        )

    def compute(self) -> Tensor:
        preds = self._texts("preds")
        flat_refs = self._texts("refs")
        counts = _cat_or_empty(self.ref_counts, torch.long).long().cpu().tolist()
        if not preds:
            raise RuntimeError("CIDEr.compute() called before any update()")
        if self.tokenize:
            preds, flat_refs = tokenize_captions(preds), tokenize_captions(flat_refs)
        refs, start = [], 0
        for count in counts:
            refs.append(flat_refs[start : start + count])
            start += count
        score, _ = cider_d(preds, refs, n=self.n, sigma=self.sigma)
        return torch.tensor(score, dtype=torch.float64)


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


class _MeanScoreMetric(Metric):
    """Mean of per-sample scores; two scalar sum states, so DDP sync is a plain all-reduce."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _add_scores(self, scores: Sequence[float]) -> None:
        self.score_sum += torch.tensor(math.fsum(scores), dtype=torch.float64, device=self.device)
        self.count += len(scores)

    def compute(self) -> Tensor:
        if int(self.count) == 0:
            raise RuntimeError(f"{type(self).__name__}.compute() called before any update()")
        return (self.score_sum / self.count).to(torch.float64)


class VQAAccuracy(_MeanScoreMetric):
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
        preds = _check_texts(preds, "preds")
        targets = _check_reference_lists(targets, "targets", len(preds))
        self._add_scores([vqa_accuracy(p, t, self.normalize_answers) for p, t in zip(preds, targets)])


class IVQAAccuracy(_MeanScoreMetric):
    """iVQA accuracy: ``min(1, matches / 2)`` over the reference answers, VQA-normalised."""

    def update(self, preds: Sequence[str], targets: Sequence[Sequence[str]]) -> None:
        preds = _check_texts(preds, "preds")
        targets = _check_reference_lists(targets, "targets", len(preds))
        self._add_scores([ivqa_accuracy(p, t) for p, t in zip(preds, targets)])


# --------------------------------------------------------------------------------------------------------
# Classification-style metrics
# --------------------------------------------------------------------------------------------------------
def _light_normalize(text: str) -> str:
    return " ".join(text.lower().split())


class TopOneAccuracy(_MeanScoreMetric):
    """Top-1 accuracy, for generated text or for ranked candidates.

    * ``update(preds: list[str], targets: list[str] | list[list[str]])``: exact match after normalisation
      (with several references: a match with any of them). ``normalize="vqa"`` (default, GQA's
      "VQA-style exact match"): the VQA answer normalisation on both sides; ``"light"``: lower-case and
      collapse whitespace; ``"none"``.
    * ``update(preds: Tensor, targets: Tensor)``: ``preds`` of shape (N, C) are per-candidate scores
      (argmax is the choice; the first index wins ties) or of shape (N,) chosen indices; ``targets`` (N,)
      the correct indices.
    """

    def __init__(self, normalize: str = "vqa", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if normalize not in ("light", "vqa", "none"):
            raise ValueError(f"normalize must be 'light', 'vqa' or 'none', got {normalize!r}")
        self.normalize = normalize

    def _norm(self, text: str) -> str:
        if self.normalize == "light":
            return _light_normalize(text)
        if self.normalize == "vqa":
            return normalize_vqa_answer(text)
        return text

    def update(self, preds: Sequence[str] | Tensor, targets: Sequence[str] | Tensor) -> None:
        if isinstance(preds, Tensor) or isinstance(targets, Tensor):
            preds_t, targets_t = torch.as_tensor(preds), torch.as_tensor(targets)
            if preds_t.ndim == 2:
                if preds_t.shape[0] != targets_t.shape[0]:
                    raise ValueError(
                        f"preds has {preds_t.shape[0]} rows but targets has {targets_t.shape[0]}"
                    )
                choice = preds_t.argmax(dim=1)
            elif preds_t.ndim == 1:
                choice = preds_t.long()
            else:
                raise ValueError(f"preds must have shape (N, C) or (N,), got {tuple(preds_t.shape)}")
            if targets_t.ndim != 1 or targets_t.shape[0] != choice.shape[0]:
                raise ValueError(
                    f"targets must have shape ({choice.shape[0]},), got {tuple(targets_t.shape)}"
                )
            correct = (choice.to(targets_t.device) == targets_t.long()).double()
            self.score_sum += correct.sum().to(self.score_sum.device)
            self.count += int(correct.numel())
            return
        preds = _check_texts(preds, "preds")
        if isinstance(targets, str) or not isinstance(targets, Sequence):
            raise TypeError(
                f"targets must be a list of strings or of lists of strings, got {type(targets).__name__}"
            )
        if len(targets) != len(preds):
            raise ValueError(f"targets has {len(targets)} entries but preds has {len(preds)}")
        references = []
        for index, target in enumerate(targets):
            refs = [target] if isinstance(target, str) else _check_texts(target, f"targets[{index}]")
            if not refs:
                raise ValueError(f"targets[{index}] is empty: every sample needs at least one reference")
            references.append(refs)
        self._add_scores(
            [float(self._norm(p) in {self._norm(r) for r in refs}) for p, refs in zip(preds, references)]
        )


class BinaryAUC(BinaryAUROC):
    """ROC AUC over scores (HatefulMemes): torchmetrics' exact ``BinaryAUROC`` (ties count one half).

    ``update(scores, labels)`` takes lists or tensors; scores may be probabilities or any monotone score
    (logits outside [0, 1] pass through a sigmoid, which leaves the AUC unchanged).
    """

    def update(self, preds: Sequence[float] | Tensor, target: Sequence[int] | Tensor) -> None:  # type: ignore[override]
        preds_t = torch.as_tensor(preds, dtype=torch.float32)
        target_t = torch.as_tensor(target).long()
        if preds_t.shape != target_t.shape or preds_t.ndim != 1:
            raise ValueError(
                f"scores and labels must be 1-D of the same length, got {tuple(preds_t.shape)} and "
                f"{tuple(target_t.shape)}"
            )
        if not bool(((target_t == 0) | (target_t == 1)).all()):
            raise ValueError("labels must be 0 or 1")
        super().update(preds_t.to(self.device), target_t.to(self.device))


class MeanReciprocalRank(_MeanScoreMetric):
    """Mean reciprocal rank of the ground-truth candidate (Visual Dialog's MRR, in (0, 1]).

    ``update(scores, targets)``: ``scores`` (N, C) per-candidate scores (higher is better), ``targets``
    (N,) the index of the ground-truth candidate. The rank is the ground truth's position in a stable
    descending sort: candidates with a higher score come first, and of equal scores the lower index.
    """

    def update(self, scores: Tensor, targets: Tensor) -> None:  # type: ignore[override]
        scores_t, targets_t = torch.as_tensor(scores), torch.as_tensor(targets).long()
        if scores_t.ndim != 2:
            raise ValueError(f"scores must have shape (N, C), got {tuple(scores_t.shape)}")
        if targets_t.ndim != 1 or targets_t.shape[0] != scores_t.shape[0]:
            raise ValueError(f"targets must have shape ({scores_t.shape[0]},), got {tuple(targets_t.shape)}")
        if bool(((targets_t < 0) | (targets_t >= scores_t.shape[1])).any()):
            raise ValueError(f"targets must index one of the {scores_t.shape[1]} candidates")
        if bool(torch.isnan(scores_t).any()):
            raise ValueError("scores contain NaN")
        gt_scores = scores_t.gather(1, targets_t.unsqueeze(1))
        index = torch.arange(scores_t.shape[1], device=scores_t.device).unsqueeze(0)
        ahead = (scores_t > gt_scores) | ((scores_t == gt_scores) & (index < targets_t.unsqueeze(1)))
        ranks = ahead.sum(dim=1).double() + 1.0
        self.score_sum += (1.0 / ranks).sum().to(self.score_sum.device)
        self.count += int(ranks.numel())


# --------------------------------------------------------------------------------------------------------
# Registry names -> metrics
# --------------------------------------------------------------------------------------------------------
_FACTORIES: dict[str, type[Metric]] = {
    "cider": CIDEr,
    "vqa_accuracy": VQAAccuracy,
    "accuracy": TopOneAccuracy,
    "auc": BinaryAUC,
    "mrr": MeanReciprocalRank,
    "ivqa_accuracy": IVQAAccuracy,
}
METRIC_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def build_metric(name: str, **kwargs: Any) -> Metric:
    """A fresh metric for a dataset registry metric name (``"cider"``, ``"vqa_accuracy"``, ...)."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; known metrics: {', '.join(METRIC_NAMES)}") from None
    return factory(**kwargs)

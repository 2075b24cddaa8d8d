"""Instruction templates: raw ``Sample`` fields -> the instruction text the model sees.

The caption, VQA and VQG sets are the paper's Table 5 (without the leading ``<Image>`` marker: the
visual prompt is always put in front of the text by the model). The other sets are ibkit's own,
written to the paper's rules: 10-15 per task, only some ask for a short answer (so the model does not
learn to answer everything tersely), scene-text sets carry the OCR tokens, options are written
``(a) ... (b) ...``.

Template syntax: ``str.format`` fields ``{question}``, ``{answer}``, ``{options}``, ``{context}``,
``{ocr}``, ``{text}``; a segment in ``[[ ... ]]`` is dropped when a field inside it is empty (a
sample without OCR tokens or without dialog history gets no dangling "OCR tokens: ." prefix).
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from ibkit.data.sample import Sample

if TYPE_CHECKING:
    from ibkit.data.registry import DatasetSpec

MAX_OCR_TOKENS = 30  # the paper's TextVQA protocol gives the model at most 30 OCR tokens
FIELDS = ("question", "answer", "options", "context", "ocr", "text")

_CAPTION = (  # paper Table 5
    "A short image caption:",
    "A short image description:",
    "A photo of",
    "An image that shows",
    "Write a short description for the image.",
    "Write a description for the photo.",
    "Provide a description of what is presented in the photo.",
    "Briefly describe the content of the image.",
    "Can you briefly explain what you see in the image?",
    "Could you use a few words to describe what you perceive in the photo?",
    "Please provide a short depiction of the picture.",
    "Using language, provide a short account of the image.",
    "Use a few words to illustrate what is happening in the picture.",
)
_VQA = (  # paper Table 5
    "{question}",
    "Question: {question}",
    "{question} A short answer to the question is",
    "Q: {question} A:",
    "Question: {question} Short answer:",
    "Given the image, answer the following question with no more than three words. {question}",
    "Based on the image, respond to this question with a short answer: {question}. Answer:",
    "Use the provided image to answer the question: {question} Provide your answer as short as possible:",
    'What is the answer to the following question? "{question}"',
    'The question "{question}" can be answered using the image. A short answer is',
)
_VQG = (  # paper Table 5
    "Given the image, generate a question whose answer is: {answer}. Question:",
    "Based on the image, provide a question with the answer: {answer}. Question:",
    'Given the visual representation, create a question for which the answer is "{answer}".',
    "From the image provided, craft a question that leads to the reply: {answer}. Question:",
    "Considering the picture, come up with a question where the answer is: {answer}.",
    "Taking the image into account, generate an question that has the answer: {answer}. Question:",
)
_CAPTION_OCR = (  # TextCaps: captions that should read the scene text
    "[[OCR tokens: {ocr}. ]]A short image caption:",
    "[[OCR tokens: {ocr}. ]]Write a short caption for the image, mentioning any text that appears in it.",
    "[[Text detected in the image: {ocr}. ]]Describe the image, including what the visible text says.",
    "[[The image contains the words: {ocr}. ]]Briefly describe what is shown in the picture.",
    "[[OCR tokens: {ocr}. ]]Provide a description of the photo that takes the written text into account.",
    "[[Scene text: {ocr}. ]]A photo of",
    "[[OCR tokens: {ocr}. ]]Write a one-sentence description of the image that reads out the important text.",
    "[[Words found in the image: {ocr}. ]]What does the image show? Describe it in a sentence.",
    "[[OCR tokens: {ocr}. ]]Using language, give an account of the image and the text written in it.",
    "[[Recognized text: {ocr}. ]]Describe this image, paying attention to signs, labels and other writing.",
    "[[OCR tokens: {ocr}. ]]Could you use a few words to describe the picture, including what is written in it?",
    "[[OCR tokens: {ocr}. ]]An image that shows",
)
_VQA_OCR = (  # OCR-VQA, TextVQA: answers must be read off the image
    "[[OCR tokens: {ocr}. ]]Question: {question} Short answer:",
    "[[OCR tokens: {ocr}. ]]{question}",
    "[[Text in the image: {ocr}. ]]Read the text in the image to answer the question. {question}",
    "[[OCR tokens: {ocr}. ]]Q: {question} A:",
    "[[Scene text: {ocr}. ]]Answer the question using the words visible in the image: {question} Answer:",
    "[[OCR tokens: {ocr}. ]]Based on the text and content of the image, answer with a few words. {question}",
    "[[Words detected in the image: {ocr}. ]]{question} A short answer to the question is",
    "[[OCR tokens: {ocr}. ]]Look at the writing in the picture and answer: {question}",
    "[[Recognized text: {ocr}. ]]Question: {question} Answer:",
    '[[OCR tokens: {ocr}. ]]The question "{question}" can be answered by reading the image. The answer is',
    "[[OCR tokens: {ocr}. ]]Given the image and the text written in it, answer the question with no more "
    "than three words. {question}",
    '[[Text found in the image: {ocr}. ]]What is the answer to the following question? "{question}"',
)
_TRUE_FALSE = (  # VSR: the statement is in ``question``; candidates are false/true
    "Based on the image, is this statement true or false? {question}",
    "{question} Is this statement true or false?",
    "Look at the image. True or false: {question}",
    "Does the image support the following statement? Answer true or false. {question}",
    "Statement: {question} According to the picture, is the statement true or false? Answer:",
    "Decide whether the claim matches the image. Claim: {question} Answer with true or false:",
    'Given the picture, tell whether this description of the scene is true or false: "{question}"',
    "Examine how the objects in the image are arranged. Is the following statement true or false? {question}",
    "{question} True or false? Short answer:",
    "Verify this statement against the image and reply with true or false: {question}",
    'Here is a statement about the image: "{question}" Is it true or false?',
    'Question: Is the statement "{question}" true or false for this image? Answer:',
)
_MULTIPLE_CHOICE = (  # IconQA, ScienceQA (hint as context); the target is the option text
    "[[Context: {context} ]]Question: {question} Options: {options}. Short answer:",
    "[[Context: {context} ]]Question: {question} Options: {options}. Answer:",
    "[[{context} ]]{question} Choose one of the following options: {options}.",
    "[[Context: {context} ]]Answer the question by picking one option. {question} Options: {options}",
    "[[Hint: {context} ]]Based on the image, which option answers the question best? {question} {options}",
    "[[Context: {context} ]]{question} Select the correct answer from {options}. Answer:",
    "[[Background: {context} ]]Look at the image and answer the multiple-choice question. "
    "Question: {question} Options: {options}. Answer with the text of the option:",
    "[[Context: {context} ]]Q: {question} Options: {options} A:",
    "[[Context: {context} ]]Use the image to answer: {question} Possible answers: {options}.",
    "[[Context: {context} ]]Which of these is correct? {options} Question: {question} Short answer:",
    "[[Context: {context} ]]Question: {question} The choices are {options}. The correct choice is",
    '[[Context: {context} ]]Considering the picture, choose the right answer to "{question}" from the '
    "options {options}.",
)
_DIALOG = (  # Visual Dialog: caption + earlier rounds as context
    "[[Dialog history: {context} ]]Question: {question} Short answer:",
    "[[{context} ]]Q: {question} A:",
    "[[Here is a conversation about the image. {context} ]]Continue the conversation by answering: {question}",
    "[[Previous questions and answers: {context} ]]Question: {question} Answer:",
    "[[Image caption and dialog so far: {context} ]]Now answer the next question. {question}",
    "[[Conversation: {context} ]]{question} A short answer to the question is",
    "[[Given the dialog {context} ]]Reply to the last question about the image: {question}",
    "[[Chat history: {context} ]]Answer the follow-up question about the image briefly. {question}",
    '[[Dialog: {context} ]]Based on the image and the dialog, what is the answer to "{question}"?',
    "[[{context} ]]Question: {question} Reply:",
    "[[Earlier rounds: {context} ]]Keeping the earlier rounds in mind, answer: {question}",
)
_CLASSIFICATION = (  # Hateful Memes: meme text in ``question`` (also ``{text}``); candidates no/yes
    'This is an image with: "{text}" written on it. Is it hateful? Answer:',
    'The meme says "{text}". Is this meme hateful? Answer yes or no.',
    'Text on the image: "{text}". Taking both the picture and the text into account, is the meme hateful?',
    'Is this meme, which reads "{text}", hateful? Short answer:',
    'Read the caption "{text}" written on the image. Does the image together with its text convey hate? Answer:',
    "Meme text: {text} Question: Is the meme hateful? Answer:",
    'Considering the image and the words "{text}" on it, would you say this meme is hateful? Answer with yes or no.',
    'The picture contains the text "{text}". Does the meme attack people because of who they are?',
    'Is the following meme hateful? Text: "{text}". Answer:',
    'Decide whether this meme is hateful. It shows an image with the text "{text}". Answer:',
)
_VIDEO_QA = (
    "Question: {question} Short answer:",
    "{question}",
    "Watch the video and answer the question. {question}",
    "Q: {question} A:",
    "Based on the video, respond to this question with a short answer: {question} Answer:",
    "Given the video frames, answer the following question in one or two words. {question}",
    "{question} A short answer to the question is",
    'What is the answer to the following question about the video? "{question}"',
    "Use the video to answer the question: {question}",
    'The question "{question}" can be answered by watching the video. The answer is',
    "Considering what happens in the clip, answer: {question}",
)
PROMPT_AS_WRITTEN = "[[{context}\n]]{question}"  # earlier turns (if any), then the instruction as written
NO_TEMPLATES = "none"  # a template set name meaning "the record's own instruction" (custom datasets)
_LLAVA = (  # LLaVA instructions are already natural requests: vary only how the history is framed
    "[[{context}\n]]{question}",
    "[[Conversation so far:\n{context}\n]]User: {question}\nAssistant:",
    "[[Earlier in this conversation:\n{context}\n]]{question}",
    "[[{context}\n]]Q: {question}\nA:",
    "[[Previous turns:\n{context}\n]]Respond to the following request about the image. {question}",
    "[[Dialogue history:\n{context}\n]]Look at the image and reply to the user. User: {question} Reply:",
    "[[{context}\n]]Human: {question}\nAssistant:",
    "[[Here is the conversation so far.\n{context}\n]]Continue it by answering: {question}",
    "[[Context of the chat:\n{context}\n]]Based on the image, give a helpful response. {question}",
    "[[{context}\n]]Instruction: {question}\nResponse:",
)

TEMPLATES: dict[str, tuple[str, ...]] = {
    "caption": _CAPTION,
    "vqa": _VQA,
    "vqg": _VQG,
    "caption_ocr": _CAPTION_OCR,
    "vqa_ocr": _VQA_OCR,
    "true_false": _TRUE_FALSE,
    "multiple_choice": _MULTIPLE_CHOICE,
    "dialog": _DIALOG,
    "classification": _CLASSIFICATION,
    "video_qa": _VIDEO_QA,
    "llava": _LLAVA,
}

_OPTIONAL_SEGMENT = re.compile(r"\[\[(.*?)\]\]", re.DOTALL)
_FORMATTER = string.Formatter()


def option_label(index: int) -> str:
    """a, b, ..., z, aa, ab, ... (so more than 26 options still get distinct labels)."""
    label = ""
    index += 1
    while index:
        index, remainder = divmod(index - 1, 26)
        label = chr(ord("a") + remainder) + label
    return label


def format_options(options: Sequence[str]) -> str:
    """``["x", "y"]`` -> ``"(a) x (b) y"``."""
    return " ".join(f"({option_label(i)}) {option}" for i, option in enumerate(options))


def format_ocr(tokens: Sequence[str] | None, limit: int = MAX_OCR_TOKENS) -> str:
    """The first ``limit`` OCR tokens, comma separated ("" when there are none)."""
    if not tokens:
        return ""
    return ", ".join(str(token) for token in list(tokens)[:limit])


def _field_names(template: str) -> list[str]:
    return [name for _, name, _, _ in _FORMATTER.parse(template) if name]


class _SampleFields(Mapping[str, str]):
    """Template fields computed on demand (formatting a 1000-answer vocabulary as options is wasted work)."""

    def __init__(self, sample: Sample) -> None:
        self.sample = sample
        self._cache: dict[str, str] = {}

    def _compute(self, name: str) -> str:
        sample = self.sample
        if name in ("question", "text"):
            return sample.question or ""
        if name == "answer":
            answer = sample.extra.get("answer")
            if answer is None and sample.answers:
                answer = most_frequent(sample.answers)
            return "" if answer is None else str(answer)
        if name == "options":
            return format_options(sample.candidates) if sample.candidates else ""
        if name == "context":
            return sample.context or ""
        if name == "ocr":
            return format_ocr(sample.ocr_tokens)
        raise KeyError(f"unknown template field {{{name}}}; known fields: {', '.join(FIELDS)}")

    def __getitem__(self, name: str) -> str:
        if name not in self._cache:
            self._cache[name] = self._compute(name)
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(FIELDS)

    def __len__(self) -> int:
        return len(FIELDS)


def render(template: str, fields: Mapping[str, str]) -> str:
    """Fill ``template``; ``[[...]]`` segments whose fields are empty are left out."""

    def keep_or_drop(match: re.Match[str]) -> str:
        segment = match.group(1)
        return segment if all(fields[name] for name in _field_names(segment)) else ""

    try:
        return _OPTIONAL_SEGMENT.sub(keep_or_drop, template).format_map(fields).strip()
    except KeyError as error:
        raise KeyError(f"template {template!r}: {error.args[0]}") from None


def most_frequent(answers: Sequence[str], rng: random.Random | None = None) -> str:
    """The most frequent answer; ties go to the earliest one, or to ``rng``'s pick when given."""
    counts = Counter(answers)
    best = max(counts.values())
    tied = [answer for answer in dict.fromkeys(answers) if counts[answer] == best]
    return rng.choice(tied) if rng is not None and len(tied) > 1 else tied[0]


def choose_target(sample: Sample, rng: random.Random) -> str | None:
    """The training answer: the reader's choice, else the correct candidate, else a most frequent answer.

    Captions are all distinct, so "most frequent with a seeded tie-break" picks one caption at random.
    """
    if sample.target is not None:
        return sample.target
    if sample.candidates and sample.label is not None and 0 <= sample.label < len(sample.candidates):
        return sample.candidates[sample.label]
    if sample.answers:
        return most_frequent(sample.answers, rng)
    return None


CAPTION_TEMPLATE_SETS = ("caption", "caption_ocr")
MAX_CAPTION_WORDS = 50  # LAVIS's blip_caption max_words
_CAPTION_PUNCTUATION = re.compile(r"""([.!"()*#:;~])""")
_RUNS_OF_SPACE = re.compile(r"\s{2,}")


def clean_caption(caption: str, max_words: int = MAX_CAPTION_WORDS) -> str:
    """A training caption as LAVIS's ``blip_caption`` processor makes it: lowercase, each of
    ``. ! " ( ) * # : ; ~`` replaced by a space, runs of whitespace made one space, stripped, and cut
    to the first ``max_words`` space-separated words."""
    caption = _RUNS_OF_SPACE.sub(" ", _CAPTION_PUNCTUATION.sub(" ", caption.lower()))
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def template_rng(seed: int, *keys: object) -> random.Random:
    """A generator that depends only on ``seed`` and ``keys`` (e.g. dataset, sample id, epoch).

    String seeding is stable across processes (no ``PYTHONHASHSEED`` dependence), so every worker
    and every resumed run picks the same template for the same sample.
    """
    return random.Random(":".join([str(seed), *map(str, keys)]))


def fill_instruction(sample: Sample, template_set: str, rng: random.Random, clean_captions: bool = True) -> Sample:
    """A copy of ``sample`` with ``instruction`` from a template of ``template_set`` and ``target`` filled
    (a caption target cleaned by :func:`clean_caption`, as LAVIS trains on them)."""
    if template_set != NO_TEMPLATES and template_set not in TEMPLATES:
        raise KeyError(f"unknown template set {template_set!r}; known sets: {', '.join(sorted(TEMPLATES))}")
    template = rng.choice(TEMPLATES[template_set] if template_set != NO_TEMPLATES else (PROMPT_AS_WRITTEN,))
    instruction = render(template, _SampleFields(sample))
    target = choose_target(sample, rng)
    if clean_captions and target is not None and template_set in CAPTION_TEMPLATE_SETS:
        target = clean_caption(target)
    return replace(sample, instruction=instruction, target=target, extra=dict(sample.extra),
                   qformer_instruction=own_qformer_instruction(sample, template))


def own_qformer_instruction(sample: Sample, template: str) -> str | None:
    """``template`` filled with the Q-Former's own question (``sample.qformer_question``), the other fields as
    for the LLM; None when the record has none (the Q-Former then reads the LLM's instruction)."""
    if sample.qformer_question is None:
        return None
    return render(template, _SampleFields(replace(sample, question=sample.qformer_question)))


def zero_shot_instruction(sample: Sample, spec: DatasetSpec) -> str:
    """The fixed evaluation prompt of ``spec`` (paper's zero-shot protocol) filled for ``sample``."""
    return render(spec.prompt, _SampleFields(sample))


def with_zero_shot_instructions(sample: Sample, spec: DatasetSpec) -> Sample:
    """``sample`` with ``spec``'s evaluation prompt filled for the LLM and, given a question of its own, the
    Q-Former."""
    return replace(sample, instruction=zero_shot_instruction(sample, spec),
                   qformer_instruction=own_qformer_instruction(sample, spec.prompt))

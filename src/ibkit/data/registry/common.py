"""Prompts, generation settings and folders that several dataset families share.

Generation settings follow LAVIS (reference/instructblip.md and its ``generate`` / ``predict_answers``):
- repetition penalty 1.5 everywhere: LAVIS's ``generate`` default, which neither the captioning task nor
  ``predict_answers`` overrides;
- ``min_new_tokens`` holds LAVIS's ``min_length``, which for a decoder-only LLM (generating from
  ``inputs_embeds`` only) counts new tokens, but for T5 also counts the decoder start token:
  :func:`ibkit.eval.protocol.generation_settings` takes one off for encoder-decoder LLMs;
- length_penalty -1 is the FlanT5 value for short answers (Vicuna uses 0: the evaluation code turns it).
"""

from __future__ import annotations

REPETITION_PENALTY = 1.5
GEN_CAPTION = {
    "num_beams": 5, "max_new_tokens": 80, "min_new_tokens": 10, "length_penalty": 1.0,
    "repetition_penalty": REPETITION_PENALTY,
}
GEN_SHORT = {
    "num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, "length_penalty": -1.0,
    "repetition_penalty": REPETITION_PENALTY,
}
GEN_QUESTION = {
    "num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 1, "length_penalty": 1.0,
    "repetition_penalty": REPETITION_PENALTY,
}
GEN_LONG = {
    "num_beams": 5, "max_new_tokens": 256, "min_new_tokens": 1, "length_penalty": 1.0,
    "repetition_penalty": REPETITION_PENALTY,
}
PROMPT_CAPTION = "A short image description:"
PROMPT_SHORT_QA = "Question: {question} Short answer:"
PROMPT_OCR_QA = "[[OCR tokens: {ocr}. ]]Question: {question} Short answer:"
PROMPT_MULTIPLE_CHOICE = "Question: {question} Options: {options}. Short answer:"
PROMPT_VQG = "Given the image, generate a question whose answer is: {answer}. Question:"
PROMPT_LLAVA = "[[{context}\n]]{question}"

COCO_IMAGES = "coco/images"  # holds train2014/ val2014/ (VQAv2, OKVQA, COCO Caption) and train2017/ val2017/
# file names under COCO_IMAGES, shared by the datasets built on COCO
COCO2014_LAYOUT = (
    "train2014/COCO_train2014_<image_id:012d>.jpg",
    "val2014/COCO_val2014_<image_id:012d>.jpg",
)
COCO2017_LAYOUT = ("<split>2017/<image_id:012d>.jpg  (train2017/, val2017/, test2017/)",)

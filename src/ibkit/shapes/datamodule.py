"""The tiny CPU preset's workspace: synthetic shapes data plus word-level tokenizers, made on demand.

``configs/tiny/`` trains a random tiny InstructBLIP on the built-in shapes datasets in seconds on a
CPU. Nothing is downloaded: the data is rendered from a seed and both tokenizers are word-level
vocabularies: the benchmark's fixed word list (``ibkit.shapes.vocabulary``, so a data change does not move
any word's id), then any other word of the generated annotations and the instruction templates, so every
word the model sees has an id. :class:`TinyShapesDataModule` prepares all of it in ``prepare_data``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ibkit.data.datamodule import InstructionDataModule
from ibkit.data.pretrain import PretrainData
from ibkit.data.text import TextDataModule, TextPairDataset
from ibkit.shapes.vocabulary import SHAPES_WORDS

TINY_VOCAB_SIZE = 1024  # the tiny LLM/Q-Former configs use this vocabulary size
TOKENIZER_VERSION = 4  # bump when the tokenizers change for the same data (2: punctuation split as counted;
# 3: ids and file names not counted as words; 4: ids fixed by ibkit.shapes.vocabulary, not by counts)
LLM_SPECIALS = ("<pad>", "</s>", "<unk>", "<s>")  # T5-like: pad 0, eos 1
QFORMER_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")  # BERT-like: pad 0
WORD_PATTERN = re.compile(r"\w+|[^\w\s]")
TINY_TRAIN = ["shapes_caption", "shapes_vqa", "shapes_ocrvqa", "shapes_mcvqa"]
TINY_EVAL = ["shapes_vsr", "shapes_nocaps"]


# Annotation fields that are names of things, not text a model reads or writes: counted as words they would
# fill most of the 1,024-word vocabulary with sample numbers ("000123") and file names.
NOT_TEXT_FIELDS = frozenset({"id", "image", "video", "info"})


def _strings(value: Any) -> Iterator[str]:
    """Every string a model may read or write in an annotation file (``NOT_TEXT_FIELDS`` skipped)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            if key not in NOT_TEXT_FIELDS:
                yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def corpus_words(texts: Iterable[str]) -> Counter:
    words: Counter = Counter()
    for text in texts:
        words.update(WORD_PATTERN.findall(text.lower()))
    return words


def _template_texts() -> list[str]:
    from ibkit.data.templates import TEMPLATES

    return [t for templates in TEMPLATES.values() for t in templates]


def _annotation_texts(data_root: Path) -> list[str]:
    texts: list[str] = []
    for file in sorted((data_root / "shapes").glob("*/*.json")):
        if file.name == "manifest.json":
            continue
        try:
            texts.extend(_strings(json.loads(file.read_text())))
        except json.JSONDecodeError as error:
            raise ValueError(f"{file}: not valid JSON ({error})") from error
    return texts


def build_vocabulary(
    texts: Iterable[str], size: int, specials: Iterable[str], known_words: Sequence[str] = ()
) -> dict[str, int]:
    """Specials first, then ``known_words`` in their order, then the texts' other words, most frequent first
    (ties by spelling), up to ``size`` entries.

    ``known_words`` keeps ids fixed whatever the counts: ``write_tiny_tokenizers`` passes the shapes
    benchmark's word list (``ibkit.shapes.vocabulary``), so a change to the data that moves a word's count
    does not hand every word another embedding row.
    """
    specials = list(specials)
    fixed = specials + [w for w in dict.fromkeys(known_words) if w not in specials]
    if len(fixed) > size:
        raise ValueError(f"vocabulary size {size} is smaller than the {len(fixed)} special and known words")
    counts = corpus_words(texts)
    taken = set(fixed)
    words = sorted((w for w in counts if w not in taken), key=lambda w: (-counts[w], w))
    vocab = fixed + words[: size - len(fixed)]
    return {word: index for index, word in enumerate(vocab)}


def word_level_tokenizer(vocab: dict[str, int], kind: str) -> Any:
    """A lower-casing word-level ``PreTrainedTokenizerFast``: ``kind='t5'`` appends ``</s>``,
    ``kind='bert'`` wraps in ``[CLS] ... [SEP]``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if kind == "t5":
        pad, unk, extra = "<pad>", "<unk>", {"eos_token": "</s>", "bos_token": "<s>"}
        post = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    elif kind == "bert":
        pad, unk, extra = "[PAD]", "[UNK]", {"cls_token": "[CLS]", "sep_token": "[SEP]"}
        post = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; use 't5' or 'bert'")
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    # the words build_vocabulary counted (WORD_PATTERN): "?\"" is two tokens, as Whitespace() would make it one <unk>
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(WORD_PATTERN.pattern), behavior="isolated")]
    )
    tok.post_processor = post
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, tidies " ." -> "."
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, unk_token=unk, **extra)


def write_tiny_tokenizers(data_root: Path, out_dir: Path, size: int = TINY_VOCAB_SIZE) -> dict[str, Path]:
    """Save ``llm/`` (T5-like) and ``qformer/`` (BERT-like) tokenizers built from the data under ``data_root``."""
    texts = _template_texts() + _annotation_texts(Path(data_root))
    paths = {}
    for name, kind, specials in (("llm", "t5", LLM_SPECIALS), ("qformer", "bert", QFORMER_SPECIALS)):
        tokenizer = word_level_tokenizer(build_vocabulary(texts, size, specials, SHAPES_WORDS), kind)
        target = Path(out_dir) / name
        tokenizer.save_pretrained(target)
        paths[name] = target
    return paths


def prepare_tiny_workspace(root: str | Path, seed: int = 0, image_size: int = 64,
                           sizes: dict[str, int] | None = None, relations: bool = False) -> dict[str, Path]:
    """Shapes data under ``root/shapes`` and tokenizers under ``root/tokenizers`` (idempotent); ``relations``:
    the relation recipe's data (:mod:`ibkit.shapes.relations`)."""
    from ibkit.shapes.writer import TINY_SIZES, make_shapes

    root = Path(root)
    make_shapes(root, seed=seed, sizes=dict(sizes or TINY_SIZES), image_size=image_size, progress=False,
                relations=relations)
    tokenizers = root / "tokenizers"
    stamp = tokenizers / "ibkit_tiny.json"
    wanted = {"seed": seed, "image_size": image_size, "sizes": sizes or TINY_SIZES, "tokenizer_version": TOKENIZER_VERSION,
              **({"relations": True} if relations else {})}
    if not stamp.exists() or json.loads(stamp.read_text()) != json.loads(json.dumps(wanted)):
        write_tiny_tokenizers(root, tokenizers)
        stamp.write_text(json.dumps(wanted))
    return {"data_root": root, "llm": tokenizers / "llm", "qformer": tokenizers / "qformer"}


class TinyShapesDataModule(InstructionDataModule):
    """:class:`InstructionDataModule` over a self-made tiny shapes workspace (see module docstring).

    ``prepare_data`` (local rank 0) renders the data (``render_size`` pixels; the loader resizes to the
    model's ``image_size``) and writes the tokenizers under ``root``. Their vocabularies come from the
    rendered data, so ``qformer_tokenizer``/``llm_tokenizer`` (folders) override them, e.g. with a trained
    model's own to evaluate it on data rendered from another seed. Being its own tokenizers, they stay
    through ``connect``, which refuses them when they number the model's tokens differently.

    ``question_types`` keeps only the training questions of those types (``extra.question_type``; held-in VQA's
    are color, shape, count, exists, size, side), e.g. the demo's side warm-up; evaluation sets are never
    filtered. A list applies to every training dataset (each must keep some); a mapping applies to the datasets
    it names only, e.g. ``{shapes_vqa: [side, size]}`` keeps a mixture's other datasets whole.

    ``relations`` renders the relation recipe's workspace (:mod:`ibkit.shapes.relations`): held-in VQA adds the
    ``relation`` and ``side_statement`` types, and the side questions are also asked vertically.
    """

    def __init__(
        self,
        root: str = "outputs/tiny",
        data_seed: int = 0,
        render_size: int = 64,
        image_size: int = 32,
        sizes: dict[str, int] | None = None,
        datasets: list[str] | None = None,
        eval_datasets: list[str] | None = None,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
        max_eval_samples: int | None = None,
        is_encoder_decoder: bool = True,
        max_qformer_len: int = 48,
        max_prompt_len: int = 48,
        max_target_len: int = 24,
        mixing: str = "sqrt",
        one_dataset_per_batch: bool = False,
        train_augment: bool = False,
        eval_splits: dict[str, str] | None = None,
        multipliers: dict[str, float] | None = None,
        qformer_tokenizer: str | None = None,
        llm_tokenizer: str | None = None,
        question_types: list[str] | dict[str, list[str]] | None = None,
        relations: bool = False,
    ) -> None:
        train_names = list(TINY_TRAIN if datasets is None else datasets)
        root_path = Path(root)
        super().__init__(
            datasets=train_names,
            eval_datasets=list(TINY_EVAL if eval_datasets is None else eval_datasets),
            data_root=str(root_path),
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            image_size=image_size,
            seed=seed,
            max_eval_samples=max_eval_samples,
            # the word-level vocabularies are built from the rendered data, so another root (seed, sizes)
            # numbers words differently: evaluating a trained model there needs ITS tokenizers
            qformer_tokenizer=qformer_tokenizer or str(root_path / "tokenizers" / "qformer"),
            llm_tokenizer=llm_tokenizer or str(root_path / "tokenizers" / "llm"),
            is_encoder_decoder=is_encoder_decoder,
            max_qformer_len=max_qformer_len,
            max_prompt_len=max_prompt_len,
            max_target_len=max_target_len,
            mixing=mixing,
            one_dataset_per_batch=one_dataset_per_batch,
            multipliers=multipliers,  # per-dataset weight factors, as the paper's (OKVQA x2)
            eval_splits=eval_splits,
            train_augment=train_augment,  # shapes: a random crop would cut shapes off and change the answers
            pin_memory=False,
        )
        self.root = root_path
        self.data_seed = data_seed
        self.render_size = render_size
        self.sizes = dict(sizes) if sizes else None
        self.relations = relations
        self.question_types = _question_types_by_dataset(question_types, train_names, relations)

    def prepare_data(self) -> None:
        prepare_tiny_workspace(self.root, seed=self.data_seed, image_size=self.render_size, sizes=self.sizes,
                               relations=self.relations)

    def _load(self, name: str, split: str) -> list:
        samples = super()._load(name, split)
        types = self.question_types.get(name)
        if types is None or split != self.train_split:
            return samples
        kept = [s for s in samples if s.extra.get("question_type") in types]
        if not kept:
            found = sorted({str(s.extra.get("question_type")) for s in samples})
            raise ValueError(f"{name} ({split}): no training question of types {types} (question_types keeps "
                             f"only those; the dataset's types: {found}); name the datasets to filter with a "
                             f"mapping, e.g. {{shapes_vqa: {types}}}")
        return kept


def _question_types_by_dataset(
    question_types: list[str] | dict[str, list[str]] | None, datasets: list[str], relations: bool = False
) -> dict[str, list[str]]:
    """The ``question_types`` argument as {training dataset: types kept}: a list applies to every dataset.

    Refused before any data is read: an empty list, a dataset the mapping names that is not trained on, and a
    held-in VQA type that does not exist (the other datasets' types are checked against their samples on load).
    """
    from ibkit.shapes.relations import RELATION_QA_TYPES, STATEMENT_TYPE
    from ibkit.shapes.scenes import QA_TYPES

    known = (*RELATION_QA_TYPES, STATEMENT_TYPE) if relations else QA_TYPES
    if question_types is None:
        return {}
    if not isinstance(question_types, dict):
        question_types = dict.fromkeys(datasets, list(question_types))
    else:
        unknown_sets = sorted(set(question_types) - set(datasets))
        if unknown_sets:
            raise ValueError(f"question_types names {unknown_sets}, not among the training datasets {datasets}")
    by_dataset = {}
    for name, types in question_types.items():
        types = list(types)
        if not types:
            raise ValueError(f"question_types ({name}): [] keeps nothing; name at least one type or leave the "
                             f"dataset out of the mapping")
        unknown = sorted(set(types) - set(known)) if name == "shapes_vqa" else []
        if unknown:
            raise ValueError(f"question_types ({name}): {unknown} not among {list(known)}"
                             + ("" if relations else " (relations: true adds the relation recipe's)"))
        by_dataset[name] = types
    return by_dataset


class TinyShapesPretrainDataModule(PretrainData, TinyShapesDataModule):
    """The tiny workspace serving BLIP-2 pre-training batches (captions only): ``configs/tiny/blip2_*.yaml``."""


class ShapesTextDataModule(TextDataModule):
    """The text instruction corpus of the tiny workspace (:mod:`ibkit.shapes.text_corpus`): the demo's LM step.

    ``prepare_data`` makes the workspace as :class:`TinyShapesDataModule` does; ``sizes`` must name
    ``shapes_text.train`` (the corpus is written only when asked), so that the word-level tokenizers,
    built from every annotation file, cover its words. Files and tokenizer default to the workspace's.

    ``focus_kinds`` trains and validates instead on as many fresh records of only those kinds, about scenes
    of ``focus_objects`` (low, high) objects, made in memory (the same words, so the tokenizers still
    cover them): the demo's optional binding phase (``lm_binding.yaml``).

    ``question_texts_of`` adds, for a masked LM (the demo's miniature BERT, ``qformer_text.yaml``), the
    training questions of these image datasets to the training text, each twice: as asked, and in the
    short-answer prompt ("Question: ... Short answer:"), the wording the Q-Former reads most. Their
    answers need the image, so a seq2seq LM may not train on them. ``relations``: the relation recipe's
    workspace and corpus (:mod:`ibkit.shapes.relations`).
    """

    def __init__(self, root: str = "outputs/tiny", data_seed: int = 0, render_size: int = 64,
                 sizes: dict[str, int] | None = None, tokenizer: str | None = None, batch_size: int = 64,
                 eval_batch_size: int | None = None, max_prompt_len: int = 192, max_target_len: int = 32,
                 max_eval_samples: int | None = None, num_workers: int = 0, seed: int = 0,
                 focus_kinds: list[str] | None = None, focus_objects: tuple[int, int] = (1, 4),
                 question_texts_of: list[str] | None = None, relations: bool = False,
                 group_by_length: bool = True) -> None:
        from ibkit.shapes.text_corpus import TEXT_CORPUS, make_focused_records
        from ibkit.shapes.writer import wants_text_corpus

        if not wants_text_corpus(sizes):
            raise ValueError(f"ShapesTextDataModule: sizes must name {TEXT_CORPUS}.train (the corpus size), "
                             f"got {sizes!r}")
        root_path = Path(root)
        folder = root_path / "shapes" / TEXT_CORPUS
        super().__init__(train_files=[str(folder / "train.json")], val_files=[str(folder / "val.json")],
                         tokenizer=tokenizer or str(root_path / "tokenizers" / "llm"), batch_size=batch_size,
                         eval_batch_size=eval_batch_size, max_prompt_len=max_prompt_len,
                         max_target_len=max_target_len, max_eval_samples=max_eval_samples,
                         num_workers=num_workers, seed=seed, group_by_length=group_by_length)
        self.root, self.data_seed, self.render_size, self.sizes = root_path, data_seed, render_size, dict(sizes or {})
        self.focus = None if focus_kinds is None else (list(focus_kinds), tuple(focus_objects))
        if self.focus is not None:  # no records yet (setup makes them), but a wrong kind or range fails now
            make_focused_records(data_seed, "train", 0, *self.focus)
        self.question_texts_of = list(question_texts_of or [])
        self.relations = relations

    def prepare_data(self) -> None:
        prepare_tiny_workspace(self.root, seed=self.data_seed, image_size=self.render_size, sizes=self.sizes,
                               relations=self.relations)

    def dataset(self, split: str) -> TextPairDataset:
        """The corpus file of ``split``, or with ``focus_kinds`` as many focused records made in memory."""
        from ibkit.shapes.text_corpus import TEXT_CORPUS, make_focused_records

        count = self.sizes.get(f"{TEXT_CORPUS}.{split}", 0)
        if self.focus is None or not count:
            dataset = super().dataset(split)
        else:
            records = make_focused_records(self.data_seed, split, count, *self.focus)
            dataset = TextPairDataset.of_records(records, f"focused text records ({split})")
        if split == "train" and self.question_texts_of:
            dataset.records += question_text_records(self.root, self.question_texts_of)
        return dataset

    def _collator(self, generate: bool) -> Any:
        if self.question_texts_of and not self.masked:  # known once the model has connected (after setup)
            raise ValueError(f"question_texts_of={self.question_texts_of}: these questions' answers need the image; "
                             "only a masked LM (MaskedLMModule) may read them as text")
        return super()._collator(generate)


def question_text_records(root: Path, datasets: list[str]) -> list[dict[str, Any]]:
    """The training questions of ``datasets`` (folders of ``<root>/shapes``) as text records: each question as
    asked and in the short-answer prompt, its first answer as the target."""
    records = []
    for name in datasets:
        path = root / "shapes" / name / "train.json"
        if not path.is_file():
            raise FileNotFoundError(f"question_texts_of: {path} not found (is {name!r} a shapes dataset "
                                    "of this workspace?)")
        for index, record in enumerate(json.loads(path.read_text())["records"]):
            question, answers = record.get("question"), record.get("answers")
            if not isinstance(question, str) or not question.strip() or not answers:
                raise ValueError(f"{path}: record {index} (id {record.get('id')!r}) has no question and answer")
            for prompt in (question, f"Question: {question} Short answer:"):
                records.append({"id": str(record.get("id", index)), "prompt": prompt, "target": str(answers[0]),
                                "answers": [str(answers[0])], "kind": f"{name}_question"})
    return records

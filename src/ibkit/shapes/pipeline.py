"""One run of the demo's pipeline as ``ibkit`` command lines: where each step reads and writes, and what it is
started from (:class:`Pipeline`); :mod:`ibkit.shapes.demo` runs them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ibkit.shapes.runner import Commands
from ibkit.shapes.settings import INSTRUCTION_TUNING, TEXT_STEPS

CONFIGS = Path(__file__).resolve().parent / "configs"  # shipped with the package


@dataclass
class Pipeline:
    """Where one run of the pipeline (one encoder arm, one seed) reads and writes, and its command lines.

    ``out`` holds the rendered data and tokenizers (shared by every arm and seed); ``runs`` the step folders
    of this arm; ``encoder_config`` / ``swap`` choose the image encoder (``swap``: a YAML fragment stacked on
    the stage configs that replaces their ``vision_encoder``).
    """

    out: Path
    runs: Path
    seed: int = 0
    data_seed: int = 0
    sizes: str | None = None
    encoder_config: str = "encoder"
    swap: str | None = None
    steps: dict[str, int | None] = field(default_factory=dict)
    max_eval_samples: int | None = None
    pretrained_runs: Path | None = None  # an ablation arm: the encoder and BLIP-2 stages of another pipeline
    relations: bool = False  # the relation recipe: its data (ibkit.shapes.relations) and the relation phase

    # -- paths --------------------------------------------------------------------------------------
    def run(self, step: str) -> Path:
        if self.pretrained_runs is not None and step not in INSTRUCTION_TUNING:
            return self.pretrained_runs / step
        return self.runs / step

    @property
    def encoder_weights(self) -> Path:
        return self.run("encoder") / "model" / "encoder.safetensors"

    @property
    def lm(self) -> Path:
        return self.out / "lm" / "model"  # the LM is the same for every arm: trained once per output dir

    @property
    def qformer_bert(self) -> Path | None:
        """The Q-Former's BERT (the ``qformer_text`` step's export) where the run has that step, else None."""
        return self.out / "qformer_text" / "model" if self.steps.get("qformer_text") else None

    def ckpt(self, step: str) -> Path:
        return self.run(step) / "checkpoints" / "last.ckpt"

    # -- arguments ----------------------------------------------------------------------------------
    def _data(self) -> list[str]:
        args = [f"--data.init_args.root={self.out}", f"--seed_everything={self.seed}",
                f"--data.init_args.data_seed={self.data_seed}", *(["--data.init_args.relations=true"] if self.relations else [])]
        return args + ([f"--data.init_args.sizes={self.sizes}"] if self.sizes else [])

    def _configs(self, name: str, swappable: bool = True, stacked: Sequence[str] = ()) -> list[str]:
        configs = [arg for config in (name, *stacked) for arg in ("--config", str(CONFIGS / f"{config}.yaml"))]
        if swappable and self.swap:
            configs += ["--config", str(CONFIGS / f"{self.swap}.yaml")]
        return configs

    def _trainer(self, run: Path, steps: int | None) -> list[str]:
        args = [f"--trainer.default_root_dir={run}", f"--trainer.logger.init_args.save_dir={run}"]
        return args + ([f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}"] if steps else [])

    def _tokenizers(self, llm: bool = True) -> list[str]:
        args = [f"--model.init_args.qformer_tokenizer={self.out / 'tokenizers' / 'qformer'}"]
        return args + ([f"--model.init_args.llm_tokenizer={self.lm}"] if llm else [])

    def _network_lm(self) -> list[str]:
        return [f"--model.init_args.model.init_args.language_model.init_args.name_or_path={self.lm}"]

    @staticmethod
    def _init_from(paths: Sequence[Path]) -> list[str]:
        return ["--model.init_args.init_from=[" + ", ".join(str(p) for p in paths) + "]"]

    def fit(self, step: str, config: str, extra: list[str], export: bool = False, swappable: bool = True,
            stacked: Sequence[str] = ()) -> Commands:
        run = self.out / step if step in TEXT_STEPS else self.run(step)  # the text steps: once per output dir
        args = [*self._configs(config, swappable, stacked), *self._data(), *self._trainer(run, self.steps.get(step)),
                *extra]
        commands = [["fit", *args]]
        if export:
            commands.append(["export", *args, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
                             "--output", str(run / "model")])
        return commands

    def prepare_data(self) -> None:
        """Render the shapes data and write the tokenizers as every step's ``prepare_data`` would (the configs
        share one data section), so that steps run side by side never render the same files at once."""
        import yaml

        from ibkit.shapes.datamodule import prepare_tiny_workspace

        data = yaml.safe_load((CONFIGS / f"{self.encoder_config}.yaml").read_text())["data"]["init_args"]
        sizes = yaml.safe_load(self.sizes) if self.sizes else data["sizes"]
        prepare_tiny_workspace(self.out, seed=self.data_seed, image_size=data["render_size"], sizes=sizes,
                               relations=self.relations)

    # -- the steps (their ibkit commands; run_commands or run_side_by_side runs them) ----------------
    def encoder(self) -> Commands:
        return self.fit("encoder", self.encoder_config, [], export=True, swappable=False)

    def language_model(self) -> Commands:
        """Step 2, the T5 on the corpus; with ``steps["lm_binding"]`` after a binding phase that it starts from
        (``lm_binding.yaml`` stacked on ``lm.yaml``: colour and shape questions about 2-4 objects)."""
        tokenizer = [f"--model.init_args.tokenizer={self.out / 'tokenizers' / 'llm'}"]
        if not self.steps.get("lm_binding"):
            return self.fit("lm", "lm", tokenizer, export=True, swappable=False)
        start = {"class_path": "ibkit.LanguageModel",  # the same T5, its weights from the binding phase
                 "init_args": {"config": None, "name_or_path": str(self.out / "lm_binding" / "model"), "frozen": False}}
        return [*self.fit("lm_binding", "lm", tokenizer, export=True, swappable=False, stacked=["lm_binding"]),
                *self.fit("lm", "lm", [*tokenizer, f"--model.init_args.language_model={json.dumps(start)}"], export=True,
                          swappable=False)]

    def qformer_text(self) -> Commands:
        """The optional step before stage 1: the Q-Former's BERT (:attr:`qformer_bert`), by masked LM on the text."""
        tokenizer = self.out / "tokenizers" / "qformer"
        args = [f"--model.init_args.tokenizer={tokenizer}", f"--data.init_args.tokenizer={tokenizer}"]
        return self.fit("qformer_text", "qformer_text", args, export=True, swappable=False)

    @property
    def cache_dir(self) -> Path:
        """The frozen-feature cache of this pipeline's encoder (the last callback of the stage configs), shared
        by the arms trained on it. One folder per encoder: a cache folder keeps one encoder's features per
        dataset and opening it with another encoder deletes them (:class:`ibkit.data.feature_store.FeatureStore`),
        which the ablation's two stage-1 runs, side by side, would otherwise do to each other."""
        return (self.pretrained_runs or self.runs) / "cache"

    @property
    def _cache(self) -> str:
        return f"--trainer.callbacks.init_args.cache_dir={self.cache_dir}"

    def instruction_features(self) -> Commands:
        """Instruction tuning's image features (the mixture's sets hold the warm-up's), cached ahead of it as its
        fits would (the same features), in the T5's lane while stage 1 ends: 20 s off the critical path here."""
        return [["data", "cache-features", *self._configs("instruct"), *self._data(), *self._tokenizers(),
                 *self._network_lm(), *self._init_from([self.encoder_weights]), "--model.init_args.allow_uninitialized=true",
                 f"--cache_dir={self.cache_dir}", "--stages=fit", "--num_workers=0"]]  # only the encoder runs: the rest may be random

    def blip2_stage1(self) -> Commands:
        starts = [self.encoder_weights, *([self.qformer_bert] if self.qformer_bert else [])]
        return self.fit("blip2_stage1", "blip2_stage1", [*self._tokenizers(llm=False), *self._init_from(starts), self._cache])

    def blip2_stage2(self) -> Commands:
        starts = [self.encoder_weights, self.ckpt("blip2_stage1")]
        return self.fit("blip2_stage2", "blip2_stage2", [*self._tokenizers(), *self._network_lm(), *self._init_from(starts),
                                                  self._cache])

    def instruct_side(self, extra: Sequence[str] = ()) -> Commands:
        """Step 5a: the instruction-tuning config with instruct_side.yaml stacked on it (side questions only)."""
        starts = [self.encoder_weights, self.ckpt("blip2_stage1"), self.ckpt("blip2_stage2")]
        return self.fit("instruct_side", "instruct", [*self._tokenizers(), *self._network_lm(), *self._init_from(starts),
                                               self._cache, *extra], stacked=["instruct_side"])

    def instruct_relation(self, extra: Sequence[str] = ()) -> Commands:
        """The relation recipe's second phase, from step 5a's checkpoint: side, side statements and relation questions
        (instruct_relation.yaml stacked on the instruction-tuning config)."""
        starts = [self.encoder_weights, self.ckpt("blip2_stage1"), self.ckpt("blip2_stage2"), self.ckpt("instruct_side")]
        return self.fit("instruct_relation", "instruct", [*self._tokenizers(), *self._network_lm(), *self._init_from(starts),
                                                   self._cache, *extra], stacked=["instruct_relation"])

    def tuning(self, extra: Sequence[str] = (), export: bool = False) -> dict[str, Commands]:
        """The instruction-tuning steps in order: the side warm-up, the relation phase (the recipe's), the mixture."""
        relation = {"instruct_relation": self.instruct_relation(extra)} if self.relations else {}
        return {"instruct_side": self.instruct_side(extra), **relation, "instruct": self.instruct(extra, export)}

    def instruct(self, extra: Sequence[str] = (), export: bool = False) -> Commands:
        """Step 5b, from step 5a's checkpoint (:meth:`instruct_side` first), or the relation phase's."""
        last = self.ckpt("instruct_relation" if self.relations else "instruct_side")
        starts = [self.encoder_weights, self.ckpt("blip2_stage1"), self.ckpt("blip2_stage2"), last]
        return self.fit("instruct", "instruct", [*self._tokenizers(), *self._network_lm(), *self._init_from(starts),
                                          self._cache, *extra], export=export)

    def results_dir(self, model: str) -> Path:
        return self.runs / "eval" / model

    def evaluate(self, model: str, extra: Sequence[str] = ()) -> Commands:
        """``ibkit test`` of ``model`` ("blip2" or "instructblip"), built from the instruction-tuning config;
        it writes :meth:`results_dir`."""
        starts = [self.encoder_weights, self.ckpt("blip2_stage1"), self.ckpt("blip2_stage2")]
        if model == "instructblip":
            starts.append(self.ckpt("instruct"))
        else:  # BLIP-2: the same network without the instruction input to the Q-Former
            extra = ["--model.init_args.model.init_args.qformer.instruction_aware=false", *extra]
        results_dir = self.results_dir(model)
        args = ["test", *self._configs("instruct"), "--config", str(CONFIGS / "eval.yaml"), *self._data(),
                *self._tokenizers(), *self._network_lm(), *self._init_from(starts), f"--model.init_args.results_dir={results_dir}",
                f"--trainer.default_root_dir={self.runs / 'eval'}", *extra]
        if self.max_eval_samples:
            args.append(f"--data.init_args.max_eval_samples={self.max_eval_samples}")
        return [args]

"""``ibkit data list|check|cache-features``: the command side of ibkit.data.catalog and ibkit.data.feature_cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ibkit.app.commands import UsageError


def _suite(suite: str) -> str | None:
    return None if suite == "all" else suite


def data_list(suite: str = "instructblip", layout: bool = False, markdown: bool = False) -> int:
    """Table of the registered datasets, or where each one's files go under a data root.

    docs/data.md is this command's output: ibkit data list --layout --markdown > docs/data.md

    Args:
        suite: instructblip | finetune | shapes | all.
        layout: print each dataset's expected files (annotation files, media folders and the file names in them).
        markdown: with --layout: the text of docs/data.md.
    """
    from ibkit.data.catalog import dataset_rows, format_table
    from ibkit.data.layout import layout_markdown, layout_text

    if markdown and not layout:
        raise UsageError("--markdown goes with --layout")
    if layout:
        print(layout_markdown(_suite(suite)) if markdown else layout_text(_suite(suite)), end="\n" * (not markdown))
        return 0
    print(format_table(dataset_rows(_suite(suite))))
    return 0


def data_check(
    root: Path,
    dataset: str | list[str] | None = None,
    suite: str = "instructblip",
    custom: Path | None = None,
    media: bool = False,
    sample: float = 1.0,
    seed: int = 0,
    num_frames: int = 4,
    workers: int = 4,
    show: int = 3,
) -> int:
    """Which datasets/splits are present under a data root; with --media, whether their images and videos decode.

    Exits with 1 when a file is broken, a dataset asked for by name is entirely absent, or (--media) any
    referenced image or video is missing, empty, unreadable or truncated.

    Args:
        root: data root the registry paths are under.
        dataset: check only this dataset (several: --dataset+=a --dataset+=b, or --dataset '[a, b]').
        suite: instructblip | finetune | shapes | custom | all.
        custom: a YAML file declaring custom datasets (a training config with data.init_args.custom_datasets,
            or their list); without --dataset, those are checked.
        media: open every image and video the found splits reference (images fully decoded, videos: the frames the loader takes).
        sample: with --media: check this seeded fraction (0 < f <= 1) of each split's distinct media files.
        seed: with --sample: the seed of the choice.
        num_frames: with --media: frames taken per video (the datamodule's num_frames).
        workers: with --media: decoding threads.
        show: with --media: paths listed per kind of problem.
    """
    from ibkit.data.catalog import check_root, format_check
    from ibkit.data.media_check import MediaCheckOptions

    if not Path(root).is_dir():
        raise UsageError(f"--root {root} is not a directory")
    if not 0 < sample <= 1:
        raise UsageError(f"--sample must be a fraction in (0, 1], got {sample}")
    if num_frames <= 0 or workers <= 0:
        raise UsageError("--num_frames and --workers must be positive")
    names = [dataset] if isinstance(dataset, str) else dataset
    if custom is not None:
        from ibkit.data.registry.custom import entries_from_yaml, register_custom

        try:
            declared = register_custom(entries_from_yaml(custom))
        except (OSError, ValueError) as error:
            raise UsageError(f"--custom {custom}: {error}") from error
        names = names or [entry.name for entry in declared]
    options = MediaCheckOptions(sample, seed, num_frames, workers, progress=True) if media else None
    results = check_root(Path(root), names=names, suite=_suite(suite), media=options)
    print(format_check(results, show=show, named=bool(names)))
    failed = any(
        r.status == "error" or (names and r.status == "missing") or not r.media_clean for r in results
    )
    return 1 if failed else 0


def cache_features(
    module: Any,
    datamodule: Any,
    cache_dir: str,
    stages: str = "fit,validate",
    dtype: str = "auto",
    batch_size: int = 32,
    num_workers: int = 4,
    device: str | None = None,
) -> int:
    """Encode a training configuration's images once with its frozen encoder and store the features.

    Every option not listed here (--config FILE, --model.x=..., --data.y=...) is the
    training configuration; it builds module and datamodule.

    Args:
        module: the training module of the run's configuration (its frozen image encoder).
        datamodule: the datamodule of the run's configuration (its datasets and transforms).
        cache_dir: folder of the caches (one subfolder per dataset).
        stages: comma list: fit (training sets), validate/test (held-out).
        dtype: float16 | bfloat16 | auto (bf16 for a bf16 encoder).
        batch_size: frames per encoder batch.
        num_workers: image decoding workers.
        device: default: cuda if available, else cpu.
    """
    import torch

    from ibkit.data.feature_cache import FeatureCacheError, enable_feature_cache
    from ibkit.training.callbacks import frozen_encoder_to_cache

    stage_list = [s.strip() for s in stages.split(",") if s.strip()]
    try:
        encoder = frozen_encoder_to_cache(module)  # as the fit's FeatureCacheCallback sees it: the cache it finds
        datamodule.prepare_data()  # e.g. the tiny shapes workspace renders its images here
        for stage in stage_list:
            datamodule.setup(stage)
        encoder.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        added = enable_feature_cache(
            datamodule, encoder, cache_dir, stages=stage_list, dtype=dtype,
            batch_size=batch_size, num_workers=num_workers,
        )
    except FeatureCacheError as error:
        print(f"ibkit data cache-features: {error}")
        return 2
    print(f"feature cache {cache_dir}: {added} item(s) encoded")
    return 0

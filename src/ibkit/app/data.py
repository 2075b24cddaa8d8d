"""``ibkit data list|check|cache-features``: the command side of ibkit.data.catalog and ibkit.data.feature_cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ibkit.app.commands import UsageError


def _suite(suite: str) -> str | None:
    return None if suite == "all" else suite


def data_list(suite: str = "instructblip") -> int:
    """Table of the registered datasets.

    Args:
        suite: instructblip | shapes | all.
    """
    from ibkit.data.catalog import dataset_rows, format_table

    print(format_table(dataset_rows(_suite(suite))))
    return 0


def data_check(
    root: Path, dataset: str | list[str] | None = None, suite: str = "instructblip", custom: Path | None = None
) -> int:
    """Which datasets/splits are present under a data root.

    Exits with 1 when a file is broken or a dataset asked for by name is entirely absent.

    Args:
        root: data root the registry paths are under.
        dataset: check only this dataset (several: --dataset+=a --dataset+=b, or --dataset '[a, b]').
        suite: instructblip | shapes | custom | all.
        custom: a YAML file declaring custom datasets (a training config with data.init_args.custom_datasets,
            or their list); without --dataset, those are checked.
    """
    from ibkit.data.catalog import check_root, format_check

    if not Path(root).is_dir():
        raise UsageError(f"--root {root} is not a directory")
    names = [dataset] if isinstance(dataset, str) else dataset
    if custom is not None:
        from ibkit.data.registry.custom import entries_from_yaml, register_custom

        try:
            declared = register_custom(entries_from_yaml(custom))
        except (OSError, ValueError) as error:
            raise UsageError(f"--custom {custom}: {error}") from error
        names = names or [entry.name for entry in declared]
    results = check_root(Path(root), names=names, suite=_suite(suite))
    print(format_check(results))
    failed = any(r.status == "error" or (names and r.status == "missing") for r in results)
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

    module.configure_model()
    stage_list = [s.strip() for s in stages.split(",") if s.strip()]
    datamodule.prepare_data()  # e.g. the tiny shapes workspace renders its images here
    for stage in stage_list:
        datamodule.setup(stage)
    encoder = module.model.vision_encoder
    encoder.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        added = enable_feature_cache(
            datamodule, encoder, cache_dir, stages=stage_list, dtype=dtype,
            batch_size=batch_size, num_workers=num_workers,
        )
    except FeatureCacheError as error:
        print(f"ibkit data cache-features: {error}")
        return 2
    print(f"feature cache {cache_dir}: {added} item(s) encoded")
    return 0

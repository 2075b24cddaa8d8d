"""Where each dataset's files go under a data root, written out from the registry specs.

One function makes the text of ``ibkit data list --layout``, the "expected layout" lines of
``ibkit data check`` and docs/data.md, so the documentation cannot drift from what the readers open:
annotation files come from each spec's ``files``, file names inside a media folder from its
``media_layout``.
"""

from __future__ import annotations

from pathlib import Path

from ibkit.data.registry import MEDIA_ROLES, DatasetSpec, list_specs, resolve_paths

DOCS_COMMAND = "ibkit data list --layout --markdown > docs/data.md"


def layout_lines(
    spec: DatasetSpec, root: Path | None = None, overrides: dict[str, str] | None = None
) -> list[str]:
    """The files of ``spec`` one per line (media folders with the names inside them, indented).

    Paths are relative to the data root, or absolute under ``root`` (with the run's ``overrides``).
    """
    if root is None:
        paths = {role: relative for role, relative in spec.files.items()}
    else:
        paths = {role: str(path) for role, path in resolve_paths(spec, root, overrides).items()}
    roles_of: dict[str, list[str]] = {}
    for role, path in paths.items():
        roles_of.setdefault(path, []).append(role)
    shown = {path: path + "/" if roles[0] in MEDIA_ROLES else path for path, roles in roles_of.items()}
    width = max(len(text) for text in shown.values())
    lines = []
    for path, roles in roles_of.items():
        optional = ", optional" if all(role in spec.optional for role in roles) else ""
        lines.append(f"{shown[path].ljust(width)}  ({', '.join(roles)}{optional})")
        if roles[0] in MEDIA_ROLES:
            lines += [f"  {pattern}" for pattern in spec.media_layout]
    return lines


def _heading(spec: DatasetSpec) -> str:
    kind = "held-in" if spec.held_in else "held-out"
    return f"{spec.name} [{kind}, {spec.modality}]" + (f": {spec.description}" if spec.description else "")


def layout_text(suite: str | None = "instructblip", names: list[str] | None = None) -> str:
    """Every dataset of ``suite`` (or ``names``): a heading line, then its files indented."""
    specs = [spec for spec in list_specs(suite) if names is None or spec.name in names]
    blocks = ["\n".join([_heading(spec), *(f"  {line}" for line in layout_lines(spec))]) for spec in specs]
    return "\n\n".join(blocks)


def layout_markdown(suite: str | None = "instructblip") -> str:
    """docs/data.md: the layout of every dataset of ``suite``, from :func:`layout_lines`."""
    parts = [
        "# Where the data goes",
        "",
        f"Generated from the dataset registry (`src/ibkit/data/registry/`) by `{DOCS_COMMAND}`;",
        "a test fails when this file and the registry disagree, so edit the specs and regenerate.",
        "",
        "Paths are relative to the data root (`data_root` of the datamodule, `--root` of `ibkit data check`);",
        "any file or folder can be moved with the datamodule's `paths` option, e.g.",
        "`paths: {vqav2: {images: /fast/coco/images}}`. Under a media folder (`images/`, `videos/`) the",
        "indented lines are the file names the reader builds: `<field>` is a field of the annotation",
        "record (`<image_id:012d>`: zero-padded to 12 digits). A role in parentheses names the split an",
        "annotation file is read for; several splits may share one file.",
        "",
        "Check a data root with `ibkit data check --root DATA --media` (every referenced image and video",
        "is opened and decoded; `--sample 0.05` checks a seeded 5% of each split).",
    ]
    for held_in in (True, False):
        parts += ["", f"## {'Held-in (training)' if held_in else 'Held-out (zero-shot evaluation)'} datasets"]
        for spec in list_specs(suite):
            if spec.held_in != held_in:
                continue
            summary = f"{spec.family}, {spec.modality}" + (
                f"; {spec.description}" if spec.description else ""
            )
            parts += ["", f"### {spec.name}", "", summary, "", "```", *layout_lines(spec), "```"]
    return "\n".join(parts) + "\n"

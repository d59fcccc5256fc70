"""Cheap checks that a step directory holds a finished, readable checkpoint.

orbax writes a step to `<dir>/<step>.orbax-checkpoint-tmp-*` and renames it to `<dir>/<step>`
when done, adding `commit_success.txt` (the commit marker) and `_CHECKPOINT_METADATA`. A step
directory lacking the marker, an item, or with metadata that does not parse is unusable; so is
one whose arrays fail to read (found only by restoring). Unusable steps are moved aside to
`<dir>/<step>.corrupt[-n]` (a name orbax does not list) so the run can save that step again.
"""

from __future__ import annotations

import json

from etils.epath import Path  # a local path or an object-store URL (mipo_jax.paths)

COMMIT_MARKER = "commit_success.txt"
STEP_METADATA = "_CHECKPOINT_METADATA"
ITEMS = ("state", "data_iter", "config", "meta")
_JSON_FILES = ("state/_METADATA", "data_iter/metadata", "config/metadata", "meta/metadata")
TMP_MARK = ".orbax-checkpoint-tmp"


def step_problem(step_dir: Path) -> str | None:
    """Why `step_dir` is not a complete checkpoint, or None when it looks complete."""
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        return "the step directory is missing"
    if not (step_dir / COMMIT_MARKER).is_file():
        return f"no commit marker {COMMIT_MARKER}: the save never finished"
    missing = [item for item in ITEMS if not (step_dir / item).is_dir()]
    if missing:
        return f"missing item(s) {', '.join(missing)}"
    for name in (STEP_METADATA, *_JSON_FILES):
        try:
            json.loads((step_dir / name).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"unreadable {name}: {type(e).__name__}: {e}"
    return None


def unfinished_saves(directory: Path) -> list[Path]:
    """Temporary directories of saves that never finished (orbax ignores them)."""
    directory = Path(directory)
    return sorted(p for p in directory.glob(f"*{TMP_MARK}*") if p.is_dir())


def move_aside(step_dir: Path) -> Path:
    """Rename an unusable step directory to `<step>.corrupt[-n]`; returns the new path."""
    step_dir = Path(step_dir)
    target = step_dir.with_name(f"{step_dir.name}.corrupt")
    n = 1
    while target.exists():
        target = step_dir.with_name(f"{step_dir.name}.corrupt-{n}")
        n += 1
    step_dir.rename(target)
    return target

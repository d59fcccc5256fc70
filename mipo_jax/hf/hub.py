"""Hub model ids -> local folders, through ``huggingface_hub`` as transformers resolves them.

``resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", revision=None)`` returns the folder
of the hub cache's snapshot (``$HF_HUB_CACHE/models--ORG--NAME/snapshots/<commit>``), after
downloading what it lacks: ``config.json``, the tokenizer files and the safetensors weights
(the shards the index names, never ``*.bin`` or duplicate consolidated files). As in
``transformers.from_pretrained``:

* files already in the cache are not downloaded again;
* offline (``HF_HUB_OFFLINE=1``, or no connection) only the cache is read: ``revision``
  (a branch or tag through ``refs/``, or a commit) must be there, else `HubModelNotFound`
  says what to run where there is network;
* ``revision`` pins a branch, tag or commit (default ``main``).

A path that exists is used as it is (``hf:<folder>``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mipo_jax import paths

META_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
SINGLE_WEIGHTS = "model.safetensors"


class HubModelNotFound(FileNotFoundError):
    """A model spec that is neither a local folder nor a hub model available here."""


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` is a valid hub repo id (``name`` or ``org/name``)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def resolve_model(
    spec: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    weights: bool = True,
) -> Path:
    """The local folder of ``spec`` (``hf:`` prefix optional): a folder, a hub snapshot, or
    a local copy of an object-store folder (``gs://...``, `mipo_jax.paths.local_dir`).

    ``weights=False`` fetches only config and tokenizer files (for a tokenizer).
    """
    spec = os.fspath(spec).removeprefix("hf:")
    if paths.is_remote(spec):  # an object-store folder (a remote run's export): a local copy
        return Path(paths.local_dir(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise HubModelNotFound(f"{spec} is a file; hf: expects a model folder (GGUF: gguf:<file>)")
    if spec.startswith((".", "/", "~")) or not is_hub_id(spec):
        raise HubModelNotFound(f"{spec}: no such model folder (and not a hub id: org/name)")
    folder = _snapshot(spec, revision, cache_dir, list(META_FILES))
    if weights and not (folder / "config.json").is_file():
        raise HubModelNotFound(f"{_where(spec, revision)}: the snapshot has no config.json")
    if weights:
        index = folder / "model.safetensors.index.json"
        names = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.is_file()
            else [SINGLE_WEIGHTS]
        )
        commit = hub_commit(folder) or revision  # the weights of the same commit
        folder = _snapshot(spec, commit, cache_dir, list(META_FILES) + names)
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise HubModelNotFound(
                f"{_where(spec, revision)}: the snapshot {folder} lacks {missing[:3]} (no "
                "safetensors weights, or an incomplete download; *.bin checkpoints are not read)"
            )
    return folder


def hub_commit(folder: str | os.PathLike) -> str | None:
    """The commit of a hub-cache snapshot folder (``.../snapshots/<commit>``), else None."""
    folder = Path(folder)
    return folder.name if folder.parent.name == "snapshots" else None


def _where(repo_id: str, revision: str | None) -> str:
    return f"hf:{repo_id} (revision {revision or 'main'})"


def _snapshot(repo_id: str, revision, cache_dir, patterns: list[str]) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns
            )
        )
    except LocalEntryNotFoundError as e:
        cache = cache_dir or constants.HF_HUB_CACHE
        why = (
            "HF_HUB_OFFLINE=1 forbids downloading"
            if constants.is_offline_mode()
            else "the hub cannot be reached"
        )
        raise HubModelNotFound(
            f"{_where(repo_id, revision)}: not a local folder, and not in the hub cache "
            f"{cache}, and {why}. Download it where there is network (`hf download {repo_id}"
            f"{f' --revision {revision}' if revision else ''}`, then copy the cache), or give "
            "a local folder"
        ) from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise HubModelNotFound(f"{_where(repo_id, revision)}: {e}") from e

"""One path layer for what a run reads and writes under its workdir and caches.

A workdir or cache directory is a local path or an object-store URL (``gs://bucket/run``,
``s3://``, ``az://``: whatever `etils.epath` reaches, through fsspec's gcsfs, s3fs or adlfs,
the one installed for the scheme). Metrics, TensorBoard events, the summary, the plot, the HF
export, the reference and TIS-DPO caches, rounds and checkpoints (orbax, itself on
`etils.epath`) all go through these helpers, so a URL works wherever a local path does.

Local paths behave as plain files always did: ``write_bytes`` writes ``<path><tmp>`` and
renames it over ``path`` (atomic), ``append_bytes`` appends. Object stores have neither
rename nor append: a write uploads the whole object (atomic by itself) and an append reads
the object and uploads it again with the new bytes (`mipo_jax.train.writer` therefore buffers
``metrics.jsonl`` and uploads it whole, see there). Paths are passed around as strings.
"""

from __future__ import annotations

import atexit
import io
import os
import re
import shutil
import tempfile

from etils import epath

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path) -> bool:
    """Whether ``path`` is a URL (``gs://``, ``s3://``, ...) rather than a local path."""
    return bool(_URL.match(os.fspath(path)))


def resolve(path) -> str:
    """A workdir as runs record it: local paths absolute (``~`` expanded), URLs as given
    less a trailing slash."""
    path = os.fspath(path)
    if is_remote(path):
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path))


def join(base, *parts: str) -> str:
    """``base/part/...`` for a local path or a URL (a string)."""
    return os.path.join(os.fspath(base), *parts)


def dirname(p) -> str:
    """The folder holding ``p`` (``os.path.dirname``, which suits URLs too)."""
    return os.path.dirname(os.fspath(p))


def path(p) -> epath.Path:
    """``p`` as an `etils.epath.Path` (what orbax takes)."""
    return epath.Path(os.fspath(p))


def exists(p) -> bool:
    return os.path.exists(p) if not is_remote(p) else path(p).exists()


def makedirs(p) -> None:
    """Create the directory ``p`` and its parents (object stores: nothing to create)."""
    if is_remote(p):
        path(p).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(p, exist_ok=True)


def rmtree(p) -> None:
    """Remove the directory ``p`` and everything under it; a missing one is fine."""
    if is_remote(p):
        path(p).rmtree(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


def read_bytes(p) -> bytes:
    if is_remote(p):
        return path(p).read_bytes()
    with open(p, "rb") as f:
        return f.read()


def read_text(p) -> str:
    return read_bytes(p).decode()


def write_bytes(p, data: bytes, *, tmp: str = ".tmp") -> None:
    """Replace ``p`` by ``data`` atomically: locally through ``<p><tmp>`` and a rename, on an
    object store as one object upload."""
    if is_remote(p):
        path(p).write_bytes(data)
        return
    with open(p + tmp, "wb") as f:
        f.write(data)
    os.replace(p + tmp, p)


def write_text(p, text: str, *, tmp: str = ".tmp") -> None:
    write_bytes(p, text.encode(), tmp=tmp)


def append_bytes(p, data: bytes) -> None:
    """Append to ``p`` (created if missing); an object store rewrites the whole object."""
    if is_remote(p):
        old = read_bytes(p) if exists(p) else b""
        path(p).write_bytes(old + data)
        return
    with open(p, "ab") as f:
        f.write(data)


def open_write(p):
    """A binary file open for writing ``p`` (an object store uploads it on close)."""
    return path(p).open("wb") if is_remote(p) else open(p, "wb")


def write_with(p, save, *, tmp_path: str) -> None:
    """Write ``p`` with ``save(file)`` (e.g. ``lambda f: np.save(f, x)``) atomically: locally
    ``save(tmp_path)`` then a rename over ``p``; on an object store ``save`` fills a buffer
    uploaded as one object."""
    if is_remote(p):
        buf = io.BytesIO()
        save(buf)
        path(p).write_bytes(buf.getvalue())
        return
    save(tmp_path)
    os.replace(tmp_path, p)


def load_npy(p, *, mmap_mode=None):
    """``np.load`` of a ``.npy``/``.npz`` file; memory-mapped only when local."""
    import numpy as np

    if is_remote(p):
        return np.load(io.BytesIO(read_bytes(p)))
    return np.load(p, mmap_mode=mmap_mode)


_COPIES: dict[str, str] = {}


def local_dir(folder) -> str:
    """A local folder with the files of ``folder``: itself when local; an object-store folder
    is downloaded once per process (its files, recursively) to a temporary folder removed at
    exit (readers such as safetensors memory-map local files)."""
    folder = os.fspath(folder)
    if not is_remote(folder):
        return folder
    folder = folder.rstrip("/")
    if folder in _COPIES:
        return _COPIES[folder]
    src = path(folder)
    if not src.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    dest = tempfile.mkdtemp(prefix="mipo_jax-copy-")
    atexit.register(shutil.rmtree, dest, ignore_errors=True)
    _download(src, dest)
    _COPIES[folder] = dest
    return dest


def _download(src: epath.Path, dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    for child in src.iterdir():
        if child.is_dir():
            _download(child, os.path.join(dest, child.name))
        else:
            with open(os.path.join(dest, child.name), "wb") as f:
                f.write(child.read_bytes())


def upload_dir(local: str, dest) -> None:
    """Copy the files of the local folder ``local`` (recursively) to the folder ``dest``."""
    for root, _, files in os.walk(local):
        rel = os.path.relpath(root, local)
        for name in files:
            target = join(dest, name) if rel == "." else join(dest, rel, name)
            with open(os.path.join(root, name), "rb") as f:
                write_bytes(target, f.read())


def save_into(folder, save) -> None:
    """Call ``save(local_folder)`` (e.g. a tokenizer's ``save_pretrained``) so that its files
    land in ``folder``: directly when local, through a temporary folder otherwise."""
    folder = os.fspath(folder)
    if not is_remote(folder):
        save(folder)
        return
    with tempfile.TemporaryDirectory(prefix="mipo_jax-save-") as tmp:
        save(tmp)
        upload_dir(tmp, folder)

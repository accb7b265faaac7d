"""The one path type of ctelm_jax: `etils.epath.Path`, for local folders and gs:// (any fsspec URI) alike.

Everything that reads or writes a run (workdir, checkpoints, logs, embeddings, exports, evaluation outputs) takes its
paths through `as_path`; `pathlib.Path("gs://b/run")` would silently become the local folder `gs:/b/run`. Where a
library writes only to local file names (safetensors, tokenizers, tensorboardX), it writes into a local folder that
`MirroredDir` uploads (on every `sync`) or that `publish_dir` puts in place of a remote folder; `local_copy` brings a
remote folder down for a library that only reads local files. gs:// goes through gcsfs with Google's default
credentials; `STORAGE_EMULATOR_HOST` points it at an emulator (orbax's tensorstore: `TENSORSTORE_GCS_HTTP_URL`).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import posixpath
import re
import secrets
import shutil
import tempfile
from typing import Iterator

import fsspec
from etils import epath

from ctelm_jax.errors import MissingInput

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_MANGLED_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/(?!/)")  # 2+ letters: not a drive (C:/)
_COPY_CHUNK = 64 * 2**20


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URI (gs://bucket/...) rather than a local path."""
    return bool(_URI.match(os.fspath(path)))


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an `epath.Path`: a URI as it is, a local path made absolute."""
    text = os.fspath(path)
    if _MANGLED_URI.match(text):
        raise ValueError(f"{text!r} looks like a URI that lost one slash of its '//' (pathlib.Path('gs://b') gives "
                         "'gs:/b'); pass the URI itself, e.g. 'gs://bucket/run', or a path from ctelm_jax.fs.as_path.")
    return epath.Path(text) if is_remote(text) else epath.Path(text).absolute()


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copies one file between any two places (local or remote), streaming, without holding it in memory."""
    with as_path(src).open("rb") as fin, as_path(dst).open("wb") as fout:
        shutil.copyfileobj(fin, fout, _COPY_CHUNK)


def hidden_sibling(path: pathlib.Path, tag: str) -> pathlib.Path:
    """A new hidden folder beside local `path`, made by a plain mkdir: the umask's permissions, not mkdtemp's 0700."""
    folder = path.parent / f".{path.name}.{tag}-{secrets.token_hex(6)}"
    folder.mkdir()
    return folder


def share_like_folder(folder: pathlib.Path) -> None:
    """Gives everything under local `folder` the folder's own permissions (files without x bits), so that what a
    library wrote privately (safetensors: 0600 files) gets what a plain write would (0644 under umask 022)."""
    mode = folder.stat().st_mode & 0o777
    for path in folder.rglob("*"):
        if not path.is_symlink():  # never change a file outside `folder`
            path.chmod(mode if path.is_dir() else mode & 0o666)


def _files(folder: str | os.PathLike) -> list[str]:
    """Paths (relative, '/'-separated) of every file under `folder`, local or remote, sorted."""
    store, root = fsspec.core.url_to_fs(os.fspath(folder))
    return sorted(posixpath.relpath(path, root) for path in store.find(root))


@contextlib.contextmanager
def local_copy(folder: str | os.PathLike) -> Iterator[pathlib.Path]:
    """A local folder holding `folder`'s files: the folder itself when local, else a temporary download of it."""
    folder = as_path(folder)
    if not is_remote(folder):
        yield pathlib.Path(folder)
        return
    if not folder.is_dir():
        raise MissingInput(f"{folder}: no such folder.")
    with tempfile.TemporaryDirectory(prefix="ctelm-download-") as tmp:
        for rel in _files(folder):
            (pathlib.Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            copy_file(folder / rel, pathlib.Path(tmp) / rel)
        yield pathlib.Path(tmp)


def publish_dir(local: pathlib.Path, dest: epath.Path, last: str) -> None:
    """Puts local folder `local`'s files in place of remote folder `dest`, as safely as an object store allows.

    Object stores have no atomic folder rename, so: 1. upload everything under a hidden staging prefix beside `dest`
    (the slow part; `dest` is untouched, and a failure removes the staging prefix); 2. delete `dest`'s old files,
    `last` first; 3. copy the staged files in (server-side copies), `last` copied last, then delete the staging
    prefix. A folder holding `last` is therefore complete; a reader during steps 2-3 sees a folder without it, and a
    failure in step 3 leaves the new files under the staging prefix (named in the error).
    """
    if not is_remote(dest):
        raise ValueError(f"publish_dir is for remote folders; {dest} is local (rename a local folder instead).")
    staging = dest.parent / f".{dest.name}.tmp-{secrets.token_hex(6)}"
    names = sorted(_files(local), key=lambda name: name == last)
    if last not in names:
        raise ValueError(f"{local} has no {last}; it marks the published folder complete, so it must be written.")
    try:
        for name in names:
            copy_file(local / name, staging / name)
    except BaseException:
        if staging.exists():
            staging.rmtree()
        raise
    if (dest / last).exists():
        (dest / last).unlink()
    if dest.exists():
        dest.rmtree()
    store, _ = fsspec.core.url_to_fs(os.fspath(dest))
    try:
        for name in names:
            store.copy(os.fspath(staging / name), os.fspath(dest / name))
    except Exception as e:
        raise OSError(f"copying {staging} into {dest} failed ({e}); {dest} is incomplete (no {last}) and the new "
                      f"files are under {staging}.") from e
    staging.rmtree()


class MirroredDir:
    """A local folder standing for folder `dest`, for files that are only ever appended to (logs): `dest` itself
    when local; for a remote `dest`, a temporary folder that starts with `dest`'s files and whose new or grown files
    `sync` uploads. A grown file's new bytes are appended server-side where the store can (GCS compose: one small
    upload per sync however long the log), else the file is uploaded whole. Only files directly in the folder count."""

    def __init__(self, dest: str | os.PathLike):
        self.dest = as_path(dest)
        self._temp = None
        self._synced: dict[str, tuple[int, int]] = {}
        if not is_remote(self.dest):
            self.local = pathlib.Path(self.dest)
            self.local.mkdir(parents=True, exist_ok=True)
            return
        self._store = fsspec.core.url_to_fs(os.fspath(self.dest))[0]
        self._temp = tempfile.TemporaryDirectory(prefix="ctelm-mirror-")
        self.local = pathlib.Path(self._temp.name)
        if self.dest.is_dir():
            for path in self.dest.iterdir():
                if path.is_file():
                    copy_file(path, self.local / path.name)
        self._synced = {p.name: _signature(p) for p in self.local.iterdir()}

    def sync(self) -> None:
        """Uploads what is new or grown since the last sync (nothing to do for a local `dest`)."""
        if self._temp is None:
            return
        for path in sorted(self.local.iterdir()):
            if path.is_file() and self._synced.get(path.name) != (signature := _signature(path)):
                self._upload(path, self._synced.get(path.name, (0, 0))[0])
                self._synced[path.name] = signature

    def _upload(self, path: pathlib.Path, uploaded: int) -> None:
        """Brings `dest`'s copy of `path`, of which the first `uploaded` bytes are there, up to date."""
        target = self.dest / path.name
        append = getattr(self._store, "merge", None)  # gcsfs: objects.compose
        if not uploaded or append is None or path.stat().st_size < uploaded:
            copy_file(path, target)
            return
        tail = self.dest / f".{path.name}.tail-{secrets.token_hex(6)}"
        with path.open("rb") as f:
            f.seek(uploaded)
            tail.write_bytes(f.read())
        append(os.fspath(target), [os.fspath(target), os.fspath(tail)])
        tail.unlink()

    def close(self) -> None:
        """Syncs, then removes the local stand-in of a remote `dest`."""
        self.sync()
        if self._temp is not None:
            self._temp.cleanup()
            self._temp = None


def _signature(path: pathlib.Path) -> tuple[int, int]:
    """(size, mtime in ns) of a local file: what changes when it is written."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns

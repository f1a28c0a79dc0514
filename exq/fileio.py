"""Atomic writes and checked reads shared by every file format exq writes.

Writes go to a temporary file in the destination folder and are renamed into place, so a crash or a full disk never
leaves a half-written file where a later stage would read it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exq.errors import ExqError, FormatError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` and move the result to `path` only if it succeeded."""
    path = Path(path)
    if path.is_dir():
        raise ExqError(f"output path {path} is a directory", "give a file name, e.g. runs/profile.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExqError(f"cannot create folder {path.parent}: {e.strerror}") from e
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; match what open() gives
        os.replace(tmp, path)
    except OSError as e:
        raise ExqError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        if tmp.exists():
            tmp.unlink()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def dumps_json(obj: Any) -> bytes:
    """Canonical JSON: sorted keys and fixed separators, so equal content gives equal bytes."""
    return (json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, dumps_json(obj))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | Path, what: str) -> Any:
    """Read a JSON file, turning every way it can fail into a FormatError that names the file and what it should be."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{what} {path} does not exist")
    if path.is_dir():
        raise FormatError(f"{what} {path} is a directory, not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(f"cannot read {what} {path}: {e}") from e
    if not text.strip():
        raise FormatError(f"{what} {path} is empty", "re-create it; exq writes complete files only")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(
            f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); it is truncated or was "
            "edited by hand",
            "re-create it with the exq command that wrote it",
        ) from e


# ---- sealed files: a versioned JSON header (+ an optional .npz of arrays), each hashed ----


def seal(header: dict) -> dict:
    """Add `content_sha256`, a hash of everything else, so any later edit is detected on load."""
    body = {k: v for k, v in header.items() if k != "content_sha256"}
    return {**body, "content_sha256": sha256_bytes(dumps_json(body))}


def save_sealed(path: str | Path, header: dict, arrays: dict | None = None) -> Path:
    """Write NAME.json (and NAME.npz when arrays are given), both atomically; the JSON records the arrays' hash."""
    import io

    import numpy as np

    path = Path(path)
    if path.is_dir():
        raise ExqError(f"output path {path} is a directory", "give a file name ending in .json")
    if path.suffix != ".json":
        raise ExqError(f"output path {path} should end in .json")
    header = dict(header)
    if arrays is not None:
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        data = buf.getvalue()
        atomic_write_bytes(path.with_suffix(".npz"), data)
        header["arrays"] = {"file": path.with_suffix(".npz").name, "sha256": sha256_bytes(data)}
    atomic_write_json(path, seal(header))
    return path


def load_sealed(path: str | Path, fmt: str, version: int, what: str, remake: str) -> tuple[dict, dict]:
    """Read a sealed file: check its format name, schema version, content hash and arrays hash.

    Returns (header, arrays); `remake` is the command that re-creates the file, for the error hints.
    """
    import zipfile

    import numpy as np

    path = Path(path)
    h = read_json(path, what)
    if not isinstance(h, dict) or h.get("format") != fmt:
        got = h.get("format") if isinstance(h, dict) else type(h).__name__
        raise FormatError(f"{path} is not an exq {what} (format {got!r})")
    got = h.get("schema_version")
    if got != version:
        newer = isinstance(got, int) and got > version
        raise FormatError(
            f"{what} {path} has schema version {got}; this exq reads version {version}",
            "upgrade exq" if newer else f"re-create it with `{remake}`",
        )
    if h.get("content_sha256") != seal(h)["content_sha256"]:
        raise FormatError(
            f"{what} {path} was modified after it was written (content hash mismatch)",
            f"re-create it with `{remake}`; do not edit it by hand",
        )
    arrays: dict = {}
    if "arrays" in h:
        try:
            arrays_path = path.parent / Path(str(h["arrays"]["file"])).name
            want = str(h["arrays"]["sha256"])
        except (KeyError, TypeError) as e:
            raise FormatError(f"{what} {path} has a malformed arrays entry", f"re-create it with `{remake}`") from e
        if not arrays_path.is_file():
            raise FormatError(f"{what} arrays {arrays_path} are missing", "keep the .npz next to the .json")
        if sha256_file(arrays_path) != want:
            raise FormatError(
                f"{what} arrays {arrays_path} do not belong to {path} (hash mismatch: overwritten or corrupt)",
                f"re-create it with `{remake}`",
            )
        try:
            with np.load(arrays_path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise FormatError(f"cannot read {what} arrays {arrays_path}: {e}") from e
    return h, arrays

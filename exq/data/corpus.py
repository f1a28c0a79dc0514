"""Corpus files -> per-domain token streams.

Each file is one domain. Only as much text is read and tokenized as the tokens asked for need, so taking 20 k tokens
from a 10 MB file reads only the start of it. Sequences are contiguous windows of the stream, without special tokens
and without padding: every position profiled is a real token.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from exq.errors import ExqError

_CHUNK_CHARS = 1 << 16
_MARGIN = 256  # tokens read past the ones returned


@dataclass
class Domain:
    name: str
    path: Path | None  # None for token streams given directly
    tokens: torch.Tensor  # [n] int64


def domain_name(path: str | Path) -> str:
    name = Path(path).name
    for suffix in (".gz", ".txt"):
        name = name.removesuffix(suffix)
    return name


def _open_text(path: Path) -> io.TextIOBase:
    raw = path.open("rb")
    head = raw.peek(2)[:2] if hasattr(raw, "peek") else b""
    stream = gzip.GzipFile(fileobj=raw) if head == b"\x1f\x8b" else raw
    return io.TextIOWrapper(stream, encoding="utf-8", errors="strict")


def _text_chunks(path: Path) -> Iterator[str]:
    """Text in ~64 k-character pieces cut at line ends, so no word is split between tokenizer calls."""
    carry = ""
    try:
        with _open_text(path) as f:
            while True:
                block = f.read(_CHUNK_CHARS)
                if not block:
                    break
                block = carry + block
                cut = block.rfind("\n") + 1
                if cut == 0:
                    carry = block
                    continue
                carry = block[cut:]
                yield block[:cut]
    except UnicodeDecodeError as e:
        raise ExqError(f"corpus file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise ExqError(f"cannot read corpus file {path}: {e}", "is it a complete .txt or .txt.gz file?") from e
    if carry:
        yield carry


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise ExqError(f"corpus file {path} does not exist")
    if path.is_dir():
        raise ExqError(f"corpus path {path} is a directory", "list the text files, e.g. corpus/*.txt.gz")
    try:
        with path.open("rb"):
            pass
    except OSError as e:
        raise ExqError(f"cannot read corpus file {path}: {e.strerror}") from e


def read_text(path: str | Path) -> str:
    """A whole corpus file as text (plain or gzip)."""
    path = Path(path)
    _check_readable(path)
    return "".join(_text_chunks(path))


def tokenize_file(path: str | Path, tokenizer, max_tokens: int | None) -> torch.Tensor:
    """The first `max_tokens` tokens of a file (all of it if None), exactly as tokenizing the whole file gives them.

    Only a prefix is read: it grows until it yields `_MARGIN` tokens more than needed, so the cut at its end (where
    a word may be split) never reaches the tokens returned.
    """
    path = Path(path)
    _check_readable(path)
    text, want_chars, ids = "", (max_tokens or 0) * 6 + 4096, None
    for chunk in _text_chunks(path):
        text += chunk
        if max_tokens is not None and len(text) >= want_chars:
            ids = _encode(tokenizer, text)
            if len(ids) >= max_tokens + _MARGIN:
                break
            want_chars = 2 * len(text)
            ids = None
    if ids is None:
        ids = _encode(tokenizer, text)
    tokens = torch.tensor(ids if max_tokens is None else ids[:max_tokens], dtype=torch.long)
    if tokens.numel() == 0:
        raise ExqError(f"corpus file {path} is empty (no tokens)", "give a file with text in it")
    return tokens


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] if text else []


def split_evenly(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def load_domains(paths: list[str | Path], tokenizer, tokens: int) -> list[Domain]:
    """`tokens` in all, split evenly over the files; a file too short for its share is an error, not a skew."""
    if not paths:
        raise ExqError("no corpus files given", "pass one or more text files with --corpus")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
        raise ExqError(f"--tokens must be a positive integer, got {tokens!r}")
    if tokens < len(paths):
        raise ExqError(f"--tokens {tokens} is fewer than the {len(paths)} corpus files", "ask for more tokens")
    names = [domain_name(p) for p in paths]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ExqError(f"corpus files share a domain name ({', '.join(dup)})", "give each file a distinct name")
    domains = []
    for path, name, share in zip(paths, names, split_evenly(tokens, len(paths)), strict=True):
        ids = tokenize_file(path, tokenizer, share)
        if ids.numel() < share:
            raise ExqError(
                f"corpus file {path} has only {ids.numel()} tokens but its share of --tokens {tokens} is {share}",
                f"lower --tokens to at most {ids.numel() * len(paths)} or use a longer file",
            )
        domains.append(Domain(name=name, path=Path(path), tokens=ids))
    return domains


def split_domains(domains: list[Domain], first: int) -> tuple[list[Domain], list[Domain]]:
    """Cut each domain in two: its even share of `first` tokens, and the rest (e.g. calibration / held-out probes)."""
    shares = split_evenly(first, len(domains))
    head = [Domain(d.name, d.path, d.tokens[:n]) for d, n in zip(domains, shares, strict=True)]
    tail = [Domain(d.name, d.path, d.tokens[n:]) for d, n in zip(domains, shares, strict=True)]
    return head, tail


def resolve_recorded(file: str, sha256: str | None, base: Path | None) -> Path:
    """A corpus file recorded by an earlier stage: as given, else next to the file that recorded it; same bytes."""
    from exq.fileio import sha256_file

    for cand in (Path(file), (base / file) if base else None, (base / Path(file).name) if base else None):
        if cand is not None and cand.is_file():
            if sha256 and sha256_file(cand) != sha256:
                raise ExqError(
                    f"corpus file {cand} has changed since it was recorded (sha256 mismatch)",
                    "pass the calibration text explicitly with --corpus",
                )
            return cand
    raise ExqError(
        f"corpus file {file} (recorded by an earlier stage) was not found",
        "pass the calibration text explicitly with --corpus",
    )


def split_tokens(tokens: torch.Tensor, seq_len: int, batch_size: int) -> Iterator[torch.Tensor]:
    """[B, L] batches of consecutive windows; the ragged tail goes alone, so no position is padding."""
    full = tokens.numel() // seq_len
    body = tokens[: full * seq_len].view(full, seq_len)
    for start in range(0, full, batch_size):
        yield body[start : start + batch_size]
    if tokens.numel() > full * seq_len:
        yield tokens[full * seq_len :].unsqueeze(0)

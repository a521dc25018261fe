"""The shard contract of ``docs/data_format.md`` in one place: names, dtype rule, fingerprint, tar reader.

Everything that writes or reads a shard folder takes its constants from here: the writer
(``data_prep/shards.py``), the loader (``pipeline/data/loader.py``) and ``proseco prep verify``
(``data_prep/verify.py``). :func:`tar_members` is the one tar reader: it walks the 512-byte tar
headers of a buffer (payloads are stepped over, never copied) and yields each member's name,
type and payload slice. Python's :mod:`tarfile` does the same walk about 10x slower (it parses
every field of every header). :func:`index_samples` groups the members into samples by
webdataset's key convention (the name up to the first dot of its last path part is the key,
the rest the extension; ``webdataset.TarWriter`` writes ``KEY.EXT``).

This module imports neither torch nor webdataset: the tokenizer worker processes of
``prep shards`` import it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from pipeline.errors import ProsecoError

FORMAT = "proseco-shards/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
DTYPES = {"uint16": np.uint16, "int32": np.int32}
TOKENS_EXT = "tokens.npy"  # the one member of a sample

TAR_BLOCK = 512
TAR_END = 2 * TAR_BLOCK  # two zero blocks close a tar
TAR_MTIME = 0  # fixed member metadata: byte-identical shards on every run
TAR_USER = "proseco"

SHARD_NAME = re.compile(r"^(train|val)/shard-(\d{5})-(\d{6})\.tar$")
SAMPLE_MEMBER = re.compile(r"^p(\d{5})-(\d{10})\.tokens\.npy$")
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_ZERO_BLOCK = bytes(TAR_BLOCK)
_FILE_TYPES = (b"0", b"\0", b"7")


SFT_MODE = "sft"  # prompt/response samples: a leading prompt-length column, then seq_len tokens


def sample_length(seq_len: int, mode: str) -> int:
    """Entries of one sample's array: ``seq_len`` tokens, plus the prompt length first in sft mode."""
    return seq_len + 1 if mode == SFT_MODE else seq_len


def dtype_for(vocab_size: int) -> str:
    """The sample dtype of the contract: uint16 when every id (specials included) fits."""
    return "uint16" if vocab_size <= 65536 else "int32"


def shard_name(split: str, partition: int, shard: int) -> str:
    """A shard's path relative to the output folder, as the manifest lists it."""
    return f"{split}/shard-{partition:05d}-{shard:06d}.tar"


def sample_key(partition: int, index: int) -> str:
    """The webdataset key of sample ``index`` (counted per partition and split) of ``partition``."""
    return f"p{partition:05d}-{index:010d}"


def canonical_json(obj: Any) -> bytes:
    """The byte string the fingerprint hashes: sorted keys, no spaces, ASCII only."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def manifest_fingerprint(manifest: dict) -> str:
    """sha256 (hex) of the canonical JSON of every manifest key other than ``fingerprint``."""
    return hashlib.sha256(canonical_json({k: v for k, v in manifest.items() if k != "fingerprint"})).hexdigest()


def split_key(name: str) -> tuple[str | None, str | None]:
    """(key, extension) of a member name by webdataset's convention; (None, None) if it has no dot."""
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2)) if match else (None, None)


class TarMember(NamedTuple):
    """One member of a tar: its full name, type flag (``b"0"`` a file), payload offset and size."""

    name: str
    kind: bytes
    offset: int
    size: int

    @property
    def is_file(self) -> bool:
        return self.kind in _FILE_TYPES


def _pax_records(data: bytes) -> dict[str, str]:
    """``"%d key=value\\n"`` records of a pax extended header."""
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] not in (b"", b"\0"):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8")] = value.decode("utf-8")
        pos += length
    return out


def tar_members(buf, where: object) -> Iterator[TarMember]:
    """Every member of the tar in ``buf`` (bytes, mmap), in order; pax/GNU long-name headers applied.

    Understands ustar members, pax extended headers (``x``: path and size overrides; ``g``
    ignored) and GNU long names (``L``), so any tar that Python's :mod:`tarfile` writes,
    webdataset's ``TarWriter`` included. Raises :class:`ProsecoError` naming ``where`` on a
    truncated or damaged tar.
    """
    pos, end = 0, len(buf)
    override: dict[str, str] = {}
    long_name: str | None = None

    def bad(why: str) -> ProsecoError:
        return ProsecoError(f"shard {where} is not a readable tar ({why} at byte {pos}); re-run `proseco prep shards`")

    while True:
        header = bytes(buf[pos:pos + TAR_BLOCK])
        if len(header) < TAR_BLOCK:
            raise bad("truncated")
        if header == _ZERO_BLOCK:
            return
        if header[257:262] != b"ustar":
            raise bad("no ustar header")
        try:
            checksum = int(header[148:156].split(b"\0")[0].strip() or b"0", 8)
            size = int(header[124:136].split(b"\0")[0].strip() or b"0", 8)
            if checksum != sum(header[:148]) + 256 + sum(header[156:]):
                raise bad("header checksum mismatch")
            kind, data = header[156:157], pos + TAR_BLOCK
            if kind in (b"x", b"g", b"L"):
                payload = bytes(buf[data:data + size])
                if kind == b"x":
                    override = _pax_records(payload)
                elif kind == b"L":
                    long_name = payload.rstrip(b"\0").decode("utf-8")
            else:
                size = int(override.get("size", size))
                name = override.get("path") or long_name
                if name is None:
                    name = header[:100].split(b"\0")[0].decode("utf-8")
                    prefix = header[345:500].split(b"\0")[0].decode("utf-8")
                    name = f"{prefix}/{name}" if prefix else name
                override, long_name = {}, None
                yield TarMember(name, kind, data, size)
        except (ValueError, UnicodeDecodeError):
            raise bad("unreadable header field") from None
        pos = data + -(-size // TAR_BLOCK) * TAR_BLOCK
        if pos > end:
            raise bad("truncated member")


def index_samples(buf, where: object) -> list[tuple[int, int]]:
    """(byte offset, size) of each sample's ``tokens.npy`` payload in tar ``buf``, in tar order.

    Regular-file members are grouped into samples by key (:func:`split_key`); other members
    (folders, links) are skipped. Raises :class:`ProsecoError` for an unreadable tar or a
    sample without a ``tokens.npy`` member.
    """
    samples: list[tuple[int, int] | None] = []
    last_key = None
    for member in tar_members(buf, where):
        if not member.is_file:
            continue
        key, ext = split_key(member.name)
        if key is None:
            continue
        if key != last_key:
            samples.append(None)
            last_key = key
        if ext == TOKENS_EXT:
            samples[-1] = (member.offset, member.size)
    if any(s is None for s in samples):
        raise ProsecoError(f"shard {where} has a sample without a {TOKENS_EXT} member; re-run `proseco prep shards`")
    return samples  # type: ignore[return-value]

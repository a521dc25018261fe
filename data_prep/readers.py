"""Corpus readers: turn input files (text, JSONL, parquet; optionally .gz/.zst) into documents.

Used by ``proseco prep tokenizer`` and ``proseco prep shards``. Everything here streams: text is
read line by line with a length cap (a single 100 MB line never sits in memory), parquet in
record batches. Bad *data* is skipped and counted in a :class:`SkipLog` (a corpus with a few
broken lines should still prepare); bad *configuration* (a missing path, a parquet file without
the text column, a corrupt compressed stream) raises :class:`ProsecoError` naming the file.

Supported formats, chosen by suffix after stripping ``.gz`` / ``.zst``:

* ``.txt`` ``.text`` ``.md``: documents split by ``doc_split``: ``line`` (each non-blank line),
  ``paragraph`` (blocks separated by blank lines, lines joined by ``\\n``) or ``file``;
* ``.jsonl`` ``.json``: one JSON object per line, text in ``text_field``;
* ``.parquet``: column ``text_field`` (not compressed again outside parquet).

Determinism: :func:`expand_inputs` sorts its result, and each file is read front to back, so the
same inputs give the same documents in the same order.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pipeline.errors import ProsecoError

DEFAULT_CORPUS = Path(__file__).parent / "corpus"
# The bundled corpus as an input list (the folder also holds a README.md, which is not corpus).
DEFAULT_INPUTS = [str(DEFAULT_CORPUS / "*.txt.gz")]

FORMATS = ("auto", "text", "jsonl", "parquet")
DOC_SPLITS = ("line", "paragraph", "file")
SKIP_REASONS = (
    "not_utf8",
    "binary_file",
    "empty_document",
    "bad_json",
    "missing_field",
    "too_long",
    "empty_file",
)
_SUFFIX_FORMAT = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl", ".json": "jsonl",
                  ".parquet": "parquet"}
_COMPRESSIONS = (".gz", ".zst")
BINARY_SNIFF_BYTES = 8192
MAX_EXAMPLES = 5
_PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class Document:
    source: str  # the input path as expanded from what the user gave (relative stays relative)
    index: int  # 0-based number of this document among those yielded from ``source``
    text: str


class SkipLog:
    """Counts of skipped items by reason, plus the first few examples (source, where, reason).

    ``where`` is a 1-based line number for text/JSONL, a 0-based row for parquet, 0 for a whole
    file. Picklable and mergeable, so per-worker logs can be combined.
    """

    def __init__(self, max_examples: int = MAX_EXAMPLES) -> None:
        self.counts: dict[str, int] = dict.fromkeys(SKIP_REASONS, 0)
        self.examples: list[dict] = []
        self.max_examples = max_examples

    def add(self, reason: str, source: str, where: int = 0, detail: str = "") -> None:
        if reason not in self.counts:
            raise ValueError(f"unknown skip reason {reason!r}; known: {', '.join(SKIP_REASONS)}")
        self.counts[reason] += 1
        if len(self.examples) < self.max_examples:
            example = {"source": source, "where": where, "reason": reason}
            if detail:
                example["detail"] = detail
            self.examples.append(example)

    def merge(self, other: SkipLog) -> SkipLog:
        """Add ``other``'s counts and examples (up to the cap) into this log; returns self."""
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
        room = self.max_examples - len(self.examples)
        self.examples.extend(other.examples[: max(room, 0)])
        return self

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        """The counts by reason (every reason present, zeros included), e.g. for a manifest."""
        return dict(self.counts)

    def __repr__(self) -> str:
        nonzero = {k: v for k, v in self.counts.items() if v}
        return f"SkipLog(total={self.total}, {nonzero})"


# ------------------------------------------------------------------ inputs


def _split_compression(path: Path) -> tuple[str, str]:
    """(format suffix, compression suffix) of ``path``, both lower-case ('' when absent)."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in _COMPRESSIONS else ""
    return (suffixes[-1] if suffixes else ""), compression


def detect_format(path: Path, fmt: str = "auto") -> str:
    """The reader format of ``path`` ('text', 'jsonl', 'parquet'); ProsecoError if unknown."""
    if fmt not in FORMATS:
        raise ProsecoError(f"unknown input format {fmt!r}; choose one of {', '.join(FORMATS)}")
    suffix, compression = _split_compression(path)
    found = _SUFFIX_FORMAT.get(suffix) if fmt == "auto" else fmt
    if found is None:
        raise ProsecoError(
            f"{path}: cannot tell the format from the suffix {suffix or '(none)'!r}; use one of "
            f"{', '.join(sorted(_SUFFIX_FORMAT))} (optionally + .gz/.zst) or set the format explicitly"
        )
    if found == "parquet" and compression:
        raise ProsecoError(f"{path}: a compressed parquet file is not supported (parquet compresses itself)")
    return found


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def expand_inputs(inputs: list[str], *, fmt: str = "auto") -> list[Path]:
    """Files, globs (``**`` allowed) and folders (recursive) -> sorted, de-duplicated file list.

    Folders contribute their non-hidden files with a known suffix (with ``fmt='auto'``; every
    non-hidden file otherwise). A named file or glob match of unknown format, a missing path, a
    glob matching nothing or a folder with no data files raise ProsecoError (all named at once)
    before any work starts.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [str(inputs)]
    if not inputs:
        raise ProsecoError("no input files given")
    found: list[Path] = []
    problems: list[str] = []
    for item in inputs:
        item = str(item)
        if glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file()]
            if not files:
                problems.append(f"{item} matches no files")
            found.extend(files)
        else:
            path = Path(item)
            if path.is_dir():
                files = sorted(
                    p for p in path.rglob("*")
                    if p.is_file() and not _is_hidden(p, path)
                    and (fmt != "auto" or _split_compression(p)[0] in _SUFFIX_FORMAT)
                )
                if not files:
                    problems.append(f"{item} is a folder with no data files "
                                    f"({', '.join(sorted(_SUFFIX_FORMAT))}, optionally .gz/.zst)")
                found.extend(files)
            elif path.is_file():
                found.append(path)
            else:
                problems.append(f"{item} does not exist")
    if problems:
        raise ProsecoError("bad input path(s): " + "; ".join(problems))
    unique: dict[Path, Path] = {}
    for path in sorted(found, key=lambda p: p.as_posix()):
        unique.setdefault(path.resolve(), path)
    result = list(unique.values())
    for path in result:
        detect_format(path, fmt)  # unknown formats fail here, before any work
    return result


# ------------------------------------------------------------------ streams


def _open_binary(path: Path) -> BinaryIO:
    """A buffered binary stream of the decompressed contents of ``path``."""
    compression = _split_compression(path)[1]
    if compression == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if compression == ".zst":
        import zstandard

        raw = open(path, "rb")  # noqa: SIM115 - closed via the reader (closefd)
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        return io.BufferedReader(reader, buffer_size=1 << 16)  # type: ignore[arg-type]
    return open(path, "rb")


def _stream_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, EOFError, zlib.error]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:  # pragma: no cover - only when zstd is never used
        pass
    return tuple(errors)


def _sniff(path: Path, source: str, skips: SkipLog) -> bool:
    """True if the file should be read: not empty, no NUL byte in its first 8 KiB."""
    try:
        with _open_binary(path) as f:
            head = f.read(BINARY_SNIFF_BYTES)
    except _stream_errors() as exc:
        raise ProsecoError(f"{source}: cannot read ({type(exc).__name__}: {exc}); corrupt or truncated?") from exc
    if not head:
        skips.add("empty_file", source)
        return False
    if b"\0" in head:
        skips.add("binary_file", source, detail="NUL byte in the first 8 KiB")
        return False
    return True


def _lines(f: BinaryIO, limit: int) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, line without its terminator) or (n, None) for a line over ``limit``
    bytes, whose remainder is consumed ``limit`` bytes at a time without being kept."""
    lineno = 0
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        lineno += 1
        if len(line) > limit and not line.endswith(b"\n"):
            while True:  # discard the rest of an over-long line
                rest = f.readline(limit + 1)
                if not rest or rest.endswith(b"\n"):
                    break
            yield lineno, None
            continue
        if line.endswith(b"\n"):
            line = line[:-1]
            if line.endswith(b"\r"):
                line = line[:-1]
        if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark
            line = line[3:]
        yield lineno, line


class _Emitter:
    """Numbers the documents yielded from one source and applies the document-level checks."""

    def __init__(self, source: str, max_chars: int, skips: SkipLog) -> None:
        self.source, self.max_chars, self.skips, self.index = source, max_chars, skips, 0

    def __call__(self, text: str, where: int) -> Document | None:
        if not text.strip():
            self.skips.add("empty_document", self.source, where)
            return None
        if len(text) > self.max_chars:
            self.skips.add("too_long", self.source, where, f"{len(text)} > {self.max_chars} characters")
            return None
        doc = Document(self.source, self.index, text)
        self.index += 1
        return doc


def _decode(raw: bytes, source: str, where: int, skips: SkipLog) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        skips.add("not_utf8", source, where, f"byte {exc.start}: {raw[exc.start:exc.start + 4]!r}")
        return None


def _iter_text(f: BinaryIO, source: str, doc_split: str, max_chars: int, skips: SkipLog) -> Iterator[Document]:
    emit = _Emitter(source, max_chars, skips)
    limit = 4 * max_chars  # UTF-8 needs at most 4 bytes per character
    if doc_split == "line":
        for lineno, raw in _lines(f, limit):
            if raw is None:
                skips.add("too_long", source, lineno, f"line over {limit} bytes")
                continue
            if not raw.strip():
                continue  # blank lines separate nothing in line mode; not a document
            text = _decode(raw, source, lineno, skips)
            if text is not None and (doc := emit(text, lineno)) is not None:
                yield doc
        return
    # paragraph / file: accumulate lines into one document; blank lines end a paragraph.
    parts: list[str] = []
    size, start, bad, too_long, seen = 0, 0, False, False, False

    def finish() -> Document | None:
        if not seen:
            return None
        if bad:
            skips.add("not_utf8", source, start)
        elif too_long:
            skips.add("too_long", source, start, f"over {max_chars} characters")
        else:
            return emit("\n".join(parts), start)
        return None

    for lineno, raw in _lines(f, limit):
        if doc_split == "paragraph" and raw is not None and not raw.strip():
            if (doc := finish()) is not None:
                yield doc
            parts, size, bad, too_long, seen = [], 0, False, False, False
            continue
        if not seen:
            seen, start = True, lineno
        if bad or too_long:
            continue  # already lost: keep consuming without keeping text
        if raw is None:
            too_long, parts = True, []
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            bad, parts = True, []
            continue
        size += len(line) + (1 if parts else 0)
        if size > max_chars:
            too_long, parts = True, []
            continue
        parts.append(line)
    if (doc := finish()) is not None:
        yield doc


def _iter_jsonl(f: BinaryIO, source: str, text_field: str, max_chars: int, skips: SkipLog) -> Iterator[Document]:
    emit = _Emitter(source, max_chars, skips)
    # A JSON line holds escapes and other fields: allow 6 bytes a character plus some slack.
    limit = 6 * max_chars + 65536
    for lineno, raw in _lines(f, limit):
        if raw is None:
            skips.add("too_long", source, lineno, f"line over {limit} bytes")
            continue
        if not raw.strip():
            continue
        line = _decode(raw, source, lineno, skips)
        if line is None:
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            skips.add("bad_json", source, lineno, str(exc)[:80])
            continue
        if not isinstance(obj, dict):
            skips.add("bad_json", source, lineno, f"a JSON {type(obj).__name__}, not an object")
            continue
        text = obj.get(text_field)
        if not isinstance(text, str):
            skips.add("missing_field", source, lineno,
                      f"no string field {text_field!r}" if text is None else f"{text_field!r} is {type(text).__name__}")
            continue
        if (doc := emit(text, lineno)) is not None:
            yield doc


def _iter_parquet(path: Path, source: str, text_field: str, max_chars: int, skips: SkipLog) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ProsecoError(f"{source}: not a readable parquet file ({exc})") from exc
    names = pf.schema_arrow.names
    if text_field not in names:
        raise ProsecoError(
            f"{source}: parquet file has no column {text_field!r} (it has: {', '.join(names) or 'none'}); "
            "set the text field to one of those"
        )
    kind = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ProsecoError(f"{source}: parquet column {text_field!r} has type {kind}, not a string column")
    if pf.metadata.num_rows == 0:
        skips.add("empty_file", source)
        return
    emit = _Emitter(source, max_chars, skips)
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if text is None:
                    skips.add("missing_field", source, row, f"{text_field!r} is null")
                elif (doc := emit(text, row)) is not None:
                    yield doc
                row += 1
    except (pa.ArrowException, OSError) as exc:
        raise ProsecoError(f"{source}: parquet read failed at row {row} ({exc}); corrupt file?") from exc


def iter_documents(
    path: Path,
    *,
    fmt: str = "auto",
    text_field: str = "text",
    doc_split: str = "paragraph",
    max_chars: int = 1_000_000,
    skips: SkipLog,
) -> Iterator[Document]:
    """Stream the documents of one input file, counting what is skipped in ``skips``.

    Skips (counted, never raised): ``not_utf8`` (strict UTF-8 per line / document),
    ``binary_file`` (a NUL byte in the first 8 KiB after decompression; whole file),
    ``empty_file``, ``bad_json``, ``missing_field``, ``empty_document`` (whitespace only),
    ``too_long`` (over ``max_chars`` characters; never held in memory whole).
    Raises ProsecoError for an unknown format, a corrupt gzip/zstd stream, or a parquet file
    without ``text_field``.
    """
    path = Path(path)
    source = str(path)
    kind = detect_format(path, fmt)
    if doc_split not in DOC_SPLITS:
        raise ProsecoError(f"unknown doc_split {doc_split!r}; choose one of {', '.join(DOC_SPLITS)}")
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
        raise ProsecoError(f"max_chars must be a positive integer, got {max_chars!r}")
    if kind == "parquet":
        yield from _iter_parquet(path, source, text_field, max_chars, skips)
        return
    if not _sniff(path, source, skips):
        return
    try:
        with _open_binary(path) as f:
            if kind == "jsonl":
                yield from _iter_jsonl(f, source, text_field, max_chars, skips)
            else:
                yield from _iter_text(f, source, doc_split, max_chars, skips)
    except _stream_errors() as exc:
        raise ProsecoError(f"{source}: read failed ({type(exc).__name__}: {exc}); corrupt or truncated?") from exc

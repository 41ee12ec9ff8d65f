"""Sources: turn files and folders into a stream of ``Document``s, logging every problem, never crashing.

Formats, chosen by file name (a trailing ``.gz`` is decompressed transparently):

==========================  ===============================================================
``.jsonl`` ``.ndjson``      one JSON object per line; the text is the field ``text_field``
``.parquet``                one document per row of column ``text_field`` (needs pyarrow)
``.html`` ``.htm``          main text extracted with trafilatura (needs trafilatura)
``.warc`` ``.warc.gz``      HTML responses extracted with trafilatura (needs warcio + trafilatura)
anything else               one plain-text document per file
==========================  ===============================================================

Folders are walked recursively in sorted order (hidden entries skipped, linked folders followed), so a run
is deterministic. Corrupt input is logged in an ``IssueLog`` with file and line and the rest of the input is
kept: each invalid UTF-8 byte becomes ``INVALID_BYTE`` (their count in the document's text travels in
``doc.meta["invalid_bytes"]``; the cleaning stage repairs or drops), a truncated gzip keeps what was read
before the cut, a malformed JSONL line loses only that line, an empty file is noted.

Encodings. JSON lines are UTF-8 (RFC 8259). A plain text file is decoded (``decode_plain_text``) in the codec of
its byte-order mark (UTF-8, UTF-16 or UTF-32; the mark is dropped, and a UTF-16 or UTF-32 file is text despite its
NUL bytes), else as UTF-8 if it is valid UTF-8, else as windows-1252 if it looks like a legacy 8-bit file (at
least two bytes invalid in UTF-8, more than its valid multi-byte UTF-8 characters, Latin script; logged as
``legacy_encoding``), else as UTF-8 with invalid bytes. Web pages are decoded as a browser decodes them
(``html_encoding``): a byte-order mark, else the charset of the HTTP ``Content-Type`` header (WARC), else a
``<meta>`` declaration.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .document import INVALID_BYTE, Document
from .jsonl import split_lines

JSONL_SUFFIXES = {".jsonl", ".ndjson"}
HTML_SUFFIXES = {".html", ".htm"}
WARC_SUFFIXES = {".warc"}
PARQUET_SUFFIXES = {".parquet"}


@dataclass
class Issue:
    """One problem found in the input: where (file, 1-based line or record, or None) and what."""

    file: str
    line: int | None
    kind: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.kind}: {self.message}"


class IssueLog:
    """Counts every issue by kind and keeps the first ``keep`` in full, so memory stays bounded."""

    def __init__(self, keep: int = 1000):
        self.keep = keep
        self.counts: Counter = Counter()
        self.examples: list[Issue] = []

    def add(self, file, line: int | None, kind: str, message: str) -> None:
        self.counts[kind] += 1
        if len(self.examples) < self.keep:
            self.examples.append(Issue(str(file), line, kind, message))

    def to_dict(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())),
                "examples": [vars(i) for i in self.examples]}


def missing_dependency(package: str, purpose: str) -> ImportError:
    return ImportError(f"{purpose} needs the optional package {package!r}: "
                       f"pip install {package} (or pip install 'pyllm[data]')")


_ESCAPED_BYTES = {c: INVALID_BYTE for c in range(0xDC80, 0xDD00)}  # what "surrogateescape" decodes bytes to


def decode_bytes(raw: bytes, encoding: str, file, line: int | None, issues: IssueLog) -> tuple[str, int]:
    """Decode ``raw``; each byte invalid in ``encoding`` becomes ``INVALID_BYTE`` and is counted and logged (first
    position)."""
    try:
        return raw.decode(encoding), 0
    except UnicodeDecodeError as e:
        # a noncharacter, not the lone surrogates "surrogateescape" leaves: an HTML extractor stops at those
        escaped = raw.decode(encoding, errors="surrogateescape")
        text = escaped.translate(_ESCAPED_BYTES)
        bad = text.count(INVALID_BYTE) - escaped.count(INVALID_BYTE)
        where = line if line is not None else raw[:e.start].count(b"\n") + 1
        _log_invalid_bytes(issues, file, where, encoding, bad, e.start)
        return text, bad


def _log_invalid_bytes(issues: IssueLog, file, line: int, encoding: str, bad: int, first: int) -> None:
    kind, named = ("invalid_utf8", "") if encoding == "utf-8" else ("invalid_bytes", f" in {encoding}")
    issues.add(file, line, kind, f"{bad} invalid byte(s){named} (first at byte {first})")


def decode_units(raw: bytes, encoding: str, file, issues: IssueLog) -> tuple[str, int]:
    """``decode_bytes`` for a codec whose invalid sequences can hold bytes below 0x80, which "surrogateescape"
    cannot carry: a UTF-16 or UTF-32 file cut inside a unit, a lone UTF-16 surrogate. One decode per invalid
    sequence, so it is kept for those codecs; the line of the first is counted in the decoded text."""
    try:
        return raw.decode(encoding), 0
    except UnicodeDecodeError as e:
        first = e.start
    view, parts, pos, bad = memoryview(raw), [], 0, 0
    while True:
        try:
            parts.append(str(view[pos:], encoding))
            break
        except UnicodeDecodeError as e:  # e.start, e.end: relative to pos
            parts += [str(view[pos:pos + e.start], encoding), INVALID_BYTE * (e.end - e.start)]
            bad += e.end - e.start
            pos += e.end
    _log_invalid_bytes(issues, file, parts[0].count("\n") + 1, encoding, bad, first)
    return "".join(parts), bad


def decode_utf8(raw: bytes, file, line: int | None, issues: IssueLog) -> tuple[str, int]:
    """``decode_bytes`` in UTF-8, the encoding of every input but web pages and some plain text files."""
    return decode_bytes(raw, "utf-8", file, line, issues)


# WHATWG Encoding Standard: browsers decode pages labelled ISO-8859-1 or US-ASCII as windows-1252
_BROWSER_CODECS = {"iso8859-1": "cp1252", "ascii": "cp1252"}
# names Python knows that no browser decodes a page with: bytes-to-bytes transforms, escapes, UTF-7
_NOT_WEB_CODECS = {"base64", "bz2", "hex", "quopri", "uu", "zlib", "rot-13", "idna", "punycode", "undefined",
                   "unicode-escape", "raw-unicode-escape", "utf-7"}
# the UTF-32 marks first: the UTF-32 LE mark begins with the UTF-16 LE one
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
         (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
_CHARSET = re.compile(r"""charset\s*=\s*["']?\s*([\w.:+-]+)""", re.IGNORECASE)
_META = re.compile(r"<meta\b[^>]*>", re.IGNORECASE)
_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.DOTALL)
_PRESCAN_BYTES = 1024  # how far the HTML standard's prescan looks for a <meta> declaration


def _codec(label: str) -> str | None:
    try:
        name = codecs.lookup(label).name
    except LookupError:
        return None
    return None if name in _NOT_WEB_CODECS else _BROWSER_CODECS.get(name, name)


def bom_encoding(raw: bytes) -> str | None:
    """The codec of the byte-order mark ``raw`` starts with (UTF-8, or UTF-16 or UTF-32 in the mark's byte order),
    or None. The codec decodes the mark itself to a leading U+FEFF."""
    for bom, codec in _BOMS:
        if raw.startswith(bom):
            return codec
    return None


def html_encoding(raw: bytes, content_type: str = "") -> str:
    """The codec a browser decodes an HTML page with: a byte-order mark, else the charset of the HTTP
    ``Content-Type`` header, else a ``<meta charset>`` or ``http-equiv`` declaration in the first 1024 bytes
    (outside comments), else UTF-8. A label Python does not know is ignored, as browsers ignore one they do
    not know."""
    if codec := bom_encoding(raw):
        return codec
    if (m := _CHARSET.search(content_type)) and (codec := _codec(m.group(1))):
        return codec
    head = _COMMENT.sub("", raw[:_PRESCAN_BYTES].decode("latin-1"))  # ASCII-compatible, never fails
    for tag in _META.finditer(head):
        if (m := _CHARSET.search(tag.group(0))) and (codec := _codec(m.group(1))):
            # a declaration readable as ASCII cannot be right about UTF-16 (the HTML standard reads UTF-8)
            return "utf-8" if codec.startswith("utf-16") else codec
    return "utf-8"


def decode_html(raw: bytes, content_type: str, file, line: int | None, issues: IssueLog) -> tuple[str, int]:
    encoding = html_encoding(raw, content_type)
    if encoding != "utf-8":
        try:
            return decode_bytes(raw, encoding, file, line, issues)
        except UnicodeDecodeError:  # bytes even "surrogateescape" cannot carry (ASCII range): the label is wrong
            pass
    return decode_utf8(raw, file, line, issues)


def utf8_evidence(raw: bytes) -> tuple[int, int]:
    """(bytes invalid in UTF-8, valid multi-byte UTF-8 characters) of ``raw``. A sequence cut by the end of
    ``raw`` counts as neither: it says the file was cut, not in which encoding it was written."""
    decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    text = decoder.decode(raw, final=False)  # an incomplete last sequence stays in the decoder
    # re-encoding drops the invalid bytes ("surrogateescape" made them lone surrogates): 50x faster than translate
    invalid = len(raw) - len(decoder.getstate()[0]) - len(text.encode("utf-8", "ignore"))
    return invalid, len(text) - len(text.encode("ascii", "ignore")) - invalid


_ASCII, _ASCII_LETTERS = bytes(range(0x80)), bytes(range(0x41, 0x5B)) + bytes(range(0x61, 0x7B))


def _latin_script(raw: bytes) -> bool:
    """Whether ``raw`` reads as a Latin-script text: no more bytes >= 0x80 than ASCII letters. Accents are a few
    percent of a Western European text's letters (a third in a short French sentence with its guillemets); in an
    8-bit Cyrillic, Greek or CJK text nearly every letter is such a byte, and windows-1252 would make noise of
    it."""
    return len(raw.translate(None, _ASCII)) <= len(raw) - len(raw.translate(None, _ASCII_LETTERS))


def decode_plain_text(raw: bytes, file, issues: IssueLog) -> tuple[str, int]:
    """``decode_bytes`` for a plain text file: the codec of its byte-order mark (the mark dropped), else UTF-8,
    else windows-1252 for a legacy 8-bit file, logged as ``legacy_encoding``.

    Bytes that are not valid UTF-8 are a legacy 8-bit file (Latin-1, windows-1252: WHATWG's fallback for
    both) when at least two of them are invalid, they outnumber the valid multi-byte characters and the text
    is Latin script (``_latin_script``: another 8-bit codepage stays invalid bytes, as before); else they
    are UTF-8 with corrupt bytes, each an ``INVALID_BYTE``. Real UTF-8, even corrupt, is mostly valid
    sequences, while windows-1252 text forms few, by coincidence ("é" + no-break space + "»" is one); one stray
    byte in ASCII text is no evidence of an encoding (a single windows-1252 apostrophe is lost, as before)."""
    codec = bom_encoding(raw)
    if codec == "utf-8":
        text, bad = decode_utf8(raw, file, None, issues)
    elif codec is not None:
        text, bad = decode_units(raw, codec, file, issues)
    if codec is not None:
        return text.removeprefix("\ufeff"), bad  # the mark, decoded
    try:
        return raw.decode("utf-8"), 0  # the common case, first
    except UnicodeDecodeError:
        pass
    invalid, multibyte = utf8_evidence(raw)
    if invalid < 2 or invalid <= multibyte or not _latin_script(raw):
        return decode_utf8(raw, file, None, issues)
    issues.add(file, None, "legacy_encoding", f"not UTF-8 ({invalid} invalid byte(s), {multibyte} multi-byte "
                                              f"character(s)): decoded as windows-1252")
    return decode_bytes(raw, "cp1252", file, None, issues)


def _suffixes(path: Path) -> tuple[str, bool]:
    """(format suffix, gzipped?) of a file name, e.g. data.jsonl.gz -> (".jsonl", True)."""
    name = path.name.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    return os.path.splitext(name)[1], gz


def list_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively, sorted, hidden entries skipped) into a list of files.

    Linked folders are followed (a data set is often linked into a corpus), each real folder once, so a link
    back up the tree is no cycle. A broken link is listed like a file: reading it logs it as unreadable."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            seen = {os.path.realpath(path)}
            for root, dirs, names in os.walk(path, followlinks=True):
                kept = []
                for d in sorted(d for d in dirs if not d.startswith(".")):
                    real = os.path.realpath(os.path.join(root, d))
                    if real not in seen:
                        seen.add(real)
                        kept.append(d)
                dirs[:] = kept
                files.extend(Path(root) / n for n in sorted(names) if not n.startswith("."))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input {str(path)!r} does not exist (give a file or a folder)")
    return files


def _read_lines(path: Path, gz: bool, issues: IssueLog) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line without its end) of a possibly gzipped file, split as the strict JSONL reader
    splits (a lone "\\r" ends a line, a byte-order mark is dropped); a truncated gzip ends the stream with an
    issue at the line where it broke off (the partial last line is not yielded)."""
    opener = gzip.open if gz else open
    lineno = 0
    try:
        with opener(path, "rb") as f:
            for lineno, (_, raw) in enumerate(split_lines(f), start=1):
                yield lineno, raw
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        issues.add(path, lineno + 1, "truncated_or_corrupt_gzip" if gz else "read_error",
                   f"stopped reading after {lineno} complete line(s): {e}")


def _read_bytes(path: Path, gz: bool, issues: IssueLog) -> bytes:
    if not gz:
        return path.read_bytes()
    out = io.BytesIO()
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                out.write(chunk)
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        data = out.getvalue()
        issues.add(path, data.count(b"\n") + 1, "truncated_or_corrupt_gzip",
                   f"kept the {len(data)} byte(s) read before the error: {e}")
    return out.getvalue()


def _gzip_complete(path: Path) -> bool:
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 20):
                pass
        return True
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError):
        return False


def read_text_file(path: Path, gz: bool, issues: IssueLog) -> Iterator[Document]:
    raw = _read_bytes(path, gz, issues)
    # NUL bytes mark a binary file, unless a UTF-16 or UTF-32 byte-order mark says they are half a character
    if b"\x00" in raw[:8192] and bom_encoding(raw) in (None, "utf-8"):
        issues.add(path, None, "binary_file", "contains NUL bytes; skipped")
        return
    text, bad = decode_plain_text(raw, path, issues)
    if not text.strip():  # after decoding: a file of a byte-order mark and UTF-16 spaces is empty too
        issues.add(path, None, "empty_file", "no text")
        return
    yield Document(id=str(path), text=text, source=str(path), meta={"invalid_bytes": bad})


def read_jsonl(path: Path, gz: bool, text_field: str, issues: IssueLog) -> Iterator[Document]:
    seen_any = False
    cuts_before = issues.counts["truncated_or_corrupt_gzip"]
    for lineno, raw in _read_lines(path, gz, issues):
        if not raw.strip():
            continue
        seen_any = True
        line, bad = decode_utf8(raw, path, lineno, issues)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            issues.add(path, lineno, "malformed_json", f"{e.msg} at column {e.colno}")
            continue
        if not isinstance(record, dict):
            issues.add(path, lineno, "malformed_json", f"expected an object, got {type(record).__name__}")
            continue
        text = record.get(text_field)
        if not isinstance(text, str):
            got = "missing" if text_field not in record else type(text).__name__
            issues.add(path, lineno, "missing_text_field", f"field {text_field!r} is {got}")
            continue
        meta = {k: v for k, v in record.items() if k != text_field and isinstance(v, (str, int, float))}
        meta["invalid_bytes"] = text.count(INVALID_BYTE) if bad else 0  # those in other fields do not count
        yield Document(id=f"{path}:{lineno}", text=text, source=str(path), meta=meta)
    if not seen_any and issues.counts["truncated_or_corrupt_gzip"] == cuts_before:
        issues.add(path, None, "empty_file", "no JSON lines")


def read_parquet(path: Path, text_field: str, issues: IssueLog) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise missing_dependency("pyarrow", f"reading Parquet ({path})") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for corrupt files
        issues.add(path, None, "corrupt_parquet", str(e).splitlines()[0])
        return
    if text_field not in pf.schema_arrow.names:
        issues.add(path, None, "missing_text_field",
                   f"no column {text_field!r} (columns: {pf.schema_arrow.names})")
        return
    row = 0
    try:
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                row += 1
                if not isinstance(text, str):
                    issues.add(path, row, "missing_text_field", f"row {row}: {text_field!r} is {type(text).__name__}")
                    continue
                yield Document(id=f"{path}#{row}", text=text, source=str(path), meta={"invalid_bytes": 0})
    except Exception as e:  # a corrupt row group: keep the rows before it
        issues.add(path, row + 1, "corrupt_parquet", f"stopped after {row} row(s): {str(e).splitlines()[0]}")
    if row == 0:
        issues.add(path, None, "empty_file", "no rows")


def _extract_html(html: str, where: str) -> str | None:
    try:
        import trafilatura
    except ImportError:
        raise missing_dependency("trafilatura", f"extracting text from HTML ({where})") from None
    try:
        return trafilatura.extract(html, include_comments=False, include_tables=True, deduplicate=False)
    except Exception:  # the extractor's parser gave up on this page: treated as "no main text"
        return None


def _extract_html_counting(html: str, bad: int, where: str) -> tuple[str | None, int]:
    """Main text of a page and how many of the page's invalid bytes are in it: those in markup, scripts and
    boilerplate do not count against the text. The extractor deletes noncharacters such as ``INVALID_BYTE``,
    so the bytes travel through it as U+FFFD; a page with a U+FFFD of its own keeps the whole page's count."""
    if not bad or "\ufffd" in html:
        return _extract_html(html, where), bad
    text = _extract_html(html.replace(INVALID_BYTE, "\ufffd"), where)
    if not text:
        return text, 0
    return text.replace("\ufffd", INVALID_BYTE), min(bad, text.count("\ufffd"))


def read_html(path: Path, gz: bool, issues: IssueLog) -> Iterator[Document]:
    raw = _read_bytes(path, gz, issues)
    if not raw.strip():
        issues.add(path, None, "empty_file", "no HTML")
        return
    html, bad = decode_html(raw, "", path, None, issues)
    text, bad = _extract_html_counting(html, bad, str(path))
    if not text:
        issues.add(path, None, "no_main_text", "the extractor found no main text")
        return
    yield Document(id=str(path), text=text, source=str(path), meta={"invalid_bytes": bad})


def read_warc(path: Path, issues: IssueLog) -> Iterator[Document]:
    try:
        from warcio.archiveiterator import ArchiveIterator
        from warcio.exceptions import ArchiveLoadFailed
    except ImportError:
        raise missing_dependency("warcio", f"reading WARC ({path})") from None
    record_no = 0
    cuts_before = issues.counts["corrupt_warc"]
    try:
        with open(path, "rb") as f:
            for record in ArchiveIterator(f):
                record_no += 1
                if record.rec_type != "response":
                    continue
                ctype = (record.http_headers.get_header("Content-Type") or "") if record.http_headers else ""
                if "html" not in ctype.lower():
                    continue
                url = record.rec_headers.get_header("WARC-Target-URI") or ""
                html, bad = decode_html(record.content_stream().read(), ctype, path, record_no, issues)
                text, bad = _extract_html_counting(html, bad, f"{path} record {record_no}")
                if not text:
                    issues.add(path, record_no, "no_main_text", f"{url}: the extractor found no main text")
                    continue
                yield Document(id=f"{path}:{record_no}", text=text, source=str(path),
                               meta={"url": url, "invalid_bytes": bad})
    except (ArchiveLoadFailed, EOFError, zlib.error, OSError) as e:
        issues.add(path, record_no + 1, "corrupt_warc", f"stopped after {record_no} record(s): {e}")
    else:
        # warcio ends quietly at a truncated gzip member: check the stream ourselves
        if path.name.lower().endswith(".gz") and not _gzip_complete(path):
            issues.add(path, record_no + 1, "corrupt_warc",
                       f"truncated gzip: stopped after {record_no} complete record(s)")
    if record_no == 0 and issues.counts["corrupt_warc"] == cuts_before:
        issues.add(path, None, "empty_file", "no WARC records")


def read_file(path: Path, text_field: str, issues: IssueLog) -> Iterator[Document]:
    """Documents of one file, the reader chosen by its name."""
    if path.stat().st_size == 0:
        issues.add(path, None, "empty_file", "0 bytes")
        return
    suffix, gz = _suffixes(path)
    if suffix in JSONL_SUFFIXES:
        yield from read_jsonl(path, gz, text_field, issues)
    elif suffix in PARQUET_SUFFIXES:
        yield from read_parquet(path, text_field, issues)
    elif suffix in WARC_SUFFIXES:
        yield from read_warc(path, issues)
    elif suffix in HTML_SUFFIXES:
        yield from read_html(path, gz, issues)
    else:
        yield from read_text_file(path, gz, issues)


def iter_documents(inputs: Iterable[str | os.PathLike], text_field: str, issues: IssueLog) -> Iterator[Document]:
    """Stream the documents of every input file and folder, in a deterministic order."""
    for path in list_files(inputs):
        try:
            yield from read_file(path, text_field, issues)
        except OSError as e:  # unreadable (permissions, vanished): noted, the other files go on
            issues.add(path, None, "read_error", str(e))

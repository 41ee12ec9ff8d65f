"""Sources: every format read; corrupt input logged with file and line, nothing else lost."""

import gzip
import json

import pytest

from pyllm.data.document import INVALID_BYTE
from pyllm.data.sources import IssueLog, iter_documents, list_files


def _read(paths, text_field="text"):
    issues = IssueLog()
    docs = list(iter_documents(paths, text_field, issues))
    return docs, issues


def test_folder_walk_is_sorted_and_skips_hidden(tmp_path):
    for name in ["b.txt", "a.txt", ".hidden.txt", "sub/c.txt"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(f"text of {name}")
    assert [p.relative_to(tmp_path).as_posix() for p in list_files([tmp_path])] == ["a.txt", "b.txt", "sub/c.txt"]
    docs, issues = _read([tmp_path])
    assert [d.text for d in docs] == ["text of a.txt", "text of b.txt", "text of sub/c.txt"]
    assert not issues.counts


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        _read([tmp_path / "does-not-exist"])


def test_jsonl_text_field_and_metadata(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "first", "url": "u1"}) + "\n\n" + json.dumps({"body": "second"}) + "\n")
    docs, issues = _read([path], text_field="body")
    assert [(d.id, d.text) for d in docs] == [(f"{path}:1", "first"), (f"{path}:3", "second")]
    assert docs[0].meta["url"] == "u1" and not issues.counts


def test_corrupt_inputs_are_counted_with_file_and_line(tmp_path):
    good = [json.dumps({"text": f"document {i}"}) for i in range(5)]
    # malformed lines (2 and 4), a record without the field (5), a non-object (6)
    lines = [good[0], '{"text": "unterminated', good[1], "not json", '{"title": "x"}', "[1, 2]", good[2]]
    (tmp_path / "a_bad.jsonl").write_text("\n".join(lines) + "\n")
    # bad UTF-8 on line 2 of a UTF-8 text file (the valid "ï", "—", "é", "à" say so): repaired and counted, the
    # document kept
    b_utf8 = "na\u00efve line \u2014 fine\ncaf\udce9 \udcff broken\nlast line, d\u00e9j\u00e0\n"
    (tmp_path / "b_utf8.txt").write_bytes(b_utf8.encode("utf-8", errors="surrogateescape"))
    # a truncated gzip: the complete lines before the cut survive
    blob = gzip.compress(("\n".join(good) + "\n").encode())
    (tmp_path / "c_cut.jsonl.gz").write_bytes(blob[: len(blob) - 12])
    (tmp_path / "d_empty.txt").write_bytes(b"")
    (tmp_path / "e_empty.jsonl").write_text("\n\n")
    docs, issues = _read([tmp_path])
    by_kind = {}
    for issue in issues.examples:
        by_kind.setdefault(issue.kind, []).append((issue.file.rsplit("/", 1)[-1], issue.line))
    assert by_kind["malformed_json"] == [("a_bad.jsonl", 2), ("a_bad.jsonl", 4), ("a_bad.jsonl", 6)]
    assert by_kind["missing_text_field"] == [("a_bad.jsonl", 5)]
    assert by_kind["invalid_utf8"] == [("b_utf8.txt", 2)]
    assert by_kind["truncated_or_corrupt_gzip"][0][0] == "c_cut.jsonl.gz"
    assert sorted(by_kind["empty_file"]) == [("d_empty.txt", None), ("e_empty.jsonl", None)]
    texts = [d.text for d in docs]
    # nothing else lost: the 3 good JSONL lines, the repaired text file, and the gzip lines before the cut
    assert texts[:3] == ["document 0", "document 1", "document 2"]
    utf8_doc = docs[3]
    assert utf8_doc.meta["invalid_bytes"] == 2 and "last line" in utf8_doc.text
    cut = [d.text for d in docs[4:]]
    assert 1 <= len(cut) < 5 and cut == [f"document {i}" for i in range(len(cut))]
    truncated = [i for i in issues.examples if i.kind == "truncated_or_corrupt_gzip"][0]
    assert truncated.line == len(cut) + 1  # the line where reading broke off


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one", None, "three"], "n": [1, 2, 3]}), tmp_path / "t.parquet")
    docs, issues = _read([tmp_path / "t.parquet"])
    assert [d.text for d in docs] == ["one", "three"]
    assert issues.counts["missing_text_field"] == 1 and issues.examples[0].line == 2


HTML = ("<html><head><title>t</title></head><body><nav>Home | About | Contact</nav><article><h1>Heading</h1>"
        "<p>The quick brown fox jumps over the lazy dog, and this paragraph is the main content of the page "
        "that an extractor should keep because it is long enough to be an article body.</p>"
        "<p>A second paragraph continues the article with more sentences about the fox and the dog.</p>"
        "</article><footer>Copyright 2024</footer></body></html>")


def test_html_main_text(tmp_path):
    pytest.importorskip("trafilatura")
    (tmp_path / "page.html").write_text(HTML)
    docs, _ = _read([tmp_path / "page.html"])
    assert len(docs) == 1 and "quick brown fox" in docs[0].text and "<p>" not in docs[0].text


def test_warc(tmp_path):
    pytest.importorskip("trafilatura")
    pytest.importorskip("warcio")
    from io import BytesIO

    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    path = tmp_path / "crawl.warc.gz"
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        for i in range(2):
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.0")
            rec = writer.create_warc_record(f"http://example.com/{i}", "response",
                                            payload=BytesIO(HTML.replace("Heading", f"Page {i}").encode()),
                                            http_headers=headers)
            writer.write_record(rec)
    docs, issues = _read([path])
    assert len(docs) == 2 and all("quick brown fox" in d.text for d in docs)
    assert [d.meta["url"] for d in docs] == ["http://example.com/0", "http://example.com/1"]
    # a WARC cut mid-record: the first record survives, the cut is reported
    blob = path.read_bytes()
    (tmp_path / "cut.warc.gz").write_bytes(blob[: len(blob) * 3 // 4])
    docs, issues = _read([tmp_path / "cut.warc.gz"])
    assert len(docs) >= 1 and issues.counts["corrupt_warc"] == 1


def test_unreadable_file_is_reported_and_others_kept(tmp_path, monkeypatch):
    from pyllm.data import sources

    (tmp_path / "a.txt").write_text("readable text")
    (tmp_path / "b.txt").write_text("locked")
    (tmp_path / "c.txt").write_text("also readable")
    real = sources._read_bytes

    def read_bytes(path, gz, issues):  # what a file without read permission does (tests may run as root)
        if path.name == "b.txt":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, gz, issues)

    monkeypatch.setattr(sources, "_read_bytes", read_bytes)
    docs, issues = _read([tmp_path])
    assert [d.text for d in docs] == ["readable text", "also readable"]
    assert issues.counts["read_error"] == 1 and issues.examples[0].file.endswith("b.txt")


@pytest.mark.parametrize("data", [
    b"\xef\xbb\xbf" + b"".join(b'{"text": "record %d"}\r\n' % i for i in range(3)),  # UTF-8 byte-order mark
    b"".join(b'{"text": "record %d"}\r' % i for i in range(3)),  # old-Mac line ends, as the strict reader reads
])
def test_jsonl_with_bom_or_lone_cr_keeps_every_record(tmp_path, data):
    (tmp_path / "r.jsonl").write_bytes(data)
    docs, issues = _read([tmp_path / "r.jsonl"])
    assert [(d.id.rsplit(":", 1)[-1], d.text) for d in docs] == [("1", "record 0"), ("2", "record 1"),
                                                                ("3", "record 2")]
    assert not issues.counts


def test_symlinked_folders_are_followed_once_and_broken_links_logged(tmp_path):
    corpus, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
    corpus.mkdir()
    elsewhere.mkdir()
    (corpus / "a.txt").write_text("text of a")
    (elsewhere / "b.txt").write_text("text of b")
    (corpus / "linked").symlink_to(elsewhere)  # a data set linked into the corpus
    (corpus / "loop").symlink_to(corpus)  # a cycle is walked once
    (corpus / "broken.txt").symlink_to(tmp_path / "gone.txt")
    docs, issues = _read([corpus])
    assert [d.text for d in docs] == ["text of a", "text of b"]
    assert dict(issues.counts) == {"read_error": 1} and issues.examples[0].file.endswith("broken.txt")


FRENCH = ("<html><head>{decl}<title>Caf\u00e9</title></head><body><article><h1>Le caf\u00e9</h1>"
          + "<p>Le caf\u00e9 de la gare est un endroit tr\u00e8s agr\u00e9able o\u00f9 l\u2019on peut lire le "
            "journal et discuter avec les habitu\u00e9s du quartier pendant des heures enti\u00e8res.</p>" * 4
          + "</article></body></html>")


@pytest.mark.parametrize("decl,encoding", [
    # "iso-8859-1" is read as windows-1252, as browsers do: the 0x92 of "l’on" is a quote, not a C1 control
    ("<meta charset='iso-8859-1'>", "cp1252"),
    ('<meta http-equiv="Content-Type" content="text/html; charset=windows-1252">', "cp1252"),
    ("<meta charset=utf-8>", "utf-8"),
    ("", "utf-16"),  # a byte-order mark
])
def test_html_declared_charset_is_honoured(tmp_path, decl, encoding):
    pytest.importorskip("trafilatura")
    (tmp_path / "page.html").write_bytes(FRENCH.format(decl=decl).encode(encoding))  # "utf-16" writes a BOM
    docs, issues = _read([tmp_path / "page.html"])
    assert len(docs) == 1 and "Le caf\u00e9 de la gare" in docs[0].text and "l\u2019on" in docs[0].text
    assert docs[0].meta["invalid_bytes"] == 0 and not issues.counts


@pytest.mark.parametrize("decl", ["<!-- <meta charset='iso-8859-1'> -->", "<meta charset='no-such-charset'>"])
def test_html_without_a_usable_declaration_is_utf8(tmp_path, decl):
    pytest.importorskip("trafilatura")
    (tmp_path / "page.html").write_bytes(FRENCH.format(decl=decl).encode("cp1252"))
    docs, issues = _read([tmp_path / "page.html"])
    assert issues.counts["invalid_utf8"] == 1  # decoded as UTF-8, each accent an invalid byte


def test_warc_http_charset_and_meta_charset_are_honoured(tmp_path):
    pytest.importorskip("trafilatura")
    pytest.importorskip("warcio")
    from io import BytesIO

    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    pages = [("text/html; charset=ISO-8859-1", FRENCH.format(decl="")),  # the HTTP header declares it
             ("text/html", FRENCH.format(decl="<meta charset='windows-1252'>")),  # the page does
             # the header wins over the page, as in a browser
             ('text/html; charset="windows-1252"', FRENCH.format(decl="<meta charset='utf-8'>"))]
    path = tmp_path / "crawl.warc"
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=False)
        for i, (ctype, page) in enumerate(pages):
            headers = StatusAndHeaders("200 OK", [("Content-Type", ctype)], protocol="HTTP/1.1")
            rec = writer.create_warc_record(f"http://example.fr/{i}", "response",
                                            payload=BytesIO(page.encode("cp1252")), http_headers=headers)
            writer.write_record(rec)
    docs, issues = _read([path])
    assert len(docs) == 3 and all("Le caf\u00e9 de la gare" in d.text and "l\u2019on" in d.text for d in docs)
    assert [d.meta["invalid_bytes"] for d in docs] == [0, 0, 0] and not issues.counts


def test_html_invalid_bytes_are_counted_in_the_extracted_text_only(tmp_path):
    pytest.importorskip("trafilatura")
    from pyllm.data.clean import CleanConfig, clean_document

    # 40 invalid bytes in a script, one in the article: only the article's counts against its text
    page = HTML.replace("<title>t</title>", "<title>t</title><script>var s = '" + "\udcff" * 40 + "';</script>")
    page = page.replace("quick brown", "quick \udcff brown")
    (tmp_path / "page.html").write_bytes(page.encode("utf-8", errors="surrogateescape"))
    docs, issues = _read([tmp_path / "page.html"])
    assert docs[0].meta["invalid_bytes"] == 1 and issues.counts["invalid_utf8"] == 1
    cleaned, reason, changes = clean_document(docs[0], CleanConfig())
    assert reason is None and "quick  brown" in cleaned.text and changes["invalid_bytes_repaired"] == 1


# "Café naïve, Straße über été — “déjà vu”, isn’t it?": every character also in windows-1252
LATIN = ("Caf\u00e9 na\u00efve, Stra\u00dfe \u00fcber \u00e9t\u00e9 \u2014 \u201cd\u00e9j\u00e0 vu\u201d, "
         "isn\u2019t it?\n")


@pytest.mark.parametrize("name,text", [
    ("latin.txt", LATIN),
    ("latin.txt.gz", LATIN),
    # only two bytes >= 0x80, both windows-1252 quotes: enough to say "legacy" rather than "corrupt UTF-8"
    ("quotes.txt", "He said \u201chello\u201d and left.\n"),
    # "\u00e9" + no-break space + "\u00bb" is a valid 3-byte UTF-8 sequence by coincidence: one of them does not
    # make a French windows-1252 text UTF-8
    ("guillemets.txt", "Il a dit \u00ab\u00a0caf\u00e9\u00a0\u00bb, puis \u00ab\u00a0th\u00e9\u00a0\u00bb, \u00e0 "
                       "l\u2019\u00e9t\u00e9 pr\u00e8s de la f\u00eate.\n"),
], ids=["txt", "txt_gz", "two_quotes", "guillemets"])
def test_legacy_8bit_text_is_decoded_as_windows_1252(tmp_path, name, text):
    raw = text.encode("cp1252")
    (tmp_path / name).write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    docs, issues = _read([tmp_path / name])
    assert [d.text for d in docs] == [text] and docs[0].meta["invalid_bytes"] == 0
    assert dict(issues.counts) == {"legacy_encoding": 1}
    issue = issues.examples[0]
    assert issue.file == str(tmp_path / name) and "windows-1252" in issue.message


@pytest.mark.parametrize("codec", ["cp1251", "cp1253", "gbk"])
def test_other_8bit_codepages_are_not_read_as_windows_1252(tmp_path, codec):
    """windows-1252 would make noise of them ("Ïðèâåò"): they stay invalid bytes,
    and the cleaning stage drops them."""
    text = {"cp1251": "Привет, мир! Как дела?\n",
            "cp1253": "Καλημέρα κόσμε\n",
            "gbk": "你好，世界\n"}[codec]
    (tmp_path / "other.txt").write_bytes(text.encode(codec))
    docs, issues = _read([tmp_path / "other.txt"])
    assert "legacy_encoding" not in issues.counts and docs[0].meta["invalid_bytes"] > 0


@pytest.mark.parametrize("codec", ["utf-8", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_byte_order_mark_decides_the_codec_and_is_dropped(tmp_path, codec):
    (tmp_path / "bom.txt").write_bytes(("\ufeff" + LATIN).encode(codec))  # as Notepad and PowerShell write them
    docs, issues = _read([tmp_path / "bom.txt"])
    assert [d.text for d in docs] == [LATIN] and docs[0].meta["invalid_bytes"] == 0 and not issues.counts


@pytest.mark.parametrize("raw,bad,line", [
    # cut inside the last unit (a byte below 0x80, which "surrogateescape" cannot carry), after LATIN's newline
    (("\ufeff" + LATIN).encode("utf-16-le") + b"x", 1, 2),
    # a lone surrogate on line 2
    ("\ufeffline one\nline two ".encode("utf-16-be") + b"\xd8\x00" + "tail".encode("utf-16-be"), 2, 2),
], ids=["cut_unit", "lone_surrogate"])
def test_broken_utf16_units_are_invalid_bytes(tmp_path, raw, bad, line):
    (tmp_path / "u16.txt").write_bytes(raw)
    docs, issues = _read([tmp_path / "u16.txt"])
    assert len(docs) == 1 and docs[0].meta["invalid_bytes"] == bad and docs[0].text.count(INVALID_BYTE) == bad
    assert dict(issues.counts) == {"invalid_bytes": 1} and issues.examples[0].line == line


def test_nul_bytes_are_binary_unless_a_utf16_or_utf32_mark_explains_them(tmp_path):
    (tmp_path / "a_blob.txt").write_bytes(b"text\x00\x01\x02 more text")
    (tmp_path / "b_utf8_bom_blob.txt").write_bytes(b"\xef\xbb\xbftext\x00\x01\x02")
    (tmp_path / "c_utf16.txt").write_bytes("\ufeffwide text".encode("utf-16-le"))
    (tmp_path / "d_only_a_mark.txt").write_bytes(b"\xff\xfe" + " \n".encode("utf-16-le"))
    docs, issues = _read([tmp_path])
    assert [d.text for d in docs] == ["wide text"]
    kinds = [(i.kind, i.file.rsplit("/", 1)[-1]) for i in issues.examples]
    assert kinds == [("binary_file", "a_blob.txt"), ("binary_file", "b_utf8_bom_blob.txt"),
                     ("empty_file", "d_only_a_mark.txt")]


@pytest.mark.parametrize("raw,bad", [
    ("na\u00efve caf\u00e9 \u2014 ".encode() + b"one \xe9 corrupt byte", 1),  # the valid sequences say UTF-8
    (b"plain ASCII with one stray \x92 byte", 1),  # one byte is no evidence of an encoding
    ("cut inside the last character \u2014".encode()[:-1], 2),  # a cut file, not a legacy one
], ids=["corrupt_byte_in_utf8", "ascii_and_one_stray_byte", "cut_mid_character"])
def test_utf8_with_corrupt_bytes_stays_utf8(tmp_path, raw, bad):
    """Guards, passing before and after the legacy rule: what it must not take for windows-1252."""
    (tmp_path / "c.txt").write_bytes(raw)
    docs, issues = _read([tmp_path / "c.txt"])
    assert docs[0].meta["invalid_bytes"] == bad and docs[0].text.count(INVALID_BYTE) == bad
    assert dict(issues.counts) == {"invalid_utf8": 1}

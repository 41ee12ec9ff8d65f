"""Cleaning: normalisation, control characters, whitespace, repaired or dropped encoding errors."""

import time

import pytest

from pyllm.data.clean import CleanConfig, clean_document
from pyllm.data.document import INVALID_BYTE, Document


def _clean(text, bad_bytes=0, **cfg):
    return clean_document(Document("d", text, "t", {"invalid_bytes": bad_bytes}), CleanConfig(**cfg))


def test_unicode_normal_forms():
    decomposed = "cafe\u0301 \ufb01le x\u00b2"  # e + combining acute, 'fi' ligature, superscript two
    nfc, _, changes = _clean(decomposed)
    assert nfc.text == "caf\u00e9 \ufb01le x\u00b2" and changes["unicode_normalized_docs"] == 1
    nfkc, _, _ = _clean(decomposed, normalization="NFKC")
    assert nfkc.text == "caf\u00e9 file x2"
    assert _clean(decomposed, normalization="none")[0].text == decomposed


def test_control_chars_and_whitespace_keep_indentation():
    text = "\ufeffdef f():\r\n    return 1\x00\x07   \r\n\n\n\n\n\tx\u00a0=\u200b2\n\n"
    doc, _, changes = _clean(text)
    assert doc.text == "def f():\n    return 1\n\n\n\tx =2"
    assert changes["control_chars_removed"] == 4  # BOM, NUL, BEL, zero-width space


def test_invalid_bytes_repaired_or_dropped():
    # the readers decode each invalid byte to INVALID_BYTE; a U+FFFD before it is a genuine one and stays
    text = "good \ufffd text " + INVALID_BYTE + "here and a genuine" + " and more text" * 10
    doc, reason, changes = _clean(text, bad_bytes=1)
    assert reason is None and doc.text.startswith("good \ufffd text here and a genuine and")
    assert changes["invalid_bytes_repaired"] == 1
    assert _clean(text, bad_bytes=1, invalid_bytes="drop")[1] == "invalid_utf8"
    assert _clean(INVALID_BYTE * 10 + "ab", bad_bytes=10)[1] == "too_many_invalid_bytes"


def test_invalid_bytes_are_counted_where_they_are(tmp_path):
    from pyllm.data.sources import IssueLog, iter_documents

    text = "A clean document about rivers and mountains, with nothing wrong in it at all. " * 3
    # a latin-1 name in another field of the record: the text is clean, the record is not dropped
    (tmp_path / "a.jsonl").write_bytes(b'{"author": "\xc9lo\xefse G\xe9rard", "text": "%s"}\n' % text.encode())
    # a genuine U+FFFD first, an invalid byte later: the repair deletes the invalid byte, not the U+FFFD
    (tmp_path / "b.txt").write_bytes("keep \ufffd this; ".encode() + b"bad \xff byte. " + text.encode())
    issues = IssueLog()
    docs = list(iter_documents([tmp_path], "text", issues))
    assert [d.meta["invalid_bytes"] for d in docs] == [0, 1] and issues.counts["invalid_utf8"] == 2
    cleaned = [clean_document(d, CleanConfig())[0].text for d in docs]
    assert cleaned == [text.strip(), "keep \ufffd this; bad  byte. " + text.strip()]


def test_empty_after_cleaning_is_dropped():
    assert _clean(" \n\x00\t\n")[1] == "empty_after_cleaning"


@pytest.mark.parametrize("bad", [{"normalization": "NFD"}, {"invalid_bytes": "ignore"}, {"max_blank_lines": -1}])
def test_config_validation_names_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        CleanConfig(**bad)


def test_lone_surrogates_from_json_are_removed():
    import json

    text = json.loads('"before \\ud800 after"')
    doc, _, changes = _clean(text)
    assert doc.text == "before  after" and changes["control_chars_removed"] == 1
    doc.text.encode("utf-8")  # encodable now


def test_output_is_nfc_after_invisible_characters_are_removed():
    # a zero-width space or soft hyphen between a letter and its combining accent hid the pair from NFC
    for text in ("cafe\u200b\u0301", "cafe\u00ad\u0301"):
        assert _clean(text)[0].text == "caf\u00e9"


def test_long_runs_of_spaces_inside_a_line_are_linear():
    # padded tables: "[ \t]+$" retried the whole run from every space in it (about 10 s at this size)
    line = " \t" * 24_000 + "x"
    start = time.perf_counter()
    doc, _, _ = _clean(line + " \t \nnext")
    assert doc.text == line + "\nnext"
    assert time.perf_counter() - start < 2  # milliseconds now

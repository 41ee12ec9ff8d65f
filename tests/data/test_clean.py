"""Cleaning: normalisation, control characters, whitespace, repaired or dropped encoding errors."""

import pytest

from pyllm.data.clean import CleanConfig, clean_document
from pyllm.data.document import Document


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
    text = "good text \ufffd here and a genuine" + " and more text" * 10
    doc, reason, changes = _clean(text, bad_bytes=1)
    assert reason is None and doc.text.startswith("good text  here and a genuine and") and changes["invalid_bytes_repaired"] == 1
    assert _clean(text, bad_bytes=1, invalid_bytes="drop")[1] == "invalid_utf8"
    assert _clean("\ufffd" * 10 + "ab", bad_bytes=10)[1] == "too_many_invalid_bytes"


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

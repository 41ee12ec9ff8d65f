"""The strict JSONL reader shared by post-training data, evaluation tasks, the classifier and metrics logs."""

import pytest

from pyllm.data.jsonl import JsonLinesError, read_json_lines


def test_lines_are_numbered_from_one_and_blank_lines_skipped(tmp_path):
    p = tmp_path / "rows.jsonl"
    # a raw U+2028 inside a JSON string is not a line break of the file; "\r\n" and a lone "\r" are (as in
    # Python's text mode), so line numbers are those an editor shows
    p.write_bytes('{"a": 1}\n\n  \t\n{"b": "x\u2028y"}\r\n[1, 2]\r{"c": 3}'.encode())
    assert list(read_json_lines(p, objects=False)) == [(1, {"a": 1}), (4, {"b": "x\u2028y"}), (5, [1, 2]),
                                                       (6, {"c": 3})]


@pytest.mark.parametrize("data, message", [
    (b'{"a": 1}\n{"a": 2,}\n', r"rows.jsonl:2: not valid JSON \(Expecting property name .* at column 9\)$"),
    (b'{"a": 1}\n\n"text"\n', r"rows.jsonl:3: expected a JSON object, got str$"),
    # the byte offset counts from the start of the file, as in pyllm's other "not UTF-8" messages
    (b'{"a": 1}\n{"a": "caf\xe9"}\n', r"rows.jsonl:2: not UTF-8 text \(byte 19\)$"),
    (b'{"a": 1}\r\n{"a": 2}\r{"\xff": 3}\n', r"rows.jsonl:3: not UTF-8 text \(byte 21\)$"),
])
def test_errors_name_the_file_and_line(tmp_path, data, message):
    p = tmp_path / "rows.jsonl"
    p.write_bytes(data)
    with pytest.raises(JsonLinesError, match=message) as e:
        list(read_json_lines(p))
    assert isinstance(e.value, ValueError) and e.value.path == str(p) and "\n" not in str(e.value)
    assert str(e.value) == f"{e.value.path}:{e.value.line}: {e.value.problem}"


def test_rows_before_an_error_are_streamed_and_a_missing_file_is_not_a_json_error(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_text('{"a": 1}\nnot json\n')
    rows = read_json_lines(p)
    assert next(rows) == (1, {"a": 1})
    with pytest.raises(JsonLinesError, match="rows.jsonl:2"):
        next(rows)
    with pytest.raises(FileNotFoundError):
        list(read_json_lines(tmp_path / "missing.jsonl"))


def test_byte_order_mark_is_not_part_of_the_first_line(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n{"a": 2}\r\n')  # as Notepad or PowerShell 5 save UTF-8
    assert list(read_json_lines(p)) == [(1, {"a": 1}), (2, {"a": 2})]
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}\n{"\xff": 2}\n')
    with pytest.raises(JsonLinesError, match=r"rows.jsonl:2: not UTF-8 text \(byte 14\)$"):
        list(read_json_lines(p))

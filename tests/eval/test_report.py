"""Evaluation results as a Markdown table and strict JSON (pyllm/eval/report.py)."""

import json
import math
import re

from pyllm.eval import markdown_table, write_report


def test_task_names_cannot_break_the_table():
    """A task file's name (``text:a|b.txt``) is shown as it is, in its own cell."""
    table = markdown_table({"text:a|b_*c*.txt": {"bits_per_byte": 1.5, "documents": 3}})
    row = table.splitlines()[2]
    cells = [re.sub(r"\\(.)", r"\1", c.strip()) for c in re.split(r"(?<!\\)\|", row)[1:-1]]
    assert cells == ["text:a|b_*c*.txt", "bits_per_byte", "1.5000", "3"]


def test_json_is_strict(tmp_path):
    """nan / inf figures are written as null: bare NaN / Infinity tokens are not JSON."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    results = {"t": {"acc": float("nan"), "word_perplexity": math.inf, "n": 2}}
    write_report(results, {"model": "m", "limit": None}, tmp_path / "r.json", tmp_path / "r.md")
    data = json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse)
    assert data == {"meta": {"model": "m", "limit": None}, "results": {"t": {"acc": None, "word_perplexity": None,
                                                                               "n": 2}}}
    assert "| t | acc | nan | 2 |" in (tmp_path / "r.md").read_text()
    assert results["t"]["acc"] != results["t"]["acc"]  # the caller's dict is left as it was

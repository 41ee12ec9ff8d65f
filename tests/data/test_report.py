"""The data report (pyllm/data/report.py) on hand-made stats: text from the data, empty sections, huge clusters."""

import re

import matplotlib.axes
import matplotlib.figure
import numpy as np

from pyllm.data.report import write_report


def _stats(**curate):
    """The stats dict the data pipeline hands to write_report, with ``curate`` fields replaced."""
    edges = np.geomspace(1, 1e4, 9).tolist()
    return {"engine": "local", "workers": 1, "cached": [],
            "curate": {"seconds": 1.0, "docs_per_s": 10.0, "mb_per_s": 1.0, "documents_in": 10, "documents_out": 8,
                       "bytes_in": 10_000, "bytes_out": 8_000, "dropped": {"quality": {"min_words": 2}},
                       "dedup_threshold": 0.7, "duplicate_cluster_sizes": [], "classifier": {},
                       "classifier_score_histogram": [0] * 20, "cleaning": {}, "pii": {"EMAIL": 1},
                       "issues": {"counts": {}, "examples": []},
                       "length_histogram": {"edges": edges, "in": [1] * 8, "out": [1] * 8}, **curate},
            "pack": {"seconds": 1.0, "tokens_per_s": 100.0, "mb_per_s": 1.0, "bytes_per_token": 3.0,
                     "totals": {"train": {"shards": 1, "documents": 8, "tokens": 2000}},
                     "tokens_per_shard": [2000], "shard_splits": ["train"]}}


def _cells(line: str) -> list[str]:
    """A table row's cells as GitHub-flavoured Markdown reads them (no cell here holds a backslash of its own)."""
    return [re.sub(r"\\(.)", r"\1", c.strip()).replace("<br>", "\n") for c in re.split(r"(?<!\\)\|", line)[1:-1]]


def test_text_from_the_data_is_shown_verbatim(tmp_path):
    """File names, issue messages, rule names and PII types come from the data: they can neither break a
    table nor inject HTML."""
    message = "not valid JSON\n| injected | row |\n<script>x</script>"
    stats = _stats(issues={"counts": {"bad|json": 2}, "examples": [
        {"file": "a|b`c.jsonl", "line": 3, "kind": "bad_json", "message": message}]},
        dropped={"quality": {"rule|x": 1}}, pii={"<b>X</b>": 1, "IP_ADDRESS": 2})
    report = write_report(stats, tmp_path).read_text()
    rows = {line: _cells(line) for line in report.splitlines() if line.startswith("| ")}
    assert ["quality", "rule|x", "1"] in rows.values() and ["bad|json", "2"] in rows.values()
    assert ["<b>X</b>", "1"] in rows.values() and "| IP_ADDRESS | 2 |" in rows  # no needless escapes
    assert not re.search(r"(?<!\\)<(?!br>)", report)  # every < is escaped: no tag of the data's
    issue = next(line for line in report.splitlines() if line.startswith("- "))
    assert issue == "- ``a|b`c.jsonl:3`` bad_json: " + message.replace("\n", "<br>").replace("|", "\\|") \
        .replace("<script>", "\\<script\\>").replace("</script>", "\\</script\\>")


def test_empty_sections_say_none(tmp_path):
    """No issues, no PII, nothing dropped: one line "none", not a table header with nothing under it."""
    report = write_report(_stats(dropped={"quality": {}}, pii={}), tmp_path).read_text()
    for heading in ("### Dropped, by stage and rule", "## PII redactions", "## Input issues", "### Cleaning repairs"):
        assert report.split(heading + "\n\n", 1)[1].startswith("none\n"), heading
    assert "| type | count |" not in report and "| kind | count |" not in report


def test_a_cluster_of_a_million_duplicates_is_plotted_in_few_bins(tmp_path, monkeypatch):
    """One histogram bin per integer cluster size took minutes and GBs for a cluster of 10^6 copies."""
    drawn = []
    hist = matplotlib.axes.Axes.hist

    def spy(self, x, bins=None, **kw):
        drawn.append(len(bins))
        assert len(bins) <= 100, f"{len(bins)} bins"
        return hist(self, x, bins=bins, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "hist", spy)
    write_report(_stats(duplicate_cluster_sizes=[2, 3, 10**6]), tmp_path)
    assert drawn and (tmp_path / "clusters.png").read_bytes()[:4] == b"\x89PNG"
    write_report(_stats(duplicate_cluster_sizes=[2, 2, 3, 5]), tmp_path)  # small sizes: one bin per size
    assert drawn[-1] == 5


def test_labels_from_the_data_are_drawn_verbatim(tmp_path, monkeypatch):
    """Rule names and PII types come from the data: "$^$" is not mathtext (matplotlib raised on it), "a\\$b"
    keeps its backslash, and a line break is shown as "\\n" on the label's one line."""
    names = ["cost $^$", "a$b$c_d", "x^2", "a\\$b", "$x", "p_{i}"]
    labels = []
    savefig = matplotlib.figure.Figure.savefig

    def spy(fig, path, **kw):
        savefig(fig, path, **kw)  # drawn first: the labels read below are those in the PNG
        if path.name in ("drops.png", "pii.png"):
            ax = fig.axes[0]
            ticks = ax.get_yticklabels() if path.name == "drops.png" else ax.get_xticklabels()
            labels.append([(t.get_text(), t.get_parse_math(), t.get_usetex()) for t in ticks])

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    write_report(_stats(dropped={"quality": {n: 1 for n in names + ["two\nlines"]}},
                        pii={n: 1 for n in names}), tmp_path)
    assert labels == [[(f"quality: {n}", False, False) for n in names + ["two\\nlines"]],
                      [(n, False, False) for n in names]]


def test_a_long_label_from_the_data_is_cut(tmp_path, monkeypatch):
    """A 10,000-character rule name made a 10,000-character tick label (and a figure as wide as it)."""
    labels = []
    savefig = matplotlib.figure.Figure.savefig

    def spy(fig, path, **kw):
        if path.name == "drops.png":
            labels.extend(t.get_text() for t in fig.axes[0].get_yticklabels())
        savefig(fig, path, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    write_report(_stats(dropped={"quality": {"x" * 10_000: 1, "short": 2}}), tmp_path)
    assert labels == ["quality: " + "x" * 50 + "…", "quality: short"]


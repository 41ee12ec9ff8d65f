"""The pipeline report (pyllm/report.py) and the Markdown escaping all three reports share (pyllm/markdown.py)."""

import html
import re
from html.parser import HTMLParser
from types import SimpleNamespace

import markdown_it  # in the dev extra: a missing one fails these tests rather than skipping them

from pyllm.pipeline import StageRecord
from pyllm.report import plot_eval, write_pipeline_report

NASTY = ["a|b *bold* <script>alert(1)</script> <img src=x onerror=alert(1)>", "line1\nline2\r\n\t`tick` é 日本",
         "\\|back", "_a_ __b__ IP_ADDRESS a__b", "[x](http://y) ![i](j) <http://a.b>", "&amp; &#60;", "# h",
         "> q", "~~s~~", "`x`", "1. x", "***"]


class _Cells(HTMLParser):
    """The text of every table cell of rendered HTML (<br> read as a newline) and the other tags inside cells."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.cells, self.tags, self._cell = [], set(), None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        if tag in ("td", "th"):
            self._cell = ""
        elif self._cell is not None:
            if tag == "br":
                self._cell += "\n"
            else:
                self.tags.add(tag)

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.cells.append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _render(markdown: str) -> str:
    """GitHub-flavoured Markdown (tables, strikethrough, raw HTML passed through) as HTML."""
    return markdown_it.MarkdownIt("gfm-like").disable("linkify").render(markdown)


def test_md_text_and_md_code_show_the_text_verbatim():
    """Rendered, a cell reads exactly the text (line breaks as <br>; a table cell drops trailing spaces)
    and holds no HTML of the text's own; a code span reads the text with line breaks as spaces."""
    from pyllm.markdown import md_code, md_text

    table = "| text |\n|---|\n" + "".join(f"| {md_text(t)} |\n" for t in NASTY)
    cells = _Cells(_render(table))
    assert cells.cells[1:] == [t.replace("\r\n", "\n") for t in NASTY] and not cells.tags
    for text in NASTY + ["a|b`c.jsonl:3", "`", " x", "a ``` b", "# h\n# j"]:
        rendered = _render(f"- {md_code(text)} tail\n")
        code = re.fullmatch(r"<ul>\n<li><code>(.*)</code> tail</li>\n</ul>\n", rendered, re.S)
        assert code and html.unescape(code.group(1)) == re.sub(r"\r\n|\n", " ", text), rendered


def test_a_long_text_is_cut_with_a_mark_saying_how_much():
    """A text longer than MAX_CHARS shows its first MAX_CHARS characters and how many more there were; a
    text of MAX_CHARS characters is shown whole."""
    from pyllm.markdown import MAX_CHARS, md_code, md_text

    whole = "a" * MAX_CHARS
    assert md_text(whole) == whole and md_code(whole) == f"`{whole}`"
    long = "b" * MAX_CHARS + "|" * 12_345
    mark = "*… (12,345 more characters)*"
    assert md_text(long) == f"{'b' * MAX_CHARS} {mark}" and md_code(long) == f"`{'b' * MAX_CHARS}` {mark}"
    assert md_text("x" * (MAX_CHARS + 1)).endswith("*… (1 more character)*")


def _done(summary, **kw):
    return StageRecord(key="k", finished=True, status="done", seconds=10, cpu_seconds=10, started=1.0, attempts=1,
                       summary=summary, **kw)


def _history(n=3, **extra):
    rows = [{"step": 5 * i, "loss": 7.0 - i, "tokens_per_s": 1000.0, "mfu": 0.1, "peak_memory_gb": 0.5, **extra}
            for i in range(1, n + 1)]
    return rows + [{"step": 5 * n, "val_loss": 5.0}]


def _records():
    """A whole run's records: every stage done, every check measured and passing."""
    row = {"bits_per_byte": 2.0, "mc_name_acc": 0.3, "mc_doc_acc": 0.3, "reward": 0.1}
    return {
        "data": _done({"funnel": [["read", 100], ["dedup", 70]], "dropped": {"dedup": {"exact": 30}},
                       "bytes_in": 1e6, "bytes_out": 5e5, "tokens": 12345, "bytes_per_token": 3.2}),
        "pretrain": _done({"history": _history(), "peak_tflops_used": 0.5}),
        "sft": _done({"history": _history()}),
        "rm": _done({"history": _history(), "heldout_pairs": 100, "before": {"pairwise_accuracy": 0.5},
                     "after": {"pairwise_accuracy": 0.8}}),
        "dpo": _done({"history": _history(), "heldout_pairs": 100, "before": {"reward_accuracy": 0.0,
                      "reward_margin": 0.0}, "after": {"reward_accuracy": 0.8, "reward_margin": 1.0}}),
        "rl": _done({"stage": "grpo", "start": "sft", "history": _history(reward=0.5),
                     "before": {"sampled_reward": 0.6, "kl_to_ref": 0.0},
                     "after": {"sampled_reward": 0.7, "kl_to_ref": 1.5}}),
        "eval": _done({"checkpoints": {"pretrain": {**row, "task_acc": 0.0}, "sft": {**row, "task_acc": 0.6},
                                       "dpo": {**row, "task_acc": 0.65}, "rl": {**row, "task_acc": 0.7}},
                       "samples": {n: {"1+1=": "2"} for n in ("pretrain", "sft", "dpo", "rl")},
                       "heldout_prompts": 100, "task_limit": 1000,
                       "task_items": {"stdlib_ppl": 460, "stdlib_name": 482, "stdlib_doc": 482}}),
    }


def _write(tmp_path, records, out_dir="run"):
    cfg = SimpleNamespace(device="cpu", precision="fp32", out_dir=out_dir)
    return write_pipeline_report(cfg, records, tmp_path / "report").read_text()


def _section(report: str, heading: str) -> str:
    return report.split(heading, 1)[1].split("\n## ", 1)[0]


def test_sample_answers_are_shown_verbatim(tmp_path):
    """A model's answer is shown as it is: no HTML of its own, no broken table, no \\u00e9 for é; an answer
    missing for a checkpoint does not read like an empty answer."""
    records = _records()
    samples = records["eval"].summary["samples"]
    prompts = ["1+1=", "sort | x`y", "say <b>"]
    for name, answer in zip(samples, NASTY):
        samples[name] = {prompts[0]: answer, prompts[1]: "", prompts[2]: NASTY[-1]} if name != "dpo" else {}
    report = _write(tmp_path, records)
    section = _section(report, "## Sample answers")
    cells = _Cells(_render(section))
    assert cells.tags == {"em"}  # the marks of "(empty)" and "(not sampled)": no HTML from an answer
    header, *rows = [cells.cells[i:i + 5] for i in range(0, len(cells.cells), 5)]
    assert header == ["prompt", "pretrain", "sft", "dpo", "grpo"]
    assert rows[0] == [prompts[0], NASTY[0], NASTY[1].replace("\r\n", "\n"), "(not sampled)", NASTY[3]]
    assert rows[1] == [prompts[1], "(empty)", "(empty)", "(not sampled)", "(empty)"]
    assert rows[2][0] == prompts[2]
    assert "é 日本" in section and "\\u00e9" not in section


def test_a_long_sample_answer_is_cut(tmp_path):
    """A 200 kB answer is cut to MAX_CHARS characters with a mark in its cell; short answers are whole."""
    from pyllm.markdown import MAX_CHARS

    records = _records()
    answer = "yes <b> " * 25_000
    records["eval"].summary["samples"]["sft"]["1+1="] = answer
    report = _write(tmp_path, records)
    cells = _Cells(_render(_section(report, "## Sample answers")))
    assert cells.cells[5:] == ["1+1=", "2", f"{answer[:MAX_CHARS]} … ({len(answer) - MAX_CHARS:,} more characters)",
                               "2", "2"]
    assert cells.tags == {"em"} and len(report) < 10_000


def test_a_nan_metric_reads_nan_and_its_check_fails(tmp_path):
    """A NaN (a diverged loss, a broken metric) is shown as "nan", not as "-" like a missing value, and a
    check reading it fails, whichever side holds it."""
    records = _records()
    records["eval"].summary["checkpoints"]["sft"]["task_acc"] = float("nan")
    records["rl"].summary["after"]["kl_to_ref"] = float("nan")
    records["eval"].summary["checkpoints"]["dpo"].pop("reward")
    report = _write(tmp_path, records)
    checks = _section(report, "## Did each stage improve what it should?")
    assert "| sft | task accuracy, held-out prompts (greedy) | higher | 0.000 | nan | **NO** |" in checks
    assert "| keep: >= SFT - 1 s.e. | nan | 0.650 | **NO** |" in checks
    assert "| higher | nan | 0.700 | **NO** |" in checks and "| keep: <= 2 | 0.000 | nan | **NO** |" in checks
    assert "6 of 10 checks pass; **4 fail**" in checks and "not measured" not in checks
    assert "| sft | 2.000 | 0.300 | 0.300 | nan | 0.100 | - |" in report
    assert "| dpo | 2.000 | 0.300 | 0.300 | 0.650 | - | - |" in report  # missing: still "-"


def test_every_check_is_listed_and_the_verdict_counts_the_unmeasured(tmp_path):
    """A check that could not be computed (its stage did not run, a metric is missing) is a row saying why,
    and the verdict never reads "All N checks pass" then; a missing metric is no KeyError."""
    records = _records()
    report = _write(tmp_path, records)
    assert "All 10 checks pass." in report
    records["eval"].summary["checkpoints"]["sft"].pop("task_acc")
    records["rm"] = StageRecord(key="k", finished=True, status="unavailable", summary={"reason": "no | module <x>"})
    report = _write(tmp_path, records)
    checks = _Cells(_render(_section(report, "## Did each stage improve what it should?")))
    assert not checks.tags
    assert "not measured: rm unavailable (no | module <x>)" in checks.cells
    assert "not measured: no after value in eval's rows of pretrain and sft" in checks.cells
    for stage in ("dpo", "rl"):
        assert f"not measured: no before value in eval's rows of sft and {stage}" in checks.cells
    assert "6 of 10 checks pass; 4 not measured." in report and "All 10" not in report


def test_stage_note_and_paths_cannot_inject_markdown(tmp_path):
    records = _records()
    records["sft"] = StageRecord(key="", finished=True, status="unavailable",
                                 summary={"reason": "ImportError: x | <b>y</b>\nz"})
    report = _write(tmp_path, records, out_dir="out`dir|<i>")
    assert "Stage outputs are under ``out`dir|<i>``." in report
    stages = _Cells(_render(_section(report, "## Stages, time and energy")))
    assert "ImportError: x | <b>y</b>\nz" in stages.cells and not stages.tags


def test_eval_header_counts_the_items_evaluated(tmp_path):
    """Built-in tasks may hold fewer items than the limit asked for: the header shows what was evaluated."""
    report = _write(tmp_path, _records())
    assert "460 stdlib docstrings (bits/byte), 482 and 482 multiple-choice items" in report
    assert "1000" not in _section(report, "## Evaluation of every checkpoint")


def test_throughput_and_data_cells_without_a_value(tmp_path):
    """No MFU, no peak memory, nothing dropped: "-" and "none", not "-%", "0.00" or "Drop reasons: ."."""
    records = _records()
    for row in records["pretrain"].summary["history"]:
        row.pop("mfu", None), row.pop("peak_memory_gb", None)
    records["data"].summary["dropped"] = {"clean": {}, "dedup": {}}
    report = _write(tmp_path, records)
    assert "| stage | steps | tokens/s | MFU | peak memory (GiB) |" in report
    assert "| pretrain | 15 | 1000 | - | - |" in report and "| sft | 15 | 1000 | 10.00% | 0.50 |" in report
    assert "Drop reasons: none." in report


def test_plot_eval_without_a_metric_or_a_checkpoint_draws_nothing(tmp_path):
    assert plot_eval({}, tmp_path / "a.png") is None and plot_eval({"sft": {}}, tmp_path / "b.png") is None
    assert not list(tmp_path.iterdir())

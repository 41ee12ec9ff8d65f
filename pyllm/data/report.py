"""The data report: one Markdown page with tables and PNG plots (matplotlib, Agg backend, no display).

Sections: throughput, documents per stage with every drop reason, cleaning repairs, input issues (file
and line), PII counts per type, duplicate cluster sizes, classifier accuracy and score histogram,
length histograms before and after, tokens per shard.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pyllm.markdown import md_code, md_text

_VERBATIM = {"parse_math": False, "usetex": False}
"""Text properties of a plot label taken from the data (a rule name, a PII type): drawn as it is, never read
as mathtext ("$...$", which can also raise) or as TeX."""


LABEL_CHARS = 60
"""The most characters of a plot label from the data (a longer one would widen the figure without bound)."""


def _one_line(label) -> str:
    """A label from the data on one line: control characters (a line break, a tab) as their Python escapes, cut to
    ``LABEL_CHARS`` characters ending in "…" (the report's tables give the whole name)."""
    s = re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], str(label))
    return s if len(s) <= LABEL_CHARS else s[:LABEL_CHARS - 1] + "…"


def _plots(stats: dict, out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cur, pack = stats["curate"], stats["pack"]
    made = {}

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        made[name] = name

    edges = np.array(cur["length_histogram"]["edges"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    centers = np.sqrt(edges[:-1] * edges[1:])
    ax.step(centers, cur["length_histogram"]["in"], where="mid", label="read")
    ax.step(centers, cur["length_histogram"]["out"], where="mid", label="kept")
    ax.set(xscale="log", xlabel="document length (characters)", ylabel="documents", title="Document lengths")
    ax.legend()
    save(fig, "lengths.png")

    reasons = [(f"{stage}: {r}", n) for stage, c in cur["dropped"].items() for r, n in c.items()]
    if reasons:
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(reasons) + 1.2))
        ax.barh(range(len(reasons)), [n for _, n in reasons])
        ax.set_yticks(range(len(reasons)), [_one_line(r) for r, _ in reasons], **_VERBATIM)
        ax.invert_yaxis()
        ax.set(xlabel="documents dropped", title="Drops per rule")
        save(fig, "drops.png")

    if cur["duplicate_cluster_sizes"]:
        fig, ax = plt.subplots(figsize=(6, 3))
        sizes = np.array(cur["duplicate_cluster_sizes"])
        # at most 40 bins, log-spaced edges rounded to integers: one bin per size while sizes are small,
        # wider bins above (one bin per size took minutes and GBs for a cluster of 10^6 copies)
        edges = np.unique(np.geomspace(2, sizes.max() + 1, 40).round()) - 0.5
        ax.hist(sizes, bins=edges)
        ax.set(xscale="log", xlabel="documents in cluster", ylabel="clusters", title="Duplicate cluster sizes")
        save(fig, "clusters.png")

    if cur["pii"]:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar(range(len(cur["pii"])), list(cur["pii"].values()))
        ax.set_xticks(range(len(cur["pii"])), [_one_line(k) for k in cur["pii"]], rotation=45, **_VERBATIM)
        ax.set(ylabel="redactions", title="PII redactions per type")
        save(fig, "pii.png")

    if pack["tokens_per_shard"]:
        fig, ax = plt.subplots(figsize=(7, 3))
        colors = ["C0" if s == "train" else "C1" for s in pack["shard_splits"]]
        ax.bar(range(len(pack["tokens_per_shard"])), pack["tokens_per_shard"], color=colors)
        ax.set(xlabel="shard (blue train, orange val)", ylabel="tokens", title="Tokens per shard")
        save(fig, "shards.png")
    return made


def _table(header: str, rows: list[str]) -> list[str]:
    """A Markdown table under ``header`` ("| a | b |"), or the line "none" when there are no rows."""
    return [header, "|" + "---|" * (header.count("|") - 1), *rows] if rows else ["none"]


def write_report(stats: dict, out_dir: str | Path) -> Path:
    """Write ``out_dir/report.md`` and its plots; returns the path of the Markdown file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(stats, out)
    cur, pack = stats["curate"], stats["pack"]
    lines = ["# Data report", ""]
    lines += [f"Engine {md_code(stats['engine'])} with {stats['workers']} worker(s)"
              + (f"; reused cached stages: {md_text(', '.join(stats['cached']))}" if stats["cached"] else "") + ".", ""]
    lines += ["## Throughput", "", "| stage | seconds | rate |", "|---|---|---|",
              f"| curate | {cur['seconds']:.1f} | {cur['docs_per_s']:.1f} docs/s, {cur['mb_per_s']:.2f} MB/s |",
              f"| pack | {pack['seconds']:.1f} | {pack['tokens_per_s']:.0f} tokens/s, {pack['mb_per_s']:.2f} MB/s |",
              ""]
    lines += ["## Documents", "", "| | documents | MB |", "|---|---|---|",
              f"| read | {cur['documents_in']} | {cur['bytes_in'] / 1e6:.2f} |",
              f"| kept | {cur['documents_out']} | {cur['bytes_out'] / 1e6:.2f} |", ""]
    lines += ["### Dropped, by stage and rule", ""]
    lines += _table("| stage | rule | documents |", [f"| {md_text(stage)} | {md_text(rule)} | {n} |"
                                                    for stage, c in cur["dropped"].items() for rule, n in c.items()])
    lines += ["", f"Near-duplicate threshold (estimated Jaccard, (1/bands)^(1/rows)): {cur['dedup_threshold']:.3f}.",
              f"Clusters with duplicates: {len(cur['duplicate_cluster_sizes'])}, largest "
              f"{max(cur['duplicate_cluster_sizes'], default=0)}.", ""]
    if cur["classifier"]:
        lines += [f"Classifier: {cur['classifier']}; score histogram (20 bins over [0, 1]): "
                  f"{cur['classifier_score_histogram']}.", ""]
    lines += ["### Cleaning repairs", ""] + ([f"- {md_text(k)}: {v}" for k, v in cur["cleaning"].items()]
                                             or ["none"]) + [""]
    lines += ["## PII redactions", ""] + _table("| type | count |", [f"| {md_text(k)} | {v} |"
                                                                     for k, v in cur["pii"].items()]) + [""]
    issues = cur["issues"]
    lines += ["## Input issues", ""] + _table("| kind | count |", [f"| {md_text(k)} | {v} |"
                                                                  for k, v in issues["counts"].items()]) + [""]
    for ex in issues["examples"][:50]:
        where = ex["file"] if ex["line"] is None else f"{ex['file']}:{ex['line']}"
        lines.append(f"- {md_code(where)} {md_text(ex['kind'])}: {md_text(ex['message'])}")
    lines += ["", "## Shards", ""]
    lines += _table("| split | shards | documents | tokens |",
                    [f"| {s} | {t['shards']} | {t['documents']} | {t['tokens']} |" for s, t in pack["totals"].items()])
    lines += ["", f"Bytes per token: {pack['bytes_per_token']:.2f}.", ""]
    lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path

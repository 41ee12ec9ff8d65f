"""Evaluation results as JSON (machine-readable, with the conditions) and a Markdown table."""

from __future__ import annotations

import json
from pathlib import Path

from pyllm.data.jsonl import strict_json
from pyllm.markdown import md_text


def markdown_table(results: dict[str, dict]) -> str:
    """One row per (task, metric): | task | metric | value | n |."""
    lines = ["| task | metric | value | n |", "|---|---|---|---|"]
    for task, metrics in results.items():
        n = metrics.get("n", metrics.get("documents", ""))
        for metric, value in metrics.items():
            if metric in ("n", "documents"):
                continue
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"| {md_text(task)} | {md_text(metric)} | {shown} | {n} |")
    return "\n".join(lines) + "\n"


def write_report(results: dict[str, dict], meta: dict, json_path: str | Path, markdown_path: str | Path | None = None):
    """Write {"meta": ..., "results": ...} to ``json_path`` (strict JSON: a nan / inf figure as null) and the
    table to ``markdown_path``."""

    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(strict_json({"meta": meta, "results": results}), indent=1))
    if markdown_path is not None:
        markdown_path = Path(markdown_path)
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        header = f"# Evaluation of {md_text(meta.get('model', '?'))}\n\n"
        markdown_path.write_text(header + markdown_table(results))

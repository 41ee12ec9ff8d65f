"""Render a results file into Markdown tables and PNG plots (matplotlib, Agg backend).

For each suite and device found in ``<name>.jsonl`` the latest session (same commit, device and suite; a
GPU sweep may span several resumed runs) is rendered into ``<name>.md`` next to it, with plots under
``plots/``. Ratios are taken only between numbers of that one session: "x eager fp32" is the speedup
over the unfused PyTorch reference in fp32 on the same shape and mode, "x compile" over torch.compile of
the reference, "x best external" over the fastest external library measured.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from . import results  # noqa: E402

SUITE_ORDER = ("gpu", "cpu", "short")
_CORE = ("torch eager", "torch.compile", "pyllm-triton", "pyllm-cuda", "pyllm-cpu")
_PYLLM = ("pyllm-triton", "pyllm-cuda", "pyllm-cpu")


def latest_sessions(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(suite, device) -> the records of the most recent session of that suite on that device (later
    duplicates of a measurement win). One suite may have run on several devices: a lent VM's "AMD EPYC" has
    been CPUs of two generations, and each keeps its latest tables."""
    by_session: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        by_session[results.session_key(r)].append(r)
    latest: dict[tuple[str, str], tuple[str, tuple]] = {}
    for key, recs in by_session.items():
        where, newest = (key[2], key[1]), max(r["time"] for r in recs)
        if where not in latest or newest > latest[where][0]:
            latest[where] = (newest, key)
    out = {}
    # suites in SUITE_ORDER, and within a suite the most recently measured device first (a stable sort)
    order = sorted(latest, key=lambda w: latest[w][0], reverse=True)
    order.sort(key=lambda w: (SUITE_ORDER.index(w[0]) if w[0] in SUITE_ORDER else len(SUITE_ORDER), w[0]))
    for where in order:
        key = latest[where][1]
        dedup = {}
        for r in sorted(by_session[key], key=lambda r: r["time"]):
            ident = (r.get("kind"), r.get("op"), r.get("case"), r.get("dtype"), r.get("mode"), r.get("provider"),
                     r.get("model"), r.get("backend"), r.get("precision"))
            dedup[ident] = r
        out[where] = list(dedup.values())
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _ms(r: dict) -> str:
    return f"{r['median_ms']:.3f} [{r['q25_ms']:.3f}-{r['q75_ms']:.3f}]"


def _rate(r: dict) -> str:
    if r.get("tflops"):
        return f"{r['tflops']:.3f} TFLOP/s"
    if r.get("gbps"):
        return f"{r['gbps']:.1f} GB/s"
    return "-"


def _fmt(x, spec: str, none: str = "-") -> str:
    return format(x, spec) if x is not None else none


def op_section(op: str, recs: list[dict]) -> list[str]:
    ok = [r for r in recs if r["status"] == "ok"]
    lines = [f"### {op}", ""]
    if ok:
        providers = [p for p in dict.fromkeys(r["provider"] for r in ok)]
        rows = list(dict.fromkeys((r["case"], r["dtype"], r["mode"]) for r in ok))
        cell = {(r["case"], r["dtype"], r["mode"], r["provider"]): r for r in ok}
        lines += ["Median ms [quartiles] per provider:", "",
                  "| case | dtype | mode | " + " | ".join(providers) + " |",
                  "|---|---|---|" + "---|" * len(providers)]
        for case, dtype, mode in rows:
            cells = [_ms(cell[(case, dtype, mode, p)]) if (case, dtype, mode, p) in cell else "-" for p in providers]
            lines.append(f"| {case} | {dtype} | {mode} | " + " | ".join(cells) + " |")
        lines += ["", "Throughput, roofline (share of this run's measured copy bandwidth or matmul peak), peak "
                  "memory and speedups:", "",
                  "| case | dtype | mode | provider | throughput | roofline | peak MiB | x eager fp32 | "
                  "x eager same dtype | x compile | x best external |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for case, dtype, mode in rows:
            base32 = cell.get((case, "fp32", mode, "torch eager"))
            base = cell.get((case, dtype, mode, "torch eager"))
            comp = cell.get((case, dtype, mode, "torch.compile"))
            ext = [cell[k] for k in cell if k[:3] == (case, dtype, mode) and k[3] not in _CORE]
            best_ext = min(ext, key=lambda r: r["median_ms"]) if ext else None
            for p in providers:
                r = cell.get((case, dtype, mode, p))
                if r is None or (p not in _PYLLM and p != "torch eager"):
                    continue
                ratio = lambda b: f"{b['median_ms'] / r['median_ms']:.2f}" if b else "-"  # noqa: E731
                ext_s = f"{ratio(best_ext)} ({best_ext['provider']})" if best_ext else "-"
                lines.append(f"| {case} | {dtype} | {mode} | {p} | {_rate(r)} | {_fmt(r.get('roofline_pct'), '.0f')}% | "
                             f"{_fmt(r.get('peak_mem_mb'), '.0f')} | {ratio(base32)} | {ratio(base)} | {ratio(comp)} | {ext_s} |")
    not_run = dict.fromkeys((r["provider"], r["status"], r["reason"]) for r in recs if r["status"] != "ok")
    if not_run:
        lines += ["", "Not timed:", ""] + [f"- {p} ({s}): {reason}" for p, s, reason in not_run]
    return lines + [""]


def train_section(recs: list[dict]) -> list[str]:
    lines = ["### training step (end to end)", "",
             "| model | backend | precision | tokens/step | ms/step [quartiles] | tokens/s | MFU | peak MiB | "
             "x torch fp32 | ops that fell back to the reference |", "|---|---|---|---|---|---|---|---|---|---|"]
    ok = [r for r in recs if r["status"] == "ok"]
    base = {r["model"]: r for r in ok if r["backend"] == "torch" and r["precision"] == "fp32"}
    for r in ok:
        b = base.get(r["model"])
        lines.append(f"| {r['model']} | {r['backend']} | {r['precision']} | {r['tokens']} | {_ms(r)} | "
                     f"{r['tokens_per_s']:.0f} | {_fmt(r.get('mfu_pct'), '.1f')}% | {_fmt(r.get('peak_mem_mb'), '.0f')} | "
                     f"{(b['median_ms'] / r['median_ms']) if b else float('nan'):.2f} | "
                     f"{', '.join(o.removeprefix('pyllm.ops.') for o in r.get('fallbacks', [])) or '-'} |")
    not_run = dict.fromkeys((r["backend"], r["precision"], r["reason"]) for r in recs if r["status"] != "ok")
    if not_run:
        lines += ["", "Not timed:", ""] + [f"- {b} {p}: {reason}" for b, p, reason in not_run]
    lines += ["", "MFU: model FLOPs (6 N per token plus attention, as in PaLM's appendix) per second over the "
              "matmul peak measured in the same run for that precision.", ""]
    return lines


def plot_op(op: str, recs: list[dict], path: Path) -> Path | None:
    """Grouped bars: throughput per case and provider, one panel per dtype, training mode (fwd+bwd)."""
    ok = [r for r in recs if r["status"] == "ok" and r["mode"] in ("fwd+bwd", "fwd")]
    if any(r["mode"] == "fwd+bwd" for r in ok):
        ok = [r for r in ok if r["mode"] == "fwd+bwd"]
    if not ok:
        return None
    dtypes = list(dict.fromkeys(r["dtype"] for r in ok))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(5 * len(dtypes) + 2, 4), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        sub = [r for r in ok if r["dtype"] == dtype]
        cases = list(dict.fromkeys(r["case"] for r in sub))
        providers = list(dict.fromkeys(r["provider"] for r in sub))
        width = 0.8 / len(providers)
        for i, p in enumerate(providers):
            vals = []
            for c in cases:
                r = next((r for r in sub if r["case"] == c and r["provider"] == p), None)
                vals.append((r.get("tflops") or r.get("gbps") or 1e3 / r["median_ms"]) if r else 0.0)
            ax.bar([j + i * width for j in range(len(cases))], vals, width, label=p)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels([c.split(" (")[0] for c in cases], rotation=20, ha="right", fontsize=8)
        unit = "TFLOP/s" if sub[0].get("tflops") else "GB/s" if sub[0].get("gbps") else "calls/s"
        ax.set_ylabel(unit)
        ax.set_title(f"{op} {dtype} {sub[0]['mode']}")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def render_file(path: str | Path) -> list[Path]:
    """Write ``<stem>.md`` (and plots) for results file ``path``; returns the files written."""
    path = Path(path)
    sessions = latest_sessions(results.read(path))
    md = path.with_suffix(".md")
    written = [md]
    lines = [f"# Benchmark results: {path.name}", "",
             f"Rendered from `{path.name}` by `python -m benchmarks render`; the latest session of each suite on "
             "each device (most recent device first). "
             "Every number was measured on the machine named in its section.", ""]
    devices_of = defaultdict(int)
    for suite, _ in sessions:
        devices_of[suite] += 1
    for (suite, device), recs in sessions.items():
        # a suite measured on several devices: plot names carry the device too
        tag = f"{suite}-{_slug(device or 'unknown')}" if devices_of[suite] > 1 else suite
        m = recs[0]["machine"]
        calib = next((r for r in reversed(recs) if r.get("kind") == "calibration"), None)
        when = sorted(r["time"] for r in recs)
        lines += [f"## suite `{suite}` on {m['device_name']}", "",
                  f"- measured {when[0]} to {when[-1]} (UTC); commit `{(m.get('commit') or '?')[:12]}`"
                  f"{' with uncommitted changes' if m.get('dirty') else ''}",
                  f"- torch {m['torch']}, triton {m.get('triton')}, python {m['python']}, {m['torch_threads']} threads"
                  + (f", load average {m['load_avg_1m']} at start" if m.get("load_avg_1m") is not None else "")
                  + (f", host memory {m['host_memory']}" if m.get("host_memory") else "")
                  + (f", CUDA {m.get('cuda')}, driver {m.get('driver')}" if m.get("cuda") else "")]
        if calib:
            lines.append(f"- measured ceilings: copy {calib['copy_gbps']:.1f} GB/s; matmul "
                         + ", ".join(f"{d} {t:.3f} TFLOP/s" for d, t in calib["matmul_tflops"].items()))
        lines.append("")
        by_op: dict[str, list[dict]] = defaultdict(list)
        for r in recs:
            if r.get("kind") in ("op", "train_step"):
                by_op[r["op"]].append(r)
        for op, op_recs in by_op.items():
            if op == "train_step":
                lines += train_section(op_recs)
                continue
            lines += op_section(op, op_recs)
            plot = plot_op(op, op_recs, path.parent / "plots" / f"{path.stem}-{tag}-{op}.png")
            if plot is not None:
                written.append(plot)
                lines += [f"![{op}](plots/{plot.name})", ""]
    md.write_text("\n".join(lines) + "\n")
    return written

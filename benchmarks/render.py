"""Render a results file into Markdown tables and PNG plots (matplotlib, Agg backend).

For each suite and device found in ``<name>.jsonl`` the latest session (one configuration:
``results.session_key``; a GPU sweep may span several resumed runs) is rendered into ``<name>.md`` next to
it, with plots under ``plots/``. Ratios are taken only between numbers of that one session: "x eager fp32"
is the speedup over the unfused PyTorch reference in fp32 on the same shape and mode, "x compile" over
torch.compile of the reference, "x best external" over the fastest external library measured.
"""

from __future__ import annotations

import math
import re
import warnings
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
                     r.get("model"), r.get("backend"), r.get("precision"),
                     r.get("run_id") if r.get("kind") == "calibration" else None)  # each run's ceilings
            dedup[ident] = r
        out[where] = list(dedup.values())
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _text(value) -> str:
    """A table cell of free text (a case label, a provider): in GFM a '|' ends the cell, a line break the row."""
    return " ".join(str(value).splitlines()).replace("|", "\\|")


def _median(r: dict | None) -> float | None:
    """The median of a record if a ratio can be taken of it (a positive, finite number), else None."""
    m = r.get("median_ms") if r else None
    return m if isinstance(m, (int, float)) and 0 < m < math.inf else None


def _speedup(base: dict | None, r: dict) -> str:
    """base's median over r's, "-" where there is no base or either median is not a number to divide by."""
    b, m = _median(base), _median(r)
    return f"{b / m:.2f}" if b and m else "-"


def _ms(r: dict) -> str:
    q25, q75 = r.get("q25_ms"), r.get("q75_ms")
    spread = f"{q25:.3f}-{q75:.3f}" if q25 is not None and q75 is not None else "-"
    return f"{_fmt(r.get('median_ms'), '.3f')} [{spread}]"


def _rate(r: dict) -> str:
    if r.get("tflops"):
        return f"{r['tflops']:.3f} TFLOP/s"
    if r.get("gbps"):
        return f"{r['gbps']:.1f} GB/s"
    return "-"


def _fmt(x, spec: str, unit: str = "") -> str:
    return format(x, spec) + unit if x is not None else "-"


def _not_timed(recs: list[dict]) -> list[str]:
    """One line per provider, status and reason, naming the cases (dtype, modes) it happened on unless that is
    every (case, dtype, mode) of the op: "- liger (wrong) on 4096x768 bf16 fwd/bwd; 1024x768 fp32: reason"."""
    modes = defaultdict(set)  # (case, dtype) -> every mode the op has there
    failed = defaultdict(lambda: defaultdict(list))  # (provider, status, reason) -> (case, dtype) -> modes
    for r in recs:
        modes[(r["case"], r["dtype"])].add(r["mode"])
        if r["status"] != "ok":
            failed[(r["provider"], r["status"], r.get("reason") or "-")][(r["case"], r["dtype"])].append(r["mode"])
    lines = []
    for (provider, status, reason), where in failed.items():
        everywhere = all(set(where.get(k, ())) == v for k, v in modes.items())
        on = "" if everywhere else " on " + "; ".join(
            f"{case} {dtype}" + ("" if set(ms) == modes[(case, dtype)] else " " + "/".join(ms))
            for (case, dtype), ms in where.items())
        lines.append(f"- {provider} ({status}){on}: {reason}")
    return lines


def op_section(op: str, recs: list[dict]) -> list[str]:
    ok = [r for r in recs if r["status"] == "ok"]
    lines = [f"### {op}", ""]
    if ok:
        providers = [p for p in dict.fromkeys(r["provider"] for r in ok)]
        rows = list(dict.fromkeys((r["case"], r["dtype"], r["mode"]) for r in ok))
        cell = {(r["case"], r["dtype"], r["mode"], r["provider"]): r for r in ok}
        failed = {(r["case"], r["dtype"], r["mode"], r["provider"]): r["status"] for r in recs if r["status"] != "ok"}
        lines += ["Median ms [quartiles] per provider (wrong, skipped, error: not timed, see the list below; "
                  "-: not measured):", "",
                  "| case | dtype | mode | " + " | ".join(map(_text, providers)) + " |",
                  "|---|---|---|" + "---|" * len(providers)]
        for case, dtype, mode in rows:
            keys = [(case, dtype, mode, p) for p in providers]
            cells = [_ms(cell[k]) if k in cell else failed.get(k, "-") for k in keys]
            lines.append(f"| {_text(case)} | {_text(dtype)} | {_text(mode)} | " + " | ".join(cells) + " |")
        lines += ["", "Throughput, roofline (share of this run's measured copy bandwidth or matmul peak), peak "
                  "memory and speedups:", "",
                  "| case | dtype | mode | provider | throughput | roofline | peak MiB | x eager fp32 | "
                  "x eager same dtype | x compile | x best external |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for case, dtype, mode in rows:
            base32 = cell.get((case, "fp32", mode, "torch eager"))
            base = cell.get((case, dtype, mode, "torch eager"))
            comp = cell.get((case, dtype, mode, "torch.compile"))
            ext = [cell[k] for k in cell if k[:3] == (case, dtype, mode) and k[3] not in _CORE and _median(cell[k])]
            best_ext = min(ext, key=_median) if ext else None
            for p in providers:
                r = cell.get((case, dtype, mode, p))
                if r is None or (p not in _PYLLM and p != "torch eager"):
                    continue
                ext_s = f"{_speedup(best_ext, r)} ({_text(best_ext['provider'])})" if best_ext else "-"
                lines.append(f"| {_text(case)} | {_text(dtype)} | {_text(mode)} | {_text(p)} | {_rate(r)} | "
                             f"{_fmt(r.get('roofline_pct'), '.0f', '%')} | {_fmt(r.get('peak_mem_mb'), '.0f')} | "
                             f"{_speedup(base32, r)} | {_speedup(base, r)} | {_speedup(comp, r)} | {ext_s} |")
    not_run = _not_timed(recs)
    if not_run:
        lines += ["", "Not timed:", ""] + not_run
    return lines + [""]


def train_section(recs: list[dict]) -> list[str]:
    lines = ["### training step (end to end)", "",
             "| model | backend | precision | tokens/step | ms/step [quartiles] | tokens/s | MFU | peak MiB | "
             "x torch fp32 | ops that fell back to the reference |", "|---|---|---|---|---|---|---|---|---|---|"]
    ok = [r for r in recs if r["status"] == "ok"]
    base = {r["model"]: r for r in ok if r["backend"] == "torch" and r["precision"] == "fp32"}
    for r in ok:
        fallbacks = ", ".join(o.removeprefix("pyllm.ops.") for o in r.get("fallbacks") or []) or "-"
        lines.append(f"| {_text(r['model'])} | {_text(r['backend'])} | {_text(r['precision'])} | "
                     f"{r.get('tokens', '-')} | {_ms(r)} | {_fmt(r.get('tokens_per_s'), '.0f')} | "
                     f"{_fmt(r.get('mfu_pct'), '.1f', '%')} | {_fmt(r.get('peak_mem_mb'), '.0f')} | "
                     f"{_speedup(base.get(r['model']), r)} | {_text(fallbacks)} |")
    models = set(r["model"] for r in recs)
    not_run = defaultdict(list)  # (backend, precision, reason) -> the models it happened on
    for r in recs:
        if r["status"] != "ok":
            not_run[(r["backend"], r["precision"], r.get("reason") or "-")].append(r["model"])
    if not_run:
        lines += ["", "Not timed:", ""]
        for (backend, precision, reason), on in not_run.items():
            lines.append(f"- {backend} {precision}{'' if set(on) == models else ' on ' + '; '.join(on)}: {reason}")
    lines += ["", "MFU: model FLOPs (6 N per token plus attention, as in PaLM's appendix) per second over the "
              "matmul peak measured in the same run for that precision.", ""]
    return lines


def _throughput(r: dict) -> float | None:
    """A plot's bar: TFLOP/s, GB/s or else calls per second; None if the record has none of them."""
    m = _median(r)
    return r.get("tflops") or r.get("gbps") or (1e3 / m if m else None)


def plot_op(op: str, recs: list[dict], path: Path) -> Path | None:
    """Grouped bars: throughput per case and provider, one panel per dtype, training mode (fwd+bwd)."""
    ok = [r for r in recs if r["status"] == "ok" and r["mode"] in ("fwd+bwd", "fwd")]
    if any(r["mode"] == "fwd+bwd" for r in ok):
        ok = [r for r in ok if r["mode"] == "fwd+bwd"]
    if not ok:
        return None
    dtypes = list(dict.fromkeys(r["dtype"] for r in ok))
    # one colour per provider in every panel: tab10's colours, then their light shades
    colour = {p: matplotlib.colormaps["tab20"]((2 * i + i // 10) % 20)
              for i, p in enumerate(dict.fromkeys(r["provider"] for r in ok))}
    bars = {}  # provider -> one of its bars' containers, for the legend
    fig, axes = plt.subplots(1, len(dtypes), figsize=(5 * len(dtypes) + 2, 4), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        sub = [r for r in ok if r["dtype"] == dtype]
        cases = list(dict.fromkeys(r["case"] for r in sub))
        providers = list(dict.fromkeys(r["provider"] for r in sub))
        width = 0.8 / len(providers)
        for i, p in enumerate(providers):
            xs, vals = [], []  # no bar where the provider has no number (not timed, not measured)
            for j, c in enumerate(cases):
                r = next((r for r in sub if r["case"] == c and r["provider"] == p), None)
                value = _throughput(r) if r else None
                if value:
                    xs.append(j + i * width)
                    vals.append(value)
            if xs:
                bars[p] = ax.bar(xs, vals, width, color=colour[p])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels([c.split(" (")[0] for c in cases], rotation=20, ha="right", fontsize=8)
        unit = "TFLOP/s" if sub[0].get("tflops") else "GB/s" if sub[0].get("gbps") else "calls/s"
        ax.set_ylabel(unit)
        ax.set_title(f"{op} {dtype} {sub[0]['mode']}")
    shown = [p for p in colour if p in bars]
    axes[0][-1].legend([bars[p] for p in shown], shown, fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# the fields an op or train_step record is tabulated by: one without them is skipped with a warning
_IDENTITY = ("time", "op", "case", "dtype", "mode", "provider", "status")
_IDENTITY_TRAIN = _IDENTITY + ("model", "backend", "precision")
# the run's settings in a section's header: (machine field, how it reads)
_SETTINGS = (("torch", "torch {}"), ("triton", "triton {}"), ("python", "python {}"), ("torch_threads", "{} threads"),
             ("load_avg_1m", "load average {} at start"), ("host_memory", "host memory {}"), ("cuda", "CUDA {}"),
             ("driver", "driver {}"))


def _well_formed(r: dict, path: Path) -> bool:
    need = {"op": _IDENTITY, "train_step": _IDENTITY_TRAIN}.get(r.get("kind"), ("time",))
    missing = [f for f in need if r.get(f) is None]
    if missing:
        what = ", ".join(str(r[f]) for f in ("op", "case", "dtype", "mode", "provider") if r.get(f) is not None)
        warnings.warn(f"{path}: {r.get('kind')} record of run {r.get('run_id')} ({what}) has no "
                      f"{', '.join(missing)}; not rendered", RuntimeWarning, stacklevel=3)
    return not missing


def _setting(machines: list[dict], field: str) -> str | None:
    """A machine field over the runs of a session, "a / b" where they differ; None where none recorded it."""
    return " / ".join(dict.fromkeys(str(m[field]) for m in machines if m.get(field) is not None)) or None


def render_file(path: str | Path) -> list[Path]:
    """Write ``<stem>.md`` (and plots) for results file ``path``; returns the files written."""
    path = Path(path)
    sessions = latest_sessions([r for r in results.read(path) if _well_formed(r, path)])
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
        machines = [r.get("machine") or {} for r in recs]
        m = machines[0]  # commit, dirty, threads and host memory are one per session (results.session_key)
        when = sorted(r["time"] for r in recs)
        runs = len({r.get("run_id") for r in recs})
        settings = [form.format(v) for field, form in _SETTINGS if (v := _setting(machines, field))]
        lines += [f"## suite `{suite}` on {device or 'an unnamed device'}", "",
                  f"- measured {when[0]} to {when[-1]} (UTC){f' in {runs} runs' if runs > 1 else ''}; "
                  f"commit `{(m.get('commit') or '?')[:12]}`{' with uncommitted changes' if m.get('dirty') else ''}",
                  "- " + (", ".join(settings) or "-")]
        calibs = [r for r in recs if r.get("kind") == "calibration"]  # one per run
        if calibs:
            peaks = defaultdict(dict)  # dtype -> its matmul peaks over the runs
            for c in calibs:
                for d, t in (c.get("matmul_tflops") or {}).items():
                    peaks[d][_fmt(t, ".3f")] = None
            copy = " / ".join(dict.fromkeys(_fmt(c.get("copy_gbps"), ".1f") for c in calibs))
            matmul = ", ".join(f"{d} {' / '.join(ts)} TFLOP/s" for d, ts in peaks.items())
            lines.append(f"- measured ceilings: copy {copy} GB/s; matmul {matmul or '-'}")
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

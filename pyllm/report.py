"""The pipeline's report: ``report.md`` plus PNG plots (matplotlib, Agg) from the stage records.

Sections: whether each stage improved what it should (``stage_checks``, computed from the records),
what ran and how long it took (time and energy), the data funnel, loss curves of every training stage,
one evaluation table over all checkpoints, each post-training stage's own held-out metric before and
after, sample answers before and after post-training, and throughput/MFU.

Columns of the evaluation table, each measured the same way on every checkpoint:
- bits/byte: held-out standard-library docstrings (``pyllm.eval`` task ``stdlib_ppl``), lower is better;
- MC name / MC doc: 4-way multiple choice on held-out stdlib functions (``stdlib_name`` acc,
  ``stdlib_doc`` acc_norm), chance is 0.25;
- task acc: exact answers to held-out built-in task prompts (add / sort / reverse), greedy;
- reward: the trained reward model's mean score of those greedy answers;
- KL to SFT: KL(checkpoint || SFT model) per response, on answers sampled at temperature 1.
"""

from __future__ import annotations

import datetime
import platform
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .markdown import md_code, md_text  # noqa: E402

TRAIN_STAGES = ("pretrain", "sft", "rm", "dpo", "rl")
CPU_WATTS_PER_CORE = 10.0
"""Assumed draw of one busy server core, for the energy ESTIMATE where no energy counter exists."""
FORGETTING_TOLERANCE = 0.15
"""SFT may raise bits/byte on held-out text by at most this share of the pretrained model's (forgetting)."""
KL_BUDGET = 2.0
"""RL's KL to the model it starts from, in nats per response, above which the policy has drifted too far
(reward-model over-optimisation reached 2.9 in pyllm/post/README.md; the task reward needs far less)."""


def _accuracy_slack(p: float, n: int) -> float:
    """One binomial standard error of an accuracy p measured on n items: a drop smaller than this is
    within the noise of the measurement."""
    return (p * (1 - p) / n) ** 0.5 if n else 0.0


def stage_checks(records: dict) -> list[dict]:
    """Did each stage improve what it should, without breaking what it should keep?

    One dict per check: stage, metric, goal ("higher", "lower" or a bound), before, after, ok, and for a
    rate over n held-out items its binomial standard error ``se`` (at the mean of before and after).
    Improvement checks compare held-out measurements before and after the stage (ok: strictly better);
    "keep" checks allow the stated slack. A check that could not be measured (a stage it reads did not
    run, a value is missing) has ok None and says why in ``why``; one with a NaN before or after fails (ok
    False). Stages not in ``records`` give no checks."""
    def done(name):
        rec = records.get(name)
        return rec is not None and rec.status == "done"

    def why_not_done(*names):
        """Why the first of these stages that is not done has no results; None when all are done."""
        for name in names:
            rec = records.get(name)
            if rec is None:
                return f"{name} not run"
            if rec.status != "done":
                reason = rec.summary.get("reason")
                return f"{name} {rec.status}" + (f" ({reason})" if reason else "")
        return None

    def post(name, key):
        s = records[name].summary if done(name) else {}
        return (s.get("before") or {}).get(key), (s.get("after") or {}).get(key)

    def evaluated(key, *checkpoints):
        return [(ev.get(c) or {}).get(key) for c in checkpoints]

    ev = (records["eval"].summary.get("checkpoints") or {}) if done("eval") else {}
    n_prompts = records["eval"].summary.get("heldout_prompts", 0) if done("eval") else 0
    checks = []

    def add(stage, metric, goal, before, after, source, needs, keep=None, n=None):
        """source: where before and after come from; needs: the stages that make them; keep(before, after):
        whether a "keep" check holds."""
        missing = [w for w, v in (("before", before), ("after", after)) if v is None]
        why = why_not_done(*needs) or (f"no {' and '.join(missing)} value in {source}" if missing else None)
        if why:
            checks.append({"stage": stage, "metric": metric, "goal": goal, "before": before, "after": after,
                           "ok": None, "se": None, "why": why})
            return
        if before != before or after != after:  # NaN: a broken measurement fails, whatever the comparison says
            checks.append({"stage": stage, "metric": metric, "goal": goal, "before": before, "after": after,
                           "ok": False, "se": None})
            return
        ok = keep(before, after) if keep else (after > before if goal == "higher" else after < before)
        se = _accuracy_slack((before + after) / 2, n) if n else None
        checks.append({"stage": stage, "metric": metric, "goal": goal, "before": before, "after": after, "ok": ok,
                       "se": se})

    if "pretrain" in records:
        hist = (records["pretrain"].summary.get("history") or []) if done("pretrain") else []
        first = next((r for r in hist if "loss" in r), {})
        val = [r["val_loss"] for r in hist if "val_loss" in r]
        add("pretrain", f"next-token loss, nats/token (before: training loss at step {first.get('step', '-')}; "
            "after: validation loss)", "lower", first.get("loss"), val[-1] if val else None,
            "pretrain's logged history", ("pretrain",))
    if "sft" in records:
        needs, source = ("sft", "eval"), "eval's rows of pretrain and sft"
        add("sft", "task accuracy, held-out prompts (greedy)", "higher", *evaluated("task_acc", "pretrain", "sft"),
            source, needs, n=n_prompts)
        add("sft", "bits/byte on held-out stdlib text (forgetting)", f"keep: <= +{FORGETTING_TOLERANCE:.0%}",
            *evaluated("bits_per_byte", "pretrain", "sft"), source, needs,
            keep=lambda b, a: a <= b * (1 + FORGETTING_TOLERANCE))
    if "rm" in records:
        add("rm", "pairwise accuracy, held-out pairs", "higher", *post("rm", "pairwise_accuracy"), "rm's summary",
            ("rm",), n=records["rm"].summary.get("heldout_pairs"))
    if "dpo" in records:
        add("dpo", "implicit-reward accuracy, held-out pairs", "higher", *post("dpo", "reward_accuracy"),
            "dpo's summary", ("dpo",), n=records["dpo"].summary.get("heldout_pairs"))
        add("dpo", "implicit-reward margin, held-out pairs", "higher", *post("dpo", "reward_margin"),
            "dpo's summary", ("dpo",))
        add("dpo", "task accuracy, held-out prompts (greedy)", "keep: >= SFT - 1 s.e.",
            *evaluated("task_acc", "sft", "dpo"), "eval's rows of sft and dpo", ("dpo", "eval"),
            keep=lambda b, a: a >= b - _accuracy_slack(b, n_prompts), n=n_prompts)
    if "rl" in records:
        rl = records["rl"].summary  # a 0/1 task reward makes the mean reward a rate
        name, start = _stage_name("rl", rl), rl.get("start", "sft")
        add(name, "mean reward of sampled answers (T=1), held-out prompts", "higher", *post("rl", "sampled_reward"),
            "rl's summary", ("rl",), n=rl.get("heldout_prompts") if rl.get("reward") == "task" else None)
        add(name, f"task accuracy, held-out prompts (greedy), vs {start}", "higher",
            *evaluated("task_acc", start, "rl"), f"eval's rows of {start} and rl", ("rl", "eval"), n=n_prompts)
        add(name, "KL to the start model, nats/response", f"keep: <= {KL_BUDGET:g}", *post("rl", "kl_to_ref"),
            "rl's summary", ("rl",), keep=lambda b, a: a <= KL_BUDGET)
    return checks


def _f(x, spec: str = ".3f") -> str:
    """A number as a table cell: "-" when there is none, "nan" when a NaN was measured (in any ``spec``)."""
    if not isinstance(x, (int, float)):
        return "-"
    return format(x, spec) if x == x else "nan"


def _stage_name(name: str, summary: dict) -> str:
    return summary.get("stage", name) if name == "rl" else name


def plot_funnel(funnel: list, path: Path) -> Path:
    labels, counts = zip(*funnel)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(range(len(counts)), counts, color="tab:blue")
    ax.set_yticks(range(len(counts)))
    ax.set_yticklabels([f"after {s}" if s != "read" else "read" for s in labels])
    ax.invert_yaxis()
    for i, c in enumerate(counts):
        ax.text(c, i, f" {c}", va="center", fontsize=8)
    ax.set_xlabel("documents")
    ax.set_title("data funnel")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_losses(records: dict, path: Path) -> Path | None:
    """One panel per training stage: training loss per logged step (and validation loss if logged)."""
    panels = [(n, r.summary.get("history") or []) for n, r in records.items()
              if n in TRAIN_STAGES and r.status == "done"]
    panels = [(n, h) for n, h in panels if any("loss" in rec for rec in h)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3), squeeze=False)
    for ax, (name, hist) in zip(axes[0], panels):
        train = [(r["step"], r["loss"]) for r in hist if "loss" in r and "step" in r]
        ax.plot(*zip(*train), label="train loss")
        val = [(r["step"], r["val_loss"]) for r in hist if "val_loss" in r and "step" in r]
        if val:
            ax.plot(*zip(*val), "o-", label="val loss")
        for key, label in (("sft_loss", "SFT part"), ("replay_loss", "replayed text part")):  # SFT with replay
            part = [(r["step"], r[key]) for r in hist if key in r and "step" in r]
            if part:
                ax.plot(*zip(*part), label=label, linewidth=0.8)
        ax.set_title(_stage_name(name, records[name].summary))
        ax.set_xlabel("step")
        ax.legend(fontsize=7, loc="upper left")
        # RL: the policy loss says little, the reward of the sampled answers is the curve to watch; DPO:
        # the share of training pairs the implicit reward ranks right
        for key, label in (("reward", "sampled reward"), ("reward_accuracy", "implicit-reward accuracy")):
            curve = [(r["step"], r[key]) for r in hist if key in r and "loss" in r]
            if curve:
                twin = ax.twinx()
                twin.plot(*zip(*curve), color="tab:red", label=label)
                twin.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_eval(rows: dict, path: Path) -> Path | None:
    """One bar panel per metric over the checkpoints; None (no plot) when no checkpoint has any of them."""
    metrics = [("bits_per_byte", "bits/byte (lower is better)"), ("mc_name_acc", "MC name acc"),
               ("task_acc", "task acc"), ("reward", "reward")]
    metrics = [(k, t) for k, t in metrics if any(k in r for r in rows.values())]
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3), squeeze=False)
    names = list(rows)
    for ax, (key, title) in zip(axes[0], metrics):
        ax.bar(names, [rows[n].get(key, float("nan")) for n in names], color="tab:green")
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _before_after(summary: dict) -> str:
    before, after = summary.get("before") or {}, summary.get("after") or {}
    parts = [f"{k} {_f(before.get(k))} -> {_f(after.get(k))}" for k in after
             if isinstance(after.get(k), (int, float)) and k in before]
    return "; ".join(parts) or "-"


def _checks_section(records: dict) -> list[str]:
    checks = stage_checks(records)
    if not checks:
        return []
    failed = [c for c in checks if c["ok"] is False]
    unmeasured = [c for c in checks if c["ok"] is None]

    def outcome(c):
        if c["ok"] is None:
            return f"not measured: {md_text(c['why'])}"
        return ("yes" if c["ok"] else "**NO**") + (f" ({(c['after'] - c['before']) / c['se']:+.1f} s.e.)"
                                                   if c["se"] else "")

    lines = ["## Did each stage improve what it should?", "",
             "| stage | metric | goal | before | after | ok? |", "|---|---|---|---|---|---|"]
    lines += [f"| {c['stage']} | {c['metric']} | {c['goal']} | {_f(c['before'])} | {_f(c['after'])} | {outcome(c)} |"
              for c in checks]
    passed = len(checks) - len(failed) - len(unmeasured)
    verdict = [f"All {len(checks)} checks pass" if passed == len(checks) else f"{passed} of {len(checks)} checks pass"]
    if failed:
        verdict.append(f"**{len(failed)} fail**: " + ", ".join(f"{c['stage']} {c['metric'].split(',')[0]}"
                                                                 for c in failed))
    if unmeasured:
        verdict.append(f"{len(unmeasured)} not measured")
    return lines + ["", "; ".join(verdict) + ". Computed from the evaluation below (held-out data only); "
                    "\"keep\" rows allow the stated slack, improvement rows need a strictly better value. For "
                    "rates, the change is also given in binomial standard errors (s.e., at the mean rate over the n "
                    "held-out items): a change under about 2 s.e. is within the noise of one run.", ""]


def write_pipeline_report(cfg, records: dict, directory: Path) -> Path:
    """Write ``<directory>/report.md`` and its plots; returns the Markdown path."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    R = records
    device = (torch.cuda.get_device_name() if torch.cuda.is_available() and cfg.device != "cpu"
              else f"CPU {platform.processor() or platform.machine()} ({__import__('os').cpu_count()} cores)")
    total_s = sum(r.seconds for r in R.values())
    lines = ["# pyllm pipeline report", "",
             f"Written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {device}; "
             f"torch {torch.__version__}; precision {cfg.precision}. "
             f"Stage outputs are under {md_code(cfg.out_dir)}.", "",
             *_checks_section(R),
             "## Stages, time and energy", "",
             "| stage | status | wall time (s) | CPU time (s) | energy | note |", "|---|---|---|---|---|---|"]
    est_kwh = 0.0
    for name, rec in R.items():
        kwh = (rec.summary.get("train") or {}).get("energy_kwh") or rec.summary.get("energy_kwh")
        if kwh is not None:
            energy = f"{kwh * 1000:.3f} Wh (measured, NVML)"
        elif rec.status == "done":
            est = rec.cpu_seconds * CPU_WATTS_PER_CORE / 3.6e6
            est_kwh += est
            energy = f"~{est * 1000:.3f} Wh (estimate)"
        else:
            energy = "-"
        note = rec.summary.get("reason", "") if rec.status != "done" else ""
        if rec.attempts > 1:
            note = f"resumed {rec.attempts - 1} time(s) after an interruption; CPU time of the last attempt only"
        lines.append(f"| {_stage_name(name, rec.summary)} | {rec.status} | {rec.seconds:.0f} | {rec.cpu_seconds:.0f} | "
                     f"{energy} | {md_text(note)} |")
    lines += ["", f"Total wall time of these stage runs: {total_s:.0f} s (cached stages show the time of the run "
              f"that produced them). Energy estimates assume {CPU_WATTS_PER_CORE:.0f} W per busy CPU core times the "
              "CPU time (no energy counter on this machine); GPU stages read NVML where available.", ""]

    data = R["data"].summary
    if R["data"].status == "done":
        funnel = plot_funnel(data["funnel"], directory / "funnel.png")
        lines += ["## Data", "",
                  "| step | documents left |", "|---|---|"] + [f"| {s} | {n} |" for s, n in data["funnel"]]
        drops = "; ".join(f"{md_text(stage)}: " + ", ".join(f"{md_text(k)} {v}" for k, v in reasons.items())
                          for stage, reasons in data["dropped"].items() if reasons)
        lines += ["", f"{data['bytes_in'] / 1e6:.2f} MB read, {data['bytes_out'] / 1e6:.2f} MB kept, "
                  f"{data['tokens']} tokens ({data['bytes_per_token']:.2f} bytes/token). Drop reasons: "
                  + (drops or "none")
                  + (f". Full data report: {md_code(data['data_report'])}." if data.get("data_report") else "."), "",
                  f"![data funnel]({funnel.name})", ""]

    losses = plot_losses(R, directory / "losses.png")
    if losses:
        lines += ["## Loss curves", "", f"![loss curves]({losses.name})", ""]

    ev = R.get("eval")
    if ev is not None and ev.status == "done":
        rows = ev.summary["checkpoints"]
        items = ev.summary.get("task_items")  # absent from a summary written before it was recorded
        evaluated = (f"{items['stdlib_ppl']} stdlib docstrings (bits/byte), {items['stdlib_name']} and "
                     f"{items['stdlib_doc']} multiple-choice items (MC name, MC doc)" if items
                     else f"up to {ev.summary['task_limit']} items per stdlib task")
        lines += ["## Evaluation of every checkpoint", "",
                  f"Held-out data only: {evaluated}, {ev.summary['heldout_prompts']} held-out task prompts. "
                  "See `pyllm/report.py` for the columns.", "",
                  "| checkpoint | bits/byte | MC name acc | MC doc acc | task acc | reward | KL to SFT |",
                  "|---|---|---|---|---|---|---|"]
        for name, row in rows.items():
            label = _stage_name(name, R[name].summary) if name in R else name
            lines.append(f"| {label} | {_f(row.get('bits_per_byte'))} | {_f(row.get('mc_name_acc'))} | "
                         f"{_f(row.get('mc_doc_acc'))} | {_f(row.get('task_acc'))} | {_f(row.get('reward'))} | "
                         f"{_f(row.get('kl_to_sft'))} |")
        plot = plot_eval(rows, directory / "eval.png")
        lines += ["", f"![evaluation]({plot.name})", ""] if plot else [""]
        samples = ev.summary["samples"]
        names = list(samples)
        prompts = list(dict.fromkeys(p for s in samples.values() for p in s))
        lines += ["## Sample answers (greedy), before and after post-training", "",
                  "| prompt | " + " | ".join(_stage_name(n, R[n].summary) if n in R else n for n in names) + " |",
                  "|---|" + "---|" * len(names)]
        for p in prompts:
            # *(...)* marks are ours: md_text escapes the asterisks of an answer that reads the same
            cells = [("*(not sampled)*" if p not in samples[n] else md_text(samples[n][p]) or "*(empty)*")
                     for n in names]
            lines.append(f"| {md_text(p)} | " + " | ".join(cells) + " |")
        lines.append("")

    post = [(n, R[n]) for n in ("sft", "rm", "dpo", "rl") if n in R and R[n].status == "done"]
    if post:
        lines += ["## Post-training stages: their own held-out metric, before -> after", "",
                  "| stage | held-out metrics |", "|---|---|"]
        lines += [f"| {_stage_name(n, r.summary)} | {_before_after(r.summary)} |" for n, r in post] + [""]

    lines += ["## Throughput", "", "Medians over the logged windows of each stage (robust to a resumed run and to "
              "evaluation pauses).", "", "| stage | steps | tokens/s | MFU | peak memory (GiB) |",
              "|---|---|---|---|---|"]
    for name in TRAIN_STAGES:
        rec = R.get(name)
        if rec is None or rec.status != "done":
            continue
        train = [r for r in rec.summary.get("history") or [] if "tokens_per_s" in r]
        rate = statistics.median(r["tokens_per_s"] for r in train) if train else None
        mfus = [r["mfu"] for r in train if r.get("mfu") is not None]
        mfu = statistics.median(mfus) if mfus else None
        mem = max((r["peak_memory_gb"] for r in train if r.get("peak_memory_gb") is not None), default=None)
        steps = train[-1]["step"] if train else "-"
        lines.append(f"| {_stage_name(name, rec.summary)} | {steps} | {_f(rate, '.0f')} | {_f(mfu, '.2%')} | "
                     f"{_f(mem, '.2f')} |")
    pre = R["pretrain"].summary
    if pre.get("peak_tflops_used"):
        lines += ["", f"MFU on a CPU is against the matmul rate measured on this device at the start of each stage "
                  f"({pre['peak_tflops_used']:.3f} TFLOP/s {cfg.precision} for pretraining), not a data-sheet peak; "
                  "on a machine shared with other work both numbers move with the load."]
    path = directory / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path

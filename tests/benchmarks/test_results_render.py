import json
import re

import pytest

from benchmarks import render, results


def _rec(provider, median, *, dtype="fp32", mode="fwd", commit="abc", time="2026-01-01T00:00:00+00:00", **kw):
    return {"schema": results.SCHEMA, "run_id": "r", "time": time, "kind": "op", "suite": "short", "op": "softmax",
            "case": "64x512", "shape": {"rows": 64, "cols": 512}, "dtype": dtype, "mode": mode,
            "provider": provider, "status": "ok", "reason": None, "median_ms": median, "q25_ms": median,
            "q75_ms": median, "min_ms": median, "max_ms": median, "reps": 3, "gbps": 1.0 / median,
            "tflops": None, "roofline_pct": 10.0, "peak_mem_mb": None,
            "machine": {"commit": commit, "device_name": "test cpu", "torch": "x", "python": "3",
                        "torch_threads": 1, "dirty": False}, **kw}


def test_log_appends_self_contained_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    log = results.ResultLog(path, {"commit": "c1", "device_name": "d"})
    log.append({"kind": "op", "op": "x"})
    results.ResultLog(path, {"commit": "c2", "device_name": "d"}).append({"kind": "op", "op": "y"})
    recs = results.read(path)
    assert [r["op"] for r in recs] == ["x", "y"]  # appended, never rewritten
    assert recs[0]["machine"]["commit"] == "c1" and recs[0]["schema"] == results.SCHEMA and recs[0]["time"]
    assert recs[0]["run_id"] != recs[1]["run_id"]


def test_read_names_file_and_line_of_a_bad_record(tmp_path):
    path = tmp_path / "r.jsonl"
    ok = json.dumps({"schema": results.SCHEMA}) + "\n"
    path.write_text(ok + "{not json\n" + ok)  # a record cut by a killed run, then the next run's: skipped, named
    with pytest.warns(RuntimeWarning, match=r"r\.jsonl:2: not a JSON record"):
        assert len(results.read(path)) == 2
    path.write_text(json.dumps({"schema": "other"}) + "\n")
    with pytest.raises(ValueError, match=r"r\.jsonl:1: field 'schema'"):
        results.read(path)


def test_render_takes_the_latest_session_and_ratios_within_it(tmp_path):
    path = tmp_path / "cpu.jsonl"
    old = [_rec("torch eager", 9.0, commit="old", time="2025-01-01T00:00:00+00:00"),
           _rec("pyllm-cpu", 0.5, commit="old", time="2025-01-01T00:00:00+00:00")]
    new = [_rec("torch eager", 2.0), _rec("pyllm-cpu", 1.0), _rec("sdpa-math", 4.0),
           {"schema": results.SCHEMA, "run_id": "r", "time": "2026-01-01T00:00:00+00:00", "kind": "calibration",
            "suite": "short", "copy_gbps": 5.0, "matmul_tflops": {"fp32": 0.1}, "machine": new_machine()},
           {**_rec("pyllm-triton", 1.0), "status": "skipped", "reason": "needs a CUDA device", "median_ms": None}]
    path.write_text("".join(json.dumps(r) + "\n" for r in old + new))
    written = render.render_file(path)
    md = (tmp_path / "cpu.md").read_text()
    assert written[0] == tmp_path / "cpu.md" and all(p.exists() for p in written)
    assert (tmp_path / "plots" / "cpu-short-softmax.png").exists()
    # the old session's 0.5 ms is not shown; ratios come from the latest session only
    assert "0.500" not in md and "| 64x512 | fp32 | fwd | pyllm-cpu | 1.0 GB/s | 10% | - | 2.00 | 2.00 | - | 4.00 (sdpa-math) |" in md
    assert "- pyllm-triton (skipped): needs a CUDA device" in md
    assert "copy 5.0 GB/s" in md


def new_machine():
    return _rec("x", 1.0)["machine"]


def test_each_device_keeps_its_latest_session_newest_device_first(tmp_path):
    path = tmp_path / "cpu.jsonl"

    def on(device, provider, median, time, commit):
        r = _rec(provider, median, time=time, commit=commit)
        r["machine"] = {**r["machine"], "device_name": device}
        return r

    recs = [on("Old CPU (2 cores)", "torch eager", 3.0, "2026-01-01T00:00:00+00:00", "a"),
            on("Old CPU (2 cores)", "pyllm-cpu", 1.0, "2026-01-01T00:00:00+00:00", "a"),
            on("New CPU (2 cores)", "torch eager", 8.0, "2026-02-01T00:00:00+00:00", "b"),
            on("New CPU (2 cores)", "pyllm-cpu", 2.0, "2026-02-01T00:00:00+00:00", "b"),
            on("Old CPU (2 cores)", "pyllm-cpu", 7.0, "2025-12-01T00:00:00+00:00", "z")]  # older session: not shown
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    render.render_file(path)
    md = (tmp_path / "cpu.md").read_text()
    new, old = md.index("## suite `short` on New CPU (2 cores)"), md.index("## suite `short` on Old CPU (2 cores)")
    assert new < old  # the most recently measured device first
    assert "| 4.00 |" in md[new:old] and "| 3.00 |" in md[old:] and "7.000" not in md  # x eager fp32 per device
    assert (tmp_path / "plots" / "cpu-short-new-cpu-2-cores-softmax.png").exists()
    assert (tmp_path / "plots" / "cpu-short-old-cpu-2-cores-softmax.png").exists()


def _calib(**kw):
    return {"schema": results.SCHEMA, "run_id": "r", "time": "2026-01-01T00:00:00+00:00", "kind": "calibration",
            "suite": "short", "copy_gbps": 5.0, "matmul_tflops": {"fp32": 0.1}, "machine": new_machine(), **kw}


def _train(backend, precision, median, model="tiny"):
    return {**_rec(backend, median), "op": "train_step", "kind": "train_step", "case": model,
            "model": model, "backend": backend, "precision": precision, "dtype": f"{backend}-{precision}",
            "mode": "train step", "tokens": 2048, "tokens_per_s": 2048e3 / median, "mfu_pct": 10.0, "fallbacks": []}


def _render(tmp_path, recs) -> str:
    path = tmp_path / "cpu.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    render.render_file(path)
    return (tmp_path / "cpu.md").read_text()


def test_free_text_cannot_break_a_table_row(tmp_path):
    """A '|' in a case label (swiglu's "[gate|up]") or a provider, a line break in a model name: every row keeps
    its header's number of cells (GFM splits cells at every unescaped '|')."""
    case = "MLP [gate|up] halves\n(2048 tokens)"
    md = _render(tmp_path, [_calib(), _rec("torch eager", 2.0, case=case), _rec("pyllm-cpu", 1.0, case=case),
                            _rec("ext|lib", 4.0, case=case), _train("torch", "fp32", 9.0, model="tiny|x\ny")])
    assert "MLP [gate\\|up] halves (2048 tokens)" in md and "4.00 (ext\\|lib)" in md and "tiny\\|x y" in md
    rows = [line for line in md.splitlines() if line.startswith("|")]
    cells = [len(re.split(r"(?<!\\)\|", line)) for line in rows]
    headers = [n for line, n in zip(rows, cells) if line.startswith("| case") or line.startswith("| model")]
    assert len(headers) == 3 and set(cells) == set(headers)  # each table's rows as wide as its header


@pytest.mark.parametrize("field, first, second", [("torch_threads", 2, 1), ("host_memory", "allocator default", "kept"),
                                                  ("dirty", False, True)])
def test_a_session_is_one_configuration(tmp_path, field, first, second):
    """Re-measuring pyllm-cpu with other settings on the same commit starts a new session: it is not divided
    by the eager number of the first (1.0 / 0.8 = 1.25), and the header says the settings of the one shown."""
    def run(run_id, time, value, *recs):
        return [{**r, "run_id": run_id, "time": time, "machine": {**r["machine"], field: value}} for r in recs]

    md = _render(tmp_path, run("r1", "2026-01-01T00:00:00+00:00", first, _calib(), _rec("torch eager", 1.0),
                               _rec("pyllm-cpu", 0.5))
                 + run("r2", "2026-01-01T01:00:00+00:00", second, _calib(), _rec("pyllm-cpu", 0.8)))
    assert "1.25" not in md and "| 64x512 | fp32 | fwd | pyllm-cpu | 1.2 GB/s | 10% | - | - | - | - | - |" in md
    assert "- torch x, python 3, 1 threads" in md
    assert ("host memory kept" in md) == (field == "host_memory") and ("uncommitted" in md) == (field == "dirty")
    key = results.session_key({"machine": {**new_machine(), field: second}, "suite": "short"})
    assert results.done_cases(results.read(tmp_path / "cpu.jsonl"), key) == set()  # and --resume trusts none of r1


def test_a_session_of_several_runs_says_each_runs_settings(tmp_path):
    """Records without the newer fields (written before they were recorded) still form one session; a header
    field that differs between its runs, and each run's measured ceilings, are all listed."""
    old = {"commit": "abc", "device_name": "test cpu", "torch": "x", "python": "3", "torch_threads": 1}  # no dirty
    one = [{**r, "machine": {**old, "load_avg_1m": 0.5}} for r in (_calib(), _rec("torch eager", 2.0))]
    two = [{**r, "run_id": "r2", "time": "2026-01-01T01:00:00+00:00", "machine": {**old, "load_avg_1m": 1.5}}
           for r in (_calib(copy_gbps=6.0, matmul_tflops={}), _rec("pyllm-cpu", 1.0))]
    md = _render(tmp_path, one + two)
    assert "| 64x512 | fp32 | fwd | pyllm-cpu | 1.0 GB/s | 10% | - | 2.00 | 2.00 | - | - |" in md
    assert "in 2 runs" in md and "1 threads, load average 0.5 / 1.5 at start\n" in md
    assert "- measured ceilings: copy 5.0 / 6.0 GB/s; matmul fp32 0.100 TFLOP/s" in md


def test_plot_colours_each_provider_alike_in_every_panel_and_draws_no_bar_for_a_missing_value(tmp_path, monkeypatch):
    recs = [_rec("torch.compile", 0.5, mode="fwd+bwd", case="c1"),  # fp32 only, and wrong on c2
            {**_rec("torch.compile", 0.5, mode="fwd+bwd", case="c2"), "status": "wrong", "median_ms": None,
             "gbps": None}]
    for dtype in ("fp32", "bf16"):
        for case in ("c1", "c2"):
            recs += [_rec("torch eager", 1.0, dtype=dtype, mode="fwd+bwd", case=case),  # 1, 2 and 4 GB/s
                     _rec("pyllm-cpu", 0.25, dtype=dtype, mode="fwd+bwd", case=case)]
    figures = []
    monkeypatch.setattr(render.plt, "close", figures.append)
    assert render.plot_op("softmax", recs, tmp_path / "p.png")
    (fig,) = figures
    legend = fig.axes[-1].get_legend()
    colour = {text.get_text(): handle.get_facecolor()
              for text, handle in zip(legend.get_texts(), legend.legend_handles)}
    assert sorted(colour) == ["pyllm-cpu", "torch eager", "torch.compile"]
    by_rate = {1.0: "torch eager", 2.0: "torch.compile", 4.0: "pyllm-cpu"}
    for ax, n in zip(fig.axes, (5, 4)):  # fp32: no bar for torch.compile on c2
        assert len(ax.patches) == n
        assert all(bar.get_facecolor() == colour[by_rate[bar.get_height()]] for bar in ax.patches)


def test_not_timed_names_where_and_the_table_marks_it(tmp_path):
    recs = [_calib(), _rec("torch eager", 2.0), _rec("pyllm-cpu", 1.0), _rec("torch eager", 2.0, case="c2"),
            {**_rec("pyllm-cpu", 1.0, case="c2"), "status": "wrong", "reason": "error 3e-2 over 1e-3"},
            {**_rec("pyllm-triton", 1.0), "status": "skipped", "reason": "needs CUDA"},
            {**_rec("pyllm-triton", 1.0, case="c2"), "status": "skipped", "reason": "needs CUDA"}]
    md = _render(tmp_path, recs)
    assert "| c2 | fp32 | fwd | 2.000 [2.000-2.000] | wrong |" in md
    assert "- pyllm-cpu (wrong) on c2 fp32: error 3e-2 over 1e-3" in md
    assert "- pyllm-triton (skipped): needs CUDA" in md  # everywhere: no list of cases
    md = _render(tmp_path, recs[:3] + [_rec("torch eager", 2.0, mode="bwd"), {**_rec("pyllm-cpu", 1.0, mode="bwd"),
                                                                              "status": "error", "reason": "OOM"}])
    assert "- pyllm-cpu (error) on 64x512 fp32 bwd: OOM" in md


def test_train_step_without_a_baseline_says_dash_and_names_the_model_not_run():
    lines = render.train_section([_train("cpu", "bf16", 5.0), _train("cpu", "bf16", 5.0, model="other"),
                                  {**_train("torch", "fp32", 9.0, model="other"), "status": "skipped",
                                   "reason": "no memory"}])
    table = [line for line in lines if line.startswith("| tiny |")]
    assert table[0].endswith("| 10.0% | - | - | - |") and "nan" not in "\n".join(lines)
    assert "- torch fp32 on other: no memory" in lines


@pytest.mark.parametrize("damage, shown", [
    (lambda recs: recs[2].update(median_ms=0.0, gbps=None), "| 64x512 | fp32 | fwd | pyllm-cpu | - | 10% | - | - |"),
    (lambda recs: recs[2].pop("q25_ms"), "| 1.000 [-] |"),
    (lambda recs: recs[2].update(status="wrong", reason=None), "- pyllm-cpu (wrong): -"),
    (lambda recs: [r["machine"].pop("torch_threads") for r in recs], "- torch x, python 3\n"),
    (lambda recs: recs[0].pop("matmul_tflops"), "copy 5.0 GB/s; matmul -"),
])
def test_a_record_missing_a_value_is_rendered_with_a_dash(tmp_path, damage, shown):
    recs = [_calib(), _rec("torch eager", 2.0), _rec("pyllm-cpu", 1.0)]
    damage(recs)
    assert shown in _render(tmp_path, recs)


def test_a_record_without_its_status_is_skipped_with_a_warning_naming_it(tmp_path):
    recs = [_calib(), _rec("torch eager", 2.0), _rec("pyllm-cpu", 1.0)]
    del recs[2]["status"]
    named = r"op record of run r \(softmax, 64x512, fp32, fwd, pyllm-cpu\) has no status"
    with pytest.warns(RuntimeWarning, match=named):
        md = _render(tmp_path, recs)
    assert "pyllm-cpu" not in md and "| 2.000 [2.000-2.000] |" in md

import json

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

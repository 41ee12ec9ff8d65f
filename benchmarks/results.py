"""The results store: JSON lines appended under ``benchmarks/results/``, never rewritten.

Every line is self-contained: the measurement plus the machine it ran on (device, driver, commit,
versions), the run it belongs to and when. ``cpu.jsonl`` and ``gpu.jsonl`` are the committed logs; a
run's lines share a ``run_id``, and runs of the same commit, device and suite form one "session" that
the renderer tabulates together (a GPU sweep is run in pieces under 10 minutes each).
"""

from __future__ import annotations

import datetime
import json
import uuid
from pathlib import Path

from pyllm.data.jsonl import read_json_lines

SCHEMA = "pyllm-bench-v1"
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def default_path(device: str) -> Path:
    return RESULTS_DIR / ("gpu.jsonl" if device == "cuda" else "cpu.jsonl")


def session_key(record: dict) -> tuple:
    """Records with the same key were measured on the same code, device and suite."""
    m = record.get("machine", {})
    return (m.get("commit"), m.get("device_name"), record.get("suite"))


class ResultLog:
    """Appends records of one run to a JSON-lines file, flushing each so an interrupted run keeps them."""

    def __init__(self, path: str | Path, machine: dict):
        self.path = Path(path)
        self.machine = machine
        self.run_id = f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
        self.records: list[dict] = []

    def append(self, record: dict) -> dict:
        full = {"schema": SCHEMA, "run_id": self.run_id,
                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine": self.machine, **record}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(full, sort_keys=True) + "\n")
        self.records.append(full)
        return full


def read(path: str | Path) -> list[dict]:
    """All records of a results file; a malformed line is an error naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for i, rec in read_json_lines(path):
        if rec.get("schema") != SCHEMA:
            raise ValueError(f"{path}:{i}: field 'schema' is {rec.get('schema')!r}, expected {SCHEMA!r}")
        records.append(rec)
    return records


def done_cases(records: list[dict], key: tuple) -> set[tuple[str, str, str]]:
    """(op, case, dtype) completely measured in session ``key``: what a resumed run skips."""
    return {(r["op"], r["case"], r["dtype"]) for r in records
            if r.get("kind") in ("case_done", "train_step") and session_key(r) == key}

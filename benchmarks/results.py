"""The results store: JSON lines appended under ``benchmarks/results/``, never rewritten.

Every line is self-contained: the measurement plus the machine it ran on (device, driver, commit,
versions), the run it belongs to and when. ``cpu.jsonl`` and ``gpu.jsonl`` are the committed logs; a
run's lines share a ``run_id``, and runs of one configuration (``session_key``: commit, device, suite and
the settings that change timings) form one "session" that the renderer tabulates together (a GPU sweep is
run in pieces under 10 minutes each).
"""

from __future__ import annotations

import datetime
import json
import uuid
import warnings
from pathlib import Path

from pyllm.data.jsonl import split_lines

SCHEMA = "pyllm-bench-v1"
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def default_path(device: str) -> Path:
    return RESULTS_DIR / ("gpu.jsonl" if device == "cuda" else "cpu.jsonl")


def session_key(record: dict) -> tuple:
    """Records with the same key were measured in one configuration, so their numbers may be divided by one
    another: the same commit, device and suite, torch threads, host-memory setting and uncommitted changes or
    none (``dirty`` does not say which changes). A field that older records lack is None in all of them, so
    they still group by commit, device and suite."""
    m = record.get("machine") or {}
    return (m.get("commit"), m.get("device_name"), record.get("suite"),
            m.get("torch_threads"), m.get("host_memory"), m.get("dirty"))


class ResultLog:
    """Appends records of one run to a JSON-lines file, flushing each so an interrupted run keeps them."""

    def __init__(self, path: str | Path, machine: dict):
        self.path = Path(path)
        self.machine = machine
        self.run_id = f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
        self.records: list[dict] = []

    def check(self) -> None:
        """Raise a ValueError naming the path now if records cannot be appended to it, not a traceback later."""
        try:
            if self.path.is_dir():
                raise ValueError(f"{self.path}: is a directory, not a results file")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a"):
                pass
        except OSError as e:
            under = next((p for p in self.path.parents if p.is_file()), None)  # mkdir says only "File exists"
            why = f"{under} is a file, not a directory" if under else e.strerror or e
            raise ValueError(f"{self.path}: cannot write results ({why})") from None

    def append(self, record: dict) -> dict:
        full = {"schema": SCHEMA, "run_id": self.run_id,
                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine": self.machine, **record}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as f:
            # a killed run can leave a last line cut short: end it, so it stays one bad line and this
            # record is not glued onto it
            if f.tell() and not self._ends_with_newline():
                f.write(b"\n")
            f.write((json.dumps(full, sort_keys=True) + "\n").encode())
        self.records.append(full)
        return full

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as f:
            f.seek(-1, 2)
            return f.read(1) in (b"\n", b"\r")


def read(path: str | Path) -> list[dict]:
    """All records of a results file. A line that is not JSON is skipped with a warning naming file and line:
    a run killed mid-write leaves one, and the next run's records follow it on their own lines (append), so
    one cut record must not make the whole file unreadable. A record of another schema is an error."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with open(path, "rb") as f:
        for n, (_, raw) in enumerate(split_lines(f), 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except ValueError as e:  # (json's decode errors and UnicodeDecodeError both)
                warnings.warn(f"{path}:{n}: not a JSON record ({e}); skipped (cut short by an interrupted run?)",
                              RuntimeWarning, stacklevel=2)
                continue
            if not isinstance(rec, dict) or rec.get("schema") != SCHEMA:
                got = rec.get("schema") if isinstance(rec, dict) else type(rec).__name__
                raise ValueError(f"{path}:{n}: field 'schema' is {got!r}, expected {SCHEMA!r}")
            records.append(rec)
    return records


def done_cases(records: list[dict], key: tuple,
               selections: dict[str, dict[str, list[str]]] | None = None) -> set[tuple[str, str, str]]:
    """(op, case, dtype) completely measured in session ``key``: what a resumed run skips.

    ``selections`` maps an op to the providers and modes this run selects (RunOptions.selection); a case_done
    record counts only if the selection it carries covers that. One without the field (written before it was
    recorded) covers nothing: re-measuring a case costs a little time, skipping one that a --providers or
    --modes subset left unmeasured loses it without a word."""
    selections = selections or {}

    def covers(r: dict) -> bool:
        want = selections.get(r["op"])
        if r.get("kind") == "train_step" or want is None:  # a train_step record is the measurement itself
            return True
        had = r.get("selection")
        return had is not None and all(set(want[k]) <= set(had.get(k, ())) for k in want)

    return {(r["op"], r["case"], r["dtype"]) for r in records
            if r.get("kind") in ("case_done", "train_step") and session_key(r) == key and covers(r)}

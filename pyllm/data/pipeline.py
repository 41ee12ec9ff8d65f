"""The data pipeline: ``run(DataConfig) -> DataResult``.

Three cached stages, each keyed by a hash of what determines its output, under ``out_dir``::

    curated/documents.jsonl   sources -> clean -> quality rules -> classifier -> PII -> exact/near dedup
    tokenizer/tokenizer.json  byte-level BPE trained on the curated text
    shards/                   token shards + index + manifest (pyllm.data.shards), resumable per shard
    report/report.md          counts, drop reasons, plots (pyllm.data.report)

Per-document work (cleaning, rules, classifier, PII, hashing and MinHash) runs in parallel through
``ordered_map``; deduplication needs to see documents in order and runs in the main process on the
workers' hashes and signatures. Everything streams: documents are read, processed and written one
batch at a time; only the dedup index (a few hundred bytes per kept document) grows with the corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from pyllm.typecheck import check_fields

from .bpe import TokenizerConfig, train_bpe
from .classifier import ClassifierConfig, QualityClassifier, train_classifier
from .clean import CleanConfig, clean_document
from .dedup import DedupConfig, Deduplicator, MinHasher, content_hash
from .document import Document
from .filters import QualityConfig, quality_check
from .jsonl import read_json_lines
from .parallel import ordered_map
from .pii import PIIConfig, PIIRedactor
from .shards import ShardConfig, write_atomic, pack_shards
from .sources import IssueLog, iter_documents, list_files
from .stdlib import iter_stdlib_documents

LENGTH_BINS = np.logspace(0, 8, 49)  # document length histogram edges in characters (1 .. 1e8)
_RUNTIME_FIELDS = ("out_dir", "workers", "engine", "ray_address", "progress", "report")


@dataclass
class DataConfig:
    inputs: list[str] = field(default_factory=list)
    """Files and folders to read; empty = the built-in corpus (this interpreter's standard library)."""
    out_dir: str = "runs/data"
    """Where curated text, tokenizer, shards and report go."""
    text_field: str = "text"
    """Field holding the text in JSONL records and Parquet columns."""
    include_stdlib_tests: bool = False
    """Built-in corpus only: also read the standard library's test suites (~20 MB more)."""
    max_documents: int | None = None
    """Read at most this many documents (None = all); for quick runs."""
    workers: int = 0
    """Worker processes (0 = every core). The output never depends on it."""
    engine: str = "local"
    """"local" (multiprocessing) or "ray" (Ray tasks; same stages, same output)."""
    ray_address: str | None = None
    """Ray cluster to join (None with engine="ray" starts a local one)."""
    progress: bool = True
    """Show tqdm progress bars."""
    report: bool = True
    """Write report/report.md with plots."""
    clean: CleanConfig = field(default_factory=CleanConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)

    def __post_init__(self):
        if isinstance(self.inputs, (str, os.PathLike)):  # iterating it would read one path per character
            raise ValueError(f"DataConfig: inputs={self.inputs!r} must be a list of paths: "
                             f"inputs=[{os.fspath(self.inputs)!r}]")
        if isinstance(self.inputs, (list, tuple)):
            self.inputs = [os.fspath(p) if isinstance(p, os.PathLike) else p for p in self.inputs]
        if isinstance(self.out_dir, os.PathLike):
            self.out_dir = os.fspath(self.out_dir)
        check_fields(self)
        for name, section in _SECTIONS.items():
            if not isinstance(getattr(self, name), section):
                raise ValueError(f"DataConfig: {name}={getattr(self, name)!r} must be a {section.__name__} "
                                 f"(DataConfig.from_dict takes sections as dicts)")
        if self.workers < 0:
            raise ValueError(f"workers={self.workers}: use 0 (all cores) or a positive count")
        if self.engine not in ("local", "ray"):
            raise ValueError(f"engine={self.engine!r}: use 'local' or 'ray'")
        if self.max_documents is not None and self.max_documents < 1:
            raise ValueError(f"max_documents={self.max_documents}: use a positive count or None")
        if not self.text_field:
            raise ValueError("text_field must be a non-empty field name")

    @property
    def num_workers(self) -> int:
        return self.workers or os.cpu_count() or 1

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        """Build from a (JSON) dict; nested sections are dicts of their own config's fields."""
        if not isinstance(d, dict):
            raise ValueError(f"a DataConfig must be a JSON object of its fields, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            hints = [f"{k!r} is a field of section {s!r}: {{{s!r}: {{{k!r}: ...}}}}" for k in unknown
                     for s, section in _SECTIONS.items() if k in {f.name for f in fields(section)}]
            raise ValueError(f"DataConfig has no field(s) {unknown}" + (f"; {'; '.join(hints)}" if hints else ""))
        kwargs = {}
        for k, v in d.items():
            if k in _SECTIONS:
                section = _SECTIONS[k]
                if not isinstance(v, dict):
                    raise ValueError(f"DataConfig section {k!r} must be a JSON object of {section.__name__} fields")
                bad = set(v) - {f.name for f in fields(section)}
                if bad:
                    raise ValueError(f"{k} has no field(s) {sorted(bad)}")
                v = section(**v)
            kwargs[k] = v
        return cls(**kwargs)

    def output_config(self) -> dict:
        """Everything that determines the output (not where it goes or how many workers make it)."""
        d = asdict(self)
        for k in _RUNTIME_FIELDS:
            d.pop(k)
        d["shards"].pop("batch_documents")
        return d


_SECTIONS = {"clean": CleanConfig, "quality": QualityConfig, "classifier": ClassifierConfig,
             "dedup": DedupConfig, "pii": PIIConfig, "tokenizer": TokenizerConfig, "shards": ShardConfig}


@dataclass
class DataResult:
    shard_dir: Path
    """Token shards + manifest.json + tokenizer.json (give it to ShardLoader or `pyllm train`)."""
    tokenizer_dir: Path
    """The trained tokenizer (load with pyllm.tokenizer.load_tokenizer)."""
    curated_file: Path
    """The curated documents as JSONL ({"id", "source", "text"})."""
    report: Path | None
    """report.md, when the report is on."""
    stats: dict
    """Counts per stage, drop reasons, PII, issues, throughput."""


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _input_fingerprint(cfg: DataConfig) -> list:
    """What identifies the input data: file names, sizes and mtimes, or the interpreter for stdlib."""
    if not cfg.inputs:
        return ["stdlib", sys.version, str(Path(os.__file__).parent), cfg.include_stdlib_tests]
    fingerprint = []
    for p in list_files(cfg.inputs):
        try:
            st = p.stat()
            fingerprint.append((str(p), st.st_size, st.st_mtime_ns))
        except OSError:  # a broken link or a vanished file: curation logs it as unreadable
            fingerprint.append((str(p), None, None))
    return fingerprint


# ---- stage 1: curation (per-document work runs in workers) --------------------------------------------

_WORKER: dict = {}


def _init_curate(cfg: DataConfig, classifier: QualityClassifier | None) -> None:
    _WORKER.update(cfg=cfg, classifier=classifier, minhasher=MinHasher(cfg.dedup) if cfg.dedup.near else None)


def _curate_batch(docs: list[Document]) -> list[dict]:
    """Per-document outcome: kept text (or the stage and reason of the drop) + what dedup needs."""
    cfg, classifier, minhasher = _WORKER["cfg"], _WORKER["classifier"], _WORKER["minhasher"]
    out = []
    for doc in docs:
        rec = {"id": doc.id, "source": doc.source, "chars_in": len(doc.text),
               "bytes_in": len(doc.text.encode("utf-8", "surrogatepass"))}
        cleaned, reason, rec["changes"] = clean_document(doc, cfg.clean)
        if cleaned is None:
            out.append({**rec, "stage": "clean", "reason": reason})
            continue
        reason = quality_check(cleaned.text, cfg.quality)
        if reason:
            out.append({**rec, "stage": "quality", "reason": reason})
            continue
        if classifier is not None:
            rec["score"] = classifier.score(cleaned.text)
            if rec["score"] < cfg.classifier.threshold:
                out.append({**rec, "stage": "classifier", "reason": "low_quality_score"})
                continue
        redactor = PIIRedactor(cfg.pii)
        text = redactor.redact(cleaned.text)
        rec.update(text=text, pii=dict(redactor.counts),
                   digest=content_hash(text) if cfg.dedup.exact else None,
                   signature=minhasher(text) if minhasher is not None else None)
        out.append(rec)
    return out


def _batched(docs, size: int):
    batch = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _source_documents(cfg: DataConfig, issues: IssueLog):
    docs = (iter_documents(cfg.inputs, cfg.text_field, issues) if cfg.inputs
            else iter_stdlib_documents(include_tests=cfg.include_stdlib_tests))
    for i, doc in enumerate(docs):
        if cfg.max_documents is not None and i >= cfg.max_documents:
            return
        yield doc


class _Histogram:
    """Fixed log-spaced bins: bounded memory whatever the corpus size."""

    def __init__(self):
        self.counts = np.zeros(len(LENGTH_BINS) - 1, dtype=np.int64)

    def add(self, n: int) -> None:
        i = int(np.searchsorted(LENGTH_BINS, max(n, 1), side="right") - 1)
        self.counts[min(max(i, 0), len(self.counts) - 1)] += 1


def curate(cfg: DataConfig, out_file: Path) -> dict:
    """Stage 1: stream documents through every filter into ``out_file`` (JSONL); returns the stats."""
    from tqdm.auto import tqdm

    issues = IssueLog()
    classifier, classifier_metrics = None, {}
    if cfg.classifier.enabled:
        classifier, classifier_metrics = train_classifier(cfg.classifier)
    dedup = Deduplicator(cfg.dedup)
    dropped: dict[str, Counter] = {s: Counter() for s in ("clean", "quality", "classifier", "dedup")}
    changes, pii = Counter(), Counter()
    hist_in, hist_out, scores = _Histogram(), _Histogram(), np.zeros(20, dtype=np.int64)
    n_in = n_out = bytes_in = bytes_out = 0
    start = time.perf_counter()
    tmp = out_file.with_name(out_file.name + ".tmp")
    bar = tqdm(desc="curate", unit="doc", disable=not cfg.progress, dynamic_ncols=True)
    with open(tmp, "w", encoding="utf-8") as f:
        for outcomes in ordered_map(_curate_batch, _batched(_source_documents(cfg, issues), 16),
                                    workers=cfg.num_workers, engine=cfg.engine, ray_address=cfg.ray_address,
                                    initializer=_init_curate, initargs=(cfg, classifier)):
            for rec in outcomes:
                n_in += 1
                bytes_in += rec["bytes_in"]
                hist_in.add(rec["chars_in"])
                changes.update(rec["changes"])
                if "score" in rec:
                    scores[min(int(rec["score"] * 20), 19)] += 1
                if "text" not in rec:
                    dropped[rec["stage"]][rec["reason"]] += 1
                    continue
                reason = dedup.check(rec["digest"], rec["signature"])
                if reason:
                    dropped["dedup"][reason] += 1
                    continue
                pii.update(rec["pii"])
                line = json.dumps({"id": rec["id"], "source": rec["source"], "text": rec["text"]}, ensure_ascii=False)
                f.write(line + "\n")
                n_out += 1
                bytes_out += len(rec["text"].encode("utf-8", "surrogatepass"))
                hist_out.add(len(rec["text"]))
            bar.update(len(outcomes))
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{bytes_in / elapsed / 1e6:.2f} MB/s kept {n_out}")
    bar.close()
    os.replace(tmp, out_file)
    seconds = time.perf_counter() - start
    return {
        "documents_in": n_in, "documents_out": n_out, "bytes_in": bytes_in, "bytes_out": bytes_out,
        "dropped": {stage: dict(sorted(c.items())) for stage, c in dropped.items()},
        "cleaning": dict(sorted(changes.items())), "pii": dict(sorted(pii.items())),
        "issues": issues.to_dict(), "duplicate_cluster_sizes": dedup.cluster_sizes,
        "dedup_threshold": cfg.dedup.threshold, "classifier": classifier_metrics,
        "classifier_score_histogram": scores.tolist(),
        "length_histogram": {"edges": LENGTH_BINS.tolist(), "in": hist_in.counts.tolist(),
                             "out": hist_out.counts.tolist()},
        "seconds": seconds, "docs_per_s": n_in / max(seconds, 1e-9), "mb_per_s": bytes_in / 1e6 / max(seconds, 1e-9),
    }


def iter_curated(path: Path):
    """(id, text) of each curated document, streamed."""
    for _, rec in read_json_lines(path):
        yield rec["id"], rec["text"]


# ---- the whole pipeline -------------------------------------------------------------------------------

def _read_state(path: Path) -> dict | None:
    """A stamp or stats file; None when it is missing or unreadable (e.g. cut short by a kill mid-write)."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _cached(stamp: Path, key: str) -> dict | None:
    """The stage's stamp if it was made with ``key``; None means run the stage."""
    state = _read_state(stamp)
    return state if state is not None and state.get("key") == key else None


def _write_stamp(stamp: Path, state: dict) -> None:
    write_atomic(stamp, json.dumps(state, indent=1).encode())


def run(cfg: DataConfig) -> DataResult:
    """Curate, train the tokenizer, pack shards and write the report; finished stages are reused."""
    from tqdm.auto import tqdm

    out = Path(cfg.out_dir)
    for sub in ("curated", "tokenizer", "shards"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    output_config = cfg.output_config()
    stats: dict = {"config": output_config, "workers": cfg.num_workers, "engine": cfg.engine, "cached": []}

    curate_key = _key([_input_fingerprint(cfg), {k: output_config[k] for k in (
        "inputs", "text_field", "include_stdlib_tests", "max_documents", "clean", "quality", "classifier",
        "dedup", "pii")}])
    curated = out / "curated" / "documents.jsonl"
    stamp = out / "curated" / "stats.json"
    state = _cached(stamp, curate_key)
    if state is None or not curated.exists():
        # unstamped first: a kill while the stage rewrites its output must not leave the old stamp on new data
        stamp.unlink(missing_ok=True)
        curate_stats = curate(cfg, curated)
        _write_stamp(stamp, {"key": curate_key, "stats": curate_stats})
    else:
        curate_stats = state["stats"]
        stats["cached"].append("curate")
    stats["curate"] = curate_stats
    if curate_stats["documents_out"] == 0:
        raise RuntimeError(f"no document survived curation ({curate_stats['documents_in']} read); see the drop "
                           f"counts in {stamp} and loosen the thresholds")

    tok_dir = out / "tokenizer"
    tok_key = _key([curate_key, output_config["tokenizer"]])
    tok_stamp = tok_dir / "stamp.json"
    if _cached(tok_stamp, tok_key) is None or not (tok_dir / "tokenizer.json").exists():
        tok_stamp.unlink(missing_ok=True)
        t0 = time.perf_counter()
        train_bpe((text for _, text in iter_curated(curated)), cfg.tokenizer, tok_dir)
        _write_stamp(tok_stamp, {"key": tok_key, "seconds": time.perf_counter() - t0})
    else:
        stats["cached"].append("tokenizer")

    shard_dir = out / "shards"
    total_bytes = curate_stats["bytes_out"]
    t0 = time.perf_counter()
    # the curate key stands for the curated text: an edited input with an unchanged tokenizer must repack
    pack_config = {**output_config, "curated_key": curate_key}
    with tqdm(desc="pack", unit="tok", unit_scale=True, disable=not cfg.progress, dynamic_ncols=True) as bar:
        manifest, pack_stats = pack_shards(iter_curated(curated), tok_dir, shard_dir, cfg.shards, pack_config,
                                           workers=cfg.num_workers, engine=cfg.engine,
                                           ray_address=cfg.ray_address, progress_bar=bar)
    seconds = time.perf_counter() - t0
    tokens = sum(t["tokens"] for t in manifest["totals"].values())
    stats["pack"] = {**pack_stats, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9),
                     "mb_per_s": total_bytes / 1e6 / max(seconds, 1e-9), "totals": manifest["totals"],
                     "tokens_per_shard": [e["tokens"] for e in manifest["shards"]],
                     "shard_splits": [e["split"] for e in manifest["shards"]],
                     "bytes_per_token": total_bytes / max(tokens, 1)}
    previous = out / "stats.json"
    if pack_stats["reused"]:
        stats["cached"].append("pack")
        # the throughput of the run that made the shards, not of the check
        stats["pack"] = (_read_state(previous) or {}).get("pack", stats["pack"])
    write_atomic(previous, json.dumps(stats, indent=1).encode())
    report_path = None
    if cfg.report:
        from .report import write_report

        report_path = write_report(stats, out / "report")
    return DataResult(shard_dir=shard_dir, tokenizer_dir=tok_dir, curated_file=curated, report=report_path,
                      stats=stats)

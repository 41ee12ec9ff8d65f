"""The whole pipeline on a small messy corpus: every stage counted, worker-invariant, cached, CLI."""

import gzip
import json
import random

import numpy as np
import pytest

from pyllm.data import DataConfig, run
from pyllm.data.bpe import TokenizerConfig
from pyllm.data.classifier import ClassifierConfig, garble
from pyllm.data.dedup import DedupConfig, Deduplicator, MinHasher, content_hash
from pyllm.data.cli import main as cli_main
from pyllm.data.shards import ShardConfig
from pyllm.data.stdlib import iter_stdlib_documents


def _paragraphs():
    """Long pydoc-topic paragraphs, without the (near-)duplicates the topics themselves contain, so that
    the planted ones are the only duplicates."""
    cfg = DedupConfig()
    hasher, dedup = MinHasher(cfg), Deduplicator(cfg)
    paras = [p for d in iter_stdlib_documents(sources=False) for p in d.text.split("\n\n") if len(p.split()) >= 60]
    return [p for p in paras if dedup.check(content_hash(p), hasher(p)) is None]


SPAM = ("buy cheap pills now click here free offer limited time casino bonus win prize subscribe deal discount "
        "crypto investment guaranteed money fast cookies accept exclusive members winner").split()


def _spam(rng):
    return " ".join(f"{rng.choice(['Click', 'Buy', 'Get', 'Win'])} the {rng.choice(SPAM)} {rng.choice(SPAM)} and "
                    f"{rng.choice(SPAM)} with {rng.choice(SPAM)} to have {rng.choice(SPAM)} of {rng.choice(SPAM)}!"
                    for _ in range(12))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of JSONL, text and gzip files with planted duplicates, PII, garbage and corrupt input."""
    root = tmp_path_factory.mktemp("corpus")
    paras = _paragraphs()
    rng = random.Random(0)
    docs = paras[:120]
    planted_exact = docs[5]
    words = docs[9].split()
    words[10] = "CHANGED"
    planted_near = " ".join(words)
    pii_doc = paras[141] + "\nWrite to jane.doe@acme-corp.com or call (415) 555-0132; version 3.11.7, 2024-01-31."
    lines = [json.dumps({"text": t}) for t in docs[:60]]
    lines.insert(7, "{broken json")
    (root / "a.jsonl").write_text("\n".join(lines) + "\n")
    (root / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in
                                          docs[60:] + [planted_exact, planted_near, pii_doc]))
    # web spam: varied sentences with stop words, so it passes the heuristic rules and only the trained
    # classifier can catch it
    (root / "c_spam.jsonl").write_text("".join(json.dumps({"text": _spam(rng)}) + "\n" for _ in range(6)))
    (root / "d_bad_utf8.txt").write_bytes(paras[140].encode().replace(b" ", b" \xff", 1) + b" extra words here")
    blob = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in paras[130:140]).encode())
    (root / "e_cut.jsonl.gz").write_bytes(blob[:-20])
    (root / "f_empty.txt").write_text("")
    labels = root.parent / "labels.jsonl"
    good = [p for d in iter_stdlib_documents(sources=False) for p in d.text.split("\n\n") if len(p.split()) >= 20]
    bad = [garble(t, rng) for t in good[::2]] + [_spam(rng) for _ in range(len(good) // 2)]
    labels.write_text("".join(json.dumps({"text": t, "label": 1}) + "\n" for t in good)
                      + "".join(json.dumps({"text": t, "label": 0}) + "\n" for t in bad))
    return root, labels


def _config(corpus, out, workers, **kw):
    root, labels = corpus
    return DataConfig(inputs=[str(root)], out_dir=str(out), workers=workers, progress=False,
                      classifier=ClassifierConfig(train_file=str(labels), threshold=0.3, epochs=10),
                      tokenizer=TokenizerConfig(vocab_size=400),
                      shards=ShardConfig(shard_tokens=30_000, val_fraction=0.05), **kw)


@pytest.fixture(scope="module")
def result(corpus, tmp_path_factory):
    return run(_config(corpus, tmp_path_factory.mktemp("run1"), workers=1))


def test_every_stage_counted(result):
    cur = result.stats["curate"]
    issues = cur["issues"]["counts"]
    assert issues["malformed_json"] == 1 and issues["invalid_utf8"] == 1
    assert issues["truncated_or_corrupt_gzip"] == 1 and issues["empty_file"] == 1
    where = {(e["kind"], e["file"].rsplit("/", 1)[-1], e["line"]) for e in cur["issues"]["examples"]}
    assert ("malformed_json", "a.jsonl", 8) in where
    assert cur["dropped"]["dedup"] == {"exact_duplicate": 1, "near_duplicate": 1}
    assert cur["dropped"]["classifier"] == {"low_quality_score": 6}  # the 6 planted spam pages
    assert cur["pii"] == {"EMAIL": 1, "PHONE": 1}
    assert cur["cleaning"]["invalid_bytes_repaired"] == 1
    dropped = sum(sum(c.values()) for c in cur["dropped"].values())
    assert cur["documents_in"] == cur["documents_out"] + dropped
    curated = [json.loads(line)["text"] for line in result.curated_file.open()]
    assert len(curated) == cur["documents_out"]
    redacted = [t for t in curated if "<EMAIL>" in t]
    assert len(redacted) == 1 and "<PHONE>" in redacted[0] and "3.11.7, 2024-01-31" in redacted[0]
    assert cur["docs_per_s"] > 0 and cur["mb_per_s"] > 0


def test_report_written(result):
    report = result.report.read_text()
    for section in ("Throughput", "Dropped, by stage and rule", "PII redactions", "Input issues", "Shards"):
        assert section in report
    assert "near_duplicate" in report and "a.jsonl:8" in report
    for png in ("lengths.png", "drops.png", "clusters.png", "pii.png", "shards.png"):
        assert (result.report.parent / png).read_bytes()[:4] == b"\x89PNG"


def test_same_output_with_two_workers_and_cached_rerun(result, corpus, tmp_path):
    two = run(_config(corpus, tmp_path, workers=2, report=False))
    assert two.curated_file.read_bytes() == result.curated_file.read_bytes()
    names = sorted(p.name for p in result.shard_dir.iterdir())
    assert names == sorted(p.name for p in two.shard_dir.iterdir())
    for name in names:
        assert (two.shard_dir / name).read_bytes() == (result.shard_dir / name).read_bytes(), name
    again = run(_config(corpus, tmp_path, workers=1, report=False))
    assert again.stats["cached"] == ["curate", "tokenizer", "pack"]
    assert again.stats["pack"]["seconds"] == two.stats["pack"]["seconds"]  # the figures of the run that packed


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli_main([str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing" in err and "does not exist" in err
    with pytest.raises(ValueError, match="vocab_size"):
        DataConfig(tokenizer=TokenizerConfig(vocab_size=10))
    with pytest.raises(ValueError, match="no field"):
        DataConfig.from_dict({"dedup": {"bandz": 4}})
    # a --config file: every problem is one line naming the file and the field
    cfg = tmp_path / "data.json"
    cases = [('{"tokenizer": {"vocab_size": 300,}}',
              "not valid JSON (line 1: Expecting property name enclosed in double quotes)"),
             ('{"vocab_size": 300}', "DataConfig has no field(s) ['vocab_size']; 'vocab_size' is a field of section "
                                     "'tokenizer': {'tokenizer': {'vocab_size': ...}}"),
             ('{"tokenizer": {"vocab_size": "big"}}', "tokenizer: vocab_size='big' must be an integer"),
             ('{"pii": {"types": ["EMAIL", 3]}}', "pii: types=['EMAIL', 3] must be a list of strings"),
             ('{"quality": {"min_words": 2.5}}', "quality: min_words=2.5 must be an integer"),
             ('{"workers": true}', "DataConfig: workers=True must be an integer"),
             ('{"inputs": "corpus/"}', "DataConfig: inputs='corpus/' must be a list of paths: inputs=['corpus/']"),
             ('{"shards": 5}', "DataConfig section 'shards' must be a JSON object of ShardConfig fields"),
             ('[1]', "a DataConfig must be a JSON object of its fields, got list")]
    for text, message in cases:
        cfg.write_text(text)
        assert cli_main(["--config", str(cfg), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
        assert capsys.readouterr().err == f"pyllm data: {cfg}: {message}\n", text
    assert cli_main(["--config", str(tmp_path / "none.json"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"pyllm data: {tmp_path / 'none.json'}: config file not found\n"
    # JSON's string keys and lists stand for the int keys and tuples of the dataclasses
    ok = DataConfig.from_dict({"quality": {"max_top_ngram_char_fraction": {"2": 0.1}}, "pii": {"types": ["EMAIL"]}})
    assert ok.quality.max_top_ngram_char_fraction == {2: 0.1} and tuple(ok.pii.types) == ("EMAIL",)


def test_cli_builtin_corpus_small(tmp_path, capsys):
    rc = cli_main(["--out", str(tmp_path), "--max-documents", "40", "--vocab-size", "300", "--workers", "1",
                   "--no-classifier", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "read 40 documents" in out and (tmp_path / "shards" / "manifest.json").exists()


@pytest.mark.slow
def test_ray_engine_gives_byte_identical_shards(result, corpus, tmp_path):
    """The same pipeline on a local Ray cluster (2 CPUs): identical curated text and shards."""
    ray = pytest.importorskip("ray")
    try:
        on_ray = run(_config(corpus, tmp_path, workers=2, engine="ray", report=False))
    finally:
        ray.shutdown()
    assert on_ray.curated_file.read_bytes() == result.curated_file.read_bytes()
    names = sorted(p.name for p in result.shard_dir.iterdir())
    assert names == sorted(p.name for p in on_ray.shard_dir.iterdir())
    for name in names:
        assert (on_ray.shard_dir / name).read_bytes() == (result.shard_dir / name).read_bytes(), name


WORDS = "the of and to that have with be river mountain people science history music water city light garden".split()


def _prose(seed):
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(80)) + "."


def _small_config(inputs, out, **kw):
    # vocab 261 = bytes + specials, no merges: the tokenizer comes out identical whatever the text
    return DataConfig(inputs=[str(inputs)], out_dir=str(out), workers=1, progress=False, report=False,
                      classifier=ClassifierConfig(enabled=False), tokenizer=TokenizerConfig(vocab_size=261),
                      shards=ShardConfig(val_fraction=0.0), **kw)


def _shard_texts(shard_dir):
    from pyllm.data.shards import read_manifest
    from pyllm.tokenizer import load_tokenizer

    manifest, tok = read_manifest(shard_dir), load_tokenizer(shard_dir)
    texts = []
    for e in manifest["shards"]:
        ids = np.fromfile(shard_dir / e["file"], dtype=manifest["dtype"]).tolist()
        texts += tok.decode(ids).split("<|endoftext|>")[:-1]
    return texts


def test_edited_input_repacks_shards(tmp_path):
    (tmp_path / "in").mkdir()
    doc = tmp_path / "in" / "a.txt"
    doc.write_text(_prose(1))
    cfg = _small_config(tmp_path / "in", tmp_path / "out")
    run(cfg)
    doc.write_text(_prose(2))  # same tokenizer, same config: only the curated text says the shards are stale
    again = run(cfg)
    assert again.stats["cached"] == []
    assert _shard_texts(again.shard_dir) == [json.loads(line)["text"] for line in again.curated_file.open()]


def test_unreadable_stamp_reruns_its_stage(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(_prose(1))
    cfg = _small_config(tmp_path / "in", tmp_path / "out")
    run(cfg)
    # as a kill or a full disk leaves them: the stages are redone, not a bare JSON error
    (tmp_path / "out" / "curated" / "stats.json").write_text("")
    (tmp_path / "out" / "tokenizer" / "stamp.json").write_text('{"key": "')
    assert run(cfg).stats["cached"] == ["pack"]
    assert run(cfg).stats["cached"] == ["curate", "tokenizer", "pack"]


def test_stamp_is_invalidated_before_its_stage_rewrites_the_output(tmp_path, monkeypatch):
    from pyllm.data import pipeline

    (tmp_path / "in").mkdir()
    for i in range(3):
        (tmp_path / "in" / f"d{i}.txt").write_text(_prose(i))
    cfg = _small_config(tmp_path / "in", tmp_path / "out")
    assert run(cfg).stats["curate"]["documents_out"] == 3
    real_curate = pipeline.curate

    def killed_after_curate(*args):  # a kill after documents.jsonl was replaced, before the new stamp
        real_curate(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "curate", killed_after_curate)
    with pytest.raises(KeyboardInterrupt):
        run(_small_config(tmp_path / "in", tmp_path / "out", max_documents=1))
    monkeypatch.setattr(pipeline, "curate", real_curate)
    again = run(cfg)  # the first config again: its old stamp must not vouch for the one-document file
    assert "curate" not in again.stats["cached"] and len(again.curated_file.read_text().splitlines()) == 3


def test_bad_out_dir_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "a.txt").write_text(_prose(1))
    (tmp_path / "file").write_text("x")
    (tmp_path / "clash").mkdir()
    (tmp_path / "clash" / "curated").write_text("x")
    for out in (tmp_path / "file", tmp_path / "clash"):
        assert cli_main([str(tmp_path / "a.txt"), "--out", str(out), "--no-progress", "--no-classifier"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"pyllm data: {out}") and err.count("\n") == 1, err


def test_broken_symlink_in_an_input_folder_does_not_stop_the_run(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(_prose(1))
    (tmp_path / "in" / "broken.txt").symlink_to(tmp_path / "gone.txt")
    result = run(_small_config(tmp_path / "in", tmp_path / "out"))
    assert result.stats["curate"]["documents_out"] == 1
    assert result.stats["curate"]["issues"]["counts"] == {"read_error": 1}

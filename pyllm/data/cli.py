"""``pyllm data``: curate text, train a BPE tokenizer and pack token shards.

With no arguments it runs the built-in default: this interpreter's standard library, into runs/data.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyllm data", description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="*", help="files or folders (text, .jsonl, .parquet, .html, .warc, .gz); "
                                             "none = the built-in standard-library corpus")
    p.add_argument("--out", default=None, help="output directory (default runs/data)")
    p.add_argument("--config", help="JSON file with DataConfig fields (flags below override it)")
    p.add_argument("--text-field", help="JSONL/Parquet field holding the text (default 'text')")
    p.add_argument("--max-documents", type=int, help="read at most this many documents")
    p.add_argument("--workers", type=int, help="worker processes (default: all cores)")
    p.add_argument("--engine", choices=["local", "ray"], help="local multiprocessing or Ray")
    p.add_argument("--ray-address", help="Ray cluster address (default: start a local one)")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size (default 8192)")
    p.add_argument("--shard-tokens", type=int, help="tokens per shard (default 524,288)")
    p.add_argument("--val-fraction", type=float, help="fraction of documents held out (default 0.02)")
    p.add_argument("--no-classifier", action="store_true", help="skip the trained quality classifier")
    p.add_argument("--classifier-train", help="JSONL of labelled examples {text, label 0|1}")
    p.add_argument("--no-near-dedup", action="store_true", help="skip MinHash near-duplicate removal")
    p.add_argument("--no-pii", action="store_true", help="skip PII redaction")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace):
    from .pipeline import DataConfig

    cfg = DataConfig()
    if args.config:
        try:
            raw = json.loads(Path(args.config).read_text(encoding="utf-8"))
            cfg = DataConfig.from_dict(raw)
        except FileNotFoundError:
            raise ValueError(f"{args.config}: config file not found") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{args.config}: not valid JSON (line {e.lineno}: {e.msg})") from None
        except (ValueError, TypeError) as e:  # a field DataConfig refuses (UnicodeDecodeError too)
            raise ValueError(f"{args.config}: {e}") from None
    top = {"inputs": args.inputs or None, "out_dir": args.out, "text_field": args.text_field,
           "max_documents": args.max_documents, "workers": args.workers, "engine": args.engine,
           "ray_address": args.ray_address}
    cfg = replace(cfg, **{k: v for k, v in top.items() if v is not None})
    if args.vocab_size is not None:
        cfg.tokenizer = replace(cfg.tokenizer, vocab_size=args.vocab_size)
    if args.shard_tokens is not None or args.val_fraction is not None:
        cfg.shards = replace(cfg.shards, **{k: v for k, v in (("shard_tokens", args.shard_tokens),
                                                               ("val_fraction", args.val_fraction)) if v is not None})
    if args.no_classifier or args.classifier_train:
        cfg.classifier = replace(cfg.classifier, enabled=not args.no_classifier, train_file=args.classifier_train)
    if args.no_near_dedup:
        cfg.dedup = replace(cfg.dedup, near=False)
    if args.no_pii:
        cfg.pii = replace(cfg.pii, enabled=False)
    if args.no_progress:
        cfg.progress = False
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        from .pipeline import run

        result = run(cfg)
    except (ValueError, ImportError, RuntimeError) as e:
        print(f"pyllm data: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. --out is a file or not writable: name the path, not a pathlib traceback
        print(f"pyllm data: {e.filename}: {e.strerror}" if e.filename and e.strerror else f"pyllm data: {e}",
              file=sys.stderr)
        return 2
    cur, pack = result.stats["curate"], result.stats["pack"]
    print(f"read {cur['documents_in']} documents ({cur['bytes_in'] / 1e6:.1f} MB), kept {cur['documents_out']}; "
          f"curate {cur['docs_per_s']:.0f} docs/s {cur['mb_per_s']:.2f} MB/s; "
          f"packed {pack['tokens']} tokens at {pack['tokens_per_s']:.0f} tokens/s")
    print(f"shards: {result.shard_dir}\ntokenizer: {result.tokenizer_dir}\nreport: {result.report}")
    return 0

"""Checkpoints: safetensors files plus a JSON manifest with checksums, written atomically.

Layout under ``<out_dir>/checkpoints``::

    step_00000100/  model.safetensors   the model's state dict (full, unsharded)
                    state.safetensors   optimiser moments, master weights, loss scaler, RNG states, and
                                        the tensors of the batch source's state (``data.<rank>.<path>``,
                                        e.g. an RL rollout buffer)
                    manifest.json       format, step, sha256 + size of each file, JSON state (data
                                        position with {"__tensor__": name} in place of each of its
                                        tensors, Python/NumPy RNG, config, metrics), and the sha256
                                        of all that (its canonical JSON), so the manifest checks itself
    best/           a copy (hard links) of the checkpoint with the best evaluation metric

A checkpoint is written into a temporary directory and renamed into place only when complete, so a
crash never leaves a half-written ``step_*``. On load the manifest is checked against its own hash
and its structure, every file against the manifest; a truncated or corrupted checkpoint is named in
a warning and the previous valid one is used. Tensors in the batch source's state are checksummed
with state.safetensors like every other tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT = "pyllm-checkpoint-v2"
LEGACY_FORMAT = "pyllm-checkpoint-v1"  # no manifest hash: still read, with the structural checks only
MANIFEST = "manifest.json"
FILES = ("model.safetensors", "state.safetensors")
MANIFEST_KEYS = {"format", "step", "files", "meta"}  # v2 adds "sha256"
META_KEYS = ("data", "best", "rng_python", "rng_numpy")  # what resume reads beyond "config" and "run"
TENSOR_REF = "__tensor__"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (corrupted, or written for another model)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        pass
    return True


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))


def to_json(obj, tensors: dict[str, torch.Tensor], name: str):
    """JSON-able copy of a state (a batch source's ``state_dict()``): each torch tensor in it moves to
    ``tensors`` (bound for state.safetensors: exact, compact, checksummed) under ``name`` + its path and
    is replaced by {"__tensor__": that key}; NumPy arrays and scalars become lists and numbers."""
    if isinstance(obj, dict):
        return {str(k): to_json(v, tensors, f"{name}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v, tensors, f"{name}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, torch.Tensor):
        if name in tensors:  # e.g. keys "a.b" and "a" -> "b" in one state
            raise ValueError(f"two tensors of a checkpointed state have the path {name!r}; rename one of the keys")
        tensors[name] = obj.detach().cpu()
        return {TENSOR_REF: name}
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def from_json(obj, tensors: dict[str, torch.Tensor], path: Path):
    """The inverse of ``to_json`` given the loaded state.safetensors (lists stay lists)."""
    if isinstance(obj, dict):
        if set(obj) == {TENSOR_REF}:
            if obj[TENSOR_REF] not in tensors:
                raise CheckpointError(f"checkpoint {path}: state.safetensors has no {obj[TENSOR_REF]!r}, which "
                                      f"{MANIFEST} refers to; use another checkpoint or out_dir")
            return tensors[obj[TENSOR_REF]]
        return {k: from_json(v, tensors, path) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_json(v, tensors, path) for v in obj]
    return obj


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointManager:
    def __init__(self, directory: str | Path, keep_last: int):
        self.dir = Path(directory)
        self.keep_last = keep_last

    # ------------------------------------------------------------------------------------- write
    def save(self, step: int, model_tensors: dict[str, torch.Tensor], state_tensors: dict[str, torch.Tensor],
             meta: dict, is_best: bool = False) -> Path:
        """Write checkpoint ``step`` atomically; update ``best``; drop checkpoints beyond keep_last."""
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / step_dir_name(step)
        tmp = self.dir / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _save_tensors(model_tensors, tmp / "model.safetensors")
        _save_tensors(state_tensors, tmp / "state.safetensors")
        files = {}
        for name in FILES:
            _fsync(tmp / name)
            files[name] = {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
        # hashed as read back (tuples become lists, keys strings), which is what verify() will see
        manifest = json.loads(json.dumps({"format": FORMAT, "step": step, "files": files, "meta": meta}))
        manifest["sha256"] = _manifest_hash(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync(tmp / MANIFEST)
        self._replace(tmp, final)
        if is_best:
            self._copy_as_best(final)
        self._prune()
        return final

    def _replace(self, tmp: Path, final: Path) -> None:
        if final.exists():  # re-saving a step: move the old one aside first (rename needs a free name)
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)

    def _copy_as_best(self, src: Path) -> None:
        tmp = self.dir / f".tmp-best-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in src.iterdir():
            os.link(f, tmp / f.name)  # files are never modified in place, so sharing them is safe
        self._replace(tmp, self.dir / "best")

    def _prune(self) -> None:
        for old in self.step_dirs()[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def remove_stale_temps(self) -> None:
        """Tidy what writes interrupted by a crash or kill left: temporary directories (``.tmp-<name>-<pid>``) are
        deleted; a checkpoint moved aside for a re-save (``.old-<name>-<pid>``) is deleted when ``<name>`` was
        written, else put back (it is the only copy). Those of a process that still runs are left alone: they may
        be a write in progress by another trainer."""
        if not self.dir.is_dir():
            return
        for path in sorted(self.dir.glob(".tmp-*")) + sorted(self.dir.glob(".old-*")):
            prefix, _, rest = path.name.partition("-")
            name, _, pid = rest.rpartition("-")
            if not (path.is_dir() and pid.isdigit() and (int(pid) == os.getpid() or not _process_alive(int(pid)))):
                continue
            if prefix == ".old" and not (self.dir / name).exists():
                os.replace(path, self.dir / name)
            else:
                shutil.rmtree(path, ignore_errors=True)

    # -------------------------------------------------------------------------------------- read
    def step_dirs(self) -> list[Path]:
        """Completed checkpoint directories, oldest first."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.is_dir() and p.name.startswith("step_"))

    def latest_valid(self) -> Path | None:
        """The newest checkpoint whose files match its manifest; each bad one is named in a warning."""
        dirs = self.step_dirs()
        for i in range(len(dirs) - 1, -1, -1):
            problem = verify(dirs[i])
            if problem is None:
                return dirs[i]
            fallback = dirs[i - 1].name if i > 0 else "none left: starting from scratch"
            warnings.warn(f"checkpoint {dirs[i]} is corrupted ({problem}); falling back to {fallback}",
                          RuntimeWarning, stacklevel=2)
        return None


def _manifest_hash(body: dict) -> str:
    """sha256 of a manifest's canonical JSON (sorted keys, no spaces), its own "sha256" left out."""
    text = json.dumps({k: v for k, v in body.items() if k != "sha256"}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _read_manifest(path: Path):
    return json.loads((path / MANIFEST).read_bytes().decode("utf-8"))


def verify(path: Path) -> str | None:
    """None if the checkpoint at ``path`` is intact, else what is wrong with it."""
    try:
        manifest = _read_manifest(path)
    except FileNotFoundError:
        return f"{MANIFEST} missing"
    except OSError as e:
        return f"{MANIFEST} unreadable ({e.strerror})"
    except UnicodeDecodeError as e:
        return f"{MANIFEST} is not UTF-8 text (byte {e.start})"
    except json.JSONDecodeError as e:
        return f"{MANIFEST} is not valid JSON ({e.msg})"
    if not isinstance(manifest, dict):
        return f"{MANIFEST} holds a JSON {type(manifest).__name__}, not an object"
    fmt = manifest.get("format")
    expected = MANIFEST_KEYS | {"sha256"} if fmt == FORMAT else MANIFEST_KEYS if fmt == LEGACY_FORMAT else None
    if expected is None:
        return f"{MANIFEST} format {fmt!r} is not {FORMAT!r}"
    if set(manifest) != expected:
        return f"{MANIFEST} has the fields {sorted(manifest)}, expected {sorted(expected)}"
    if fmt == FORMAT and manifest["sha256"] != _manifest_hash(manifest):
        return f"{MANIFEST} does not match its own sha256 (its content was altered)"
    return _check_structure(path, manifest) or _check_files(path, manifest["files"])


def _check_structure(path: Path, manifest: dict) -> str | None:
    """What resume would trip over: the step against the directory name, the fields it reads, the RNG states
    (set on throwaway generators here, so a damaged one is found before anything is loaded)."""
    step = manifest["step"]
    if type(step) is not int or (path.name.startswith("step_") and path.name != step_dir_name(step)):
        return f"{MANIFEST} step {step!r} does not match the directory name {path.name}"
    meta = manifest["meta"]
    if not isinstance(meta, dict) or any(k not in meta for k in META_KEYS):
        return f"{MANIFEST} meta lacks one of the fields {list(META_KEYS)}"
    if not isinstance(meta["data"], list) or not meta["data"]:
        return f"{MANIFEST} meta.data is not a list of data positions"
    if meta["best"] is not None and type(meta["best"]) not in (int, float):
        return f"{MANIFEST} meta.best {meta['best']!r} is not a number"
    try:
        random.Random().setstate(tuple(tuple(x) if isinstance(x, list) else x for x in meta["rng_python"]))
        kind, keys, *rest = meta["rng_numpy"]
        np.random.RandomState().set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    except (TypeError, ValueError, OverflowError) as e:
        return f"{MANIFEST} has an unusable RNG state ({e})"
    return None


def _check_files(path: Path, files) -> str | None:
    if not isinstance(files, dict) or set(files) != set(FILES):
        return f"{MANIFEST} lists the files {sorted(files) if isinstance(files, dict) else files!r}, not {list(FILES)}"
    for name in FILES:
        info, f = files[name], path / name
        if not isinstance(info, dict) or type(info.get("bytes")) is not int or not isinstance(info.get("sha256"), str):
            return f"{MANIFEST} entry of {name} lacks its bytes or sha256"
        if not f.is_file():
            return f"{name} missing"
        if f.stat().st_size != info["bytes"]:
            return f"{name} truncated: {f.stat().st_size} bytes, manifest says {info['bytes']}"
        if _sha256(f) != info["sha256"]:
            return f"{name} checksum mismatch"
    return None


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(model tensors, state tensors, manifest) of a verified checkpoint."""
    return load_file(str(path / "model.safetensors")), load_file(str(path / "state.safetensors")), _read_manifest(path)


def check_shapes(path: Path, saved: dict[str, torch.Tensor], expected: dict[str, tuple]) -> None:
    """One-line CheckpointError if ``saved`` was written for a model of another shape."""
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    if missing or extra:
        raise CheckpointError(f"checkpoint {path} is for a different model: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}; use the same model config or another out_dir")
    for name, shape in expected.items():
        if tuple(saved[name].shape) != tuple(shape):
            raise CheckpointError(f"checkpoint {path} is for a different model shape: {name} is "
                                  f"{tuple(saved[name].shape)} there, {tuple(shape)} here; use the same model "
                                  f"config or another out_dir")

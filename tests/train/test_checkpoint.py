"""Checkpoint manifests: damage of any kind is named in a warning and the previous checkpoint is used."""

from __future__ import annotations

import json
import random
import shutil
import warnings

import pytest

from pyllm.train.checkpoint import LEGACY_FORMAT, MANIFEST, verify
from pyllm.train.checkpoint import step_dir_name

from .helpers import make_trainer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run with checkpoints at steps 2 and 4 (copied per test: the tests damage step 4)."""
    out = tmp_path_factory.mktemp("run")
    make_trainer(out, max_steps=4, ckpt_every=2, keep_last=3).fit()
    return out


@pytest.fixture
def out(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def _edit(path, fn):
    manifest = json.loads(path.read_text())
    fn(manifest)
    path.write_text(json.dumps(manifest, indent=1))


def _flip(path, offset: int, bit: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1 << bit
    path.write_bytes(bytes(raw))


DAMAGE = {
    "not UTF-8": lambda p: _flip(p, 3, 7),
    "a JSON list": lambda p: p.write_text("[]"),
    "'files' renamed": lambda p: p.write_text(p.read_text().replace('"files"', '"fileS"', 1)),
    "no 'bytes'": lambda p: _edit(p, lambda m: m["files"]["model.safetensors"].pop("bytes")),
    "no 'step'": lambda p: _edit(p, lambda m: m.pop("step")),
    "rng_python damaged": lambda p: _edit(p, lambda m: m["meta"].update(rng_python=[1])),
    # well-formed but altered content: only the manifest's own hash tells
    "step altered": lambda p: p.write_text(p.read_text().replace('"step": 4', '"step": 5', 1)),
    "data position altered": lambda p: p.write_text(p.read_text().replace('"sequences": 16', '"sequences": 12', 1)),
    "files emptied": lambda p: _edit(p, lambda m: m.update(files={})),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_manifest_is_named_and_the_previous_checkpoint_used(out, damage):
    DAMAGE[damage](out / "checkpoints" / step_dir_name(4) / MANIFEST)
    t = make_trainer(out, max_steps=4, ckpt_every=2)
    with pytest.warns(RuntimeWarning, match=rf"{step_dir_name(4)} is corrupted \(.+\); falling back to "
                                            rf"{step_dir_name(2)}"):
        assert t.resume().name == step_dir_name(2)
    assert t.step == 2


def test_single_bit_flips_of_the_manifest_are_detected_or_harmless(out):
    """A sample of the single-bit flips of a manifest: each is detected, or leaves its content unchanged
    (a flip in JSON whitespace); none raises, none changes what resume would load."""
    path = out / "checkpoints" / step_dir_name(4) / MANIFEST
    raw = path.read_bytes()
    original = json.loads(raw)
    rng = random.Random(0)
    for _ in range(300):
        offset, bit = rng.randrange(len(raw)), rng.randrange(8)
        _flip(path, offset, bit)
        if verify(path.parent) is None:
            assert json.loads(path.read_bytes()) == original, (offset, bit)
        path.write_bytes(raw)


def test_a_checkpoint_whose_step_differs_from_its_directory_name_is_refused(out):
    ckpts = out / "checkpoints"
    shutil.move(ckpts / step_dir_name(4), ckpts / step_dir_name(6))
    assert "does not match the directory name step_00000006" in verify(ckpts / step_dir_name(6))


def test_a_manifest_written_before_it_had_its_own_hash_is_still_read(out):
    """The previous format (no manifest hash) resumes with the structural checks; damage is still found."""
    newest = out / "checkpoints" / step_dir_name(4)
    _edit(newest / MANIFEST, lambda m: (m.pop("sha256"), m.update(format=LEGACY_FORMAT)))
    t = make_trainer(out, max_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert t.resume() == newest and t.step == 4
    _edit(newest / MANIFEST, lambda m: m["files"].pop("state.safetensors"))
    assert "lists the files ['model.safetensors']" in verify(newest)

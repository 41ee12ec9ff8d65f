"""keep_host_memory: a CPU training step stops page-faulting its activations back in once freed memory is
kept (pyllm/train/host_memory.py). Run in a subprocess: the malloc setting is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from pyllm.train import host_memory

SCRIPT = textwrap.dedent("""
    import json, resource, sys, tempfile
    import torch
    sys.path.insert(0, {tests!r})
    from train.helpers import make_trainer, tiny_model

    def faults_per_step(keep):
        # activations of 1024 tokens x width 256 (1 MiB per float32 tensor): far above glibc's default
        # mmap threshold (128 KiB), so without the setting each is mapped and unmapped every step
        trainer = make_trainer(tempfile.mkdtemp(), model=tiny_model(d_model=256, n_head=4, max_seq_len=128),
                               seq_len=128, batch_size=8, keep_host_memory=keep)
        for _ in range(10):  # the heap grows to the step's working set during the first steps
            trainer.train_step(1e-3)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            trainer.train_step(1e-3)
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10

    torch.set_num_threads(1)
    default = faults_per_step(False)
    kept = faults_per_step(True)
    print(json.dumps({{"default": default, "kept": kept}}))
""")


@pytest.mark.skipif(not host_memory.glibc(), reason="the setting is glibc's mallopt; nothing to test elsewhere")
def test_kept_host_memory_stops_per_step_page_faults(tmp_path):
    tests_dir = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=tests_dir)], capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "PYLLM_CUDA": "0"})
    assert out.returncode == 0, out.stderr[-2000:]
    faults = json.loads(out.stdout.strip().splitlines()[-1])
    # glibc's default: the step's large buffers are unmapped on free and faulted in again (thousands of
    # faults per step: 4,000-5,000 here); kept: what is left is not the tensors' (a few dozen per step on
    # some machines: Python's own arenas, which it maps itself)
    assert faults["default"] > 1000, faults
    assert faults["kept"] < faults["default"] / 10, faults


def test_keep_freed_memory_is_idempotent():
    first = host_memory.keep_freed_memory()
    assert host_memory.keep_freed_memory() == first == host_memory.glibc()

"""csrc/cuda's kernels executed in CI, on the CPU, by the CUDA emulator (tests/csrc/cuda_emulator).

Each group below is a selection of test_cuda_kernels.py (the GPU tests themselves: same cases, same
three-way tolerance rule) run in a child pytest with PYLLM_CUDA_EMULATOR=1, so the emulated "cuda" backend
exists only in that process. The first six keep every kernel variant (warp and block per row, both vector
widths, every dtype, GEMM and attention tails, GQA, causal and not) at shapes the emulator runs in seconds;
"larger shapes" is every other test of the file but one: the whole file runs here except the tests marked
``gpu_only`` (they skip under the emulator) and the cross-entropy over 70001 rows (beyond the 65535-block
grid dimension; more than 10 minutes emulated, one fiber per CUDA thread), which runs by hand:
``PYLLM_CUDA_EMULATOR=1 pytest tests/csrc/test_cuda_kernels.py -k 70001`` (a plain build; see
``run_emulated`` for the environment of a sanitized one).
Where g++ has AddressSanitizer, the module is built with it and UBSan (CPU tensors are malloc'ed blocks
with redzones, so a read or write outside a tensor stops the run with a report: what compute-sanitizer's
memcheck finds on a GPU). The last tests plant a bug in a kernel (two missing barriers, a cp.async wait one
group too weak, a read past the end of a row) and check that the emulated run fails, so a passing run
means something.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cuda_emulator

HERE = Path(__file__).resolve().parent
# with a GPU the real kernels run (test_cuda_kernels.py, .ci/gpu): emulating them too would spend its time
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: test_cuda_kernels.py runs "
                                "the real kernels")

GROUPS = {
    "norms": "test_norms and (3-7 or 17-127 or 64-768 or 5-1023) or test_empty_rows_or_width"
             " or test_norm_with_unused_residual_sum and 768 or test_norms and True-3-4099 and dtype1",
    "activations": "test_bias_gelu or test_swiglu",
    "cross_entropy": "test_cross_entropy and (1-2- or 13-65- or 7-50257-) or test_cross_entropy_smoothing"
                     " or test_cross_entropy_masked and 1031 or test_cross_entropy_strided or test_cross_entropy_bad",
    "multi_tensor": "test_adamw_step or test_unscale_and_check",
    "gemm": "test_linear and (1-8-8 or 13-24-40 or 127-264-72) or test_linear_on_3d or test_linear_with_empty"
            " or test_matmul and (1-8-8 or 997-8-16 or 3-136-1032) or test_matmul_refuses or test_linear_refuses",
    "attention": "test_attention and (1-1-1-1-1-64 or 2-4-4-65-65-64 or 2-4-1-17-130-128) or test_attention_softmax"
                 " or test_attention_with_no_queries or test_attention_opcheck or test_fp32_attention"
                 " or test_attention_with_doc_ids or test_custom_ops_pass_opcheck or test_misaligned"
                 " or test_attention_beyond_the_gpus_shared_memory",
}
# the rest of the file: larger shapes of the same kernels (multi-block rows, long GEMM k loops, T = 1024
# attention), the refusals and the torch.compile path; ~70 s in a plain build, about three times that in a
# sanitized one (2 cores)
GROUPS["larger shapes"] = "not (" + " or ".join(f"({s})" for s in GROUPS.values()) + ") and not 70001"


def sanitizers_available() -> bool:
    try:
        return all(Path(p).is_absolute() and Path(p).exists() for p in cuda_emulator.sanitizer_preload().split())
    except OSError:
        return False


SANITIZE = sanitizers_available()  # AddressSanitizer catches what compute-sanitizer's memcheck would


@pytest.fixture(scope="module")
def emulator():
    try:
        return cuda_emulator.build(sanitize=SANITIZE)
    except cuda_emulator.Unavailable as e:
        pytest.skip(f"CUDA emulator not buildable here: {e}")


def run_emulated(module: Path, selection: str, tmp_path: Path, env: dict | None = None) -> tuple[int, dict, str]:
    """Run the selected tests of test_cuda_kernels.py over the emulated ``module`` in a child pytest;
    returns (exit code, counts of passed/failed/..., output with any sanitizer report)."""
    extra = {"LD_PRELOAD": cuda_emulator.sanitizer_preload(),
             "ASAN_OPTIONS": f"detect_leaks=0:log_path={tmp_path / 'asan'}"} if SANITIZE else {}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "test_cuda_kernels.py"),
         "-k", selection], cwd=HERE, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYLLM_CUDA_EMULATOR": "1", "PYLLM_CUDA_EMULATOR_MODULE": str(module),
             "OMP_NUM_THREADS": "1", **extra, **(env or {})})
    reports = "".join(p.read_text()[:4000] for p in sorted(tmp_path.glob("asan*")))
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", r.stdout)}
    return r.returncode, counts, r.stdout[-6000:] + r.stderr[-2000:] + reports


@pytest.mark.parametrize("group", GROUPS)
def test_cuda_kernels_emulated(emulator, group, tmp_path):
    code, n, output = run_emulated(emulator, GROUPS[group], tmp_path)
    assert code == 0 and n.get("passed", 0) > 0, f"emulated {group} tests:\n{output}"
    skipped = n.get("skipped", 0)
    # the only skips allowed: gpu_only tests (7 in the rest of the file: a second GPU, CUDA autocast, Triton
    # cross-checks, the 134M-element grid test), each skipping with the emulator's reason
    reasons = re.findall(r"SKIPPED \[\d+\] \S+: (.*)", output)
    unexpected = [r for r in reasons if "not run by the CUDA emulator" not in r and "two CUDA devices" not in r]
    assert skipped == 0 or (group == "larger shapes" and not unexpected and reasons), \
        f"emulated {group}: skipped tests in the selection\n{output}"


# A planted bug per kind of mistake the emulator exists to catch: the emulated tests must fail.
MUTANTS = {
    # the barrier between the warps' partial sums and their reading (norms.cu row_sum, block per row): the
    # first thread to run reads the other warps' sums before they are written
    "missing __syncthreads in a row": ("norms.cu", "    if (lane == 0) scratch[warp] = v;\n    __syncthreads();\n",
                              "    if (lane == 0) scratch[warp] = v;\n", "test_norms and True-3-4099 and dtype1"),
    # the attention backward's barrier between each warp's dS^T and the dQ step that reads every warp's:
    # warps only meet at warp barriers in between, so this needs one warp running ahead of the others
    "missing __syncthreads between warps": ("attention.cu", "      __syncthreads();  // dS^T of every warp is complete"
                                            " (dQ below reads all 64 keys)\n", "", "test_attention and 2-4-4-65-65-64"
                                            " and False and dtype1"),
    # the GEMM's main loop waits for one cp.async group too few
    "cp.async wait too weak": ("gemm.cu", "cp_async_wait<STAGES - 2>();", "cp_async_wait<STAGES - 1>();",
                               "test_matmul and 3-136-1032 and dtype0"),
    # the norm forward reads one element past its row (past the tensor in the last row)
    "read past the end": ("norms.cu", "  for (int i = lane * W; i < n; i += TPR * W) {\n    Pack<T, W> hv",
                          "  for (int i = lane * W; i <= n; i += TPR * W) {\n    Pack<T, W> hv",
                          "test_norms and False-17-127 and dtype0"),
}


@pytest.mark.parametrize("mutant", MUTANTS)
def test_the_emulator_catches_a_planted_bug(emulator, mutant, tmp_path):
    name, old, new, selection = MUTANTS[mutant]
    if mutant == "read past the end" and not SANITIZE:
        pytest.skip("needs AddressSanitizer (an emulated read past a tensor is caught by it, not by the emulator)")
    mutated = cuda_emulator.build(out_root=tmp_path / "build", mutate={name: (old, new)}, sanitize=SANITIZE)
    code, n, output = run_emulated(mutated, selection, tmp_path / "mutant")
    assert code != 0 and not n.get("passed"), f"{mutant}: the emulated tests passed\n{output}"
    code, _, output = run_emulated(emulator, selection, tmp_path / "original")
    assert code == 0, f"the same tests fail without the planted bug:\n{output}"

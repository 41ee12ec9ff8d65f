"""Run csrc/cuda's kernels on the CPU: a test tool, so CI executes the CUDA code it can only compile.

``build()`` translates each csrc/cuda/*.cu into host C++ (the rewrites below), compiles it with g++ against
the emulator's runtime (emu.h: one fiber per CUDA thread, barriers, shuffles, checks; mma.h: WMMA on
whole tiles; cuda/pipeline.cuh: cp.async that lands only at its wait) and links a Python module exposing
the same ``cuda_*`` functions as ``pyllm._C`` (csrc/cuda/bindings.h). ``install()`` points pyllm's "cuda"
backend at it, with CPU tensors standing in for device memory, in this process only.
tests/csrc/test_cuda_kernels.py does that when PYLLM_CUDA_EMULATOR=1 (test_cuda_emulated.py runs it so).

The rewrites (each must match, else the build fails naming it, so the sources cannot drift from them):
``__shared__ T a[N];`` -> a per-block buffer of the emulator; ``extern __shared__ ... T a[];`` -> the
block's dynamic shared memory; ``k<<<grid, block, smem, stream>>>(args)`` -> ``emu::launch(k, grid,
block, smem, stream, args)``; the 128-bit ``Pack`` casts of common.cuh -> ``emu::vector_at`` (alignment
check). Needs g++ with C++20 and CUDA's headers (types and fp16/bf16 conversions only; no CUDA runtime).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
CUDA_SRC = ROOT / "csrc" / "cuda"
MODULE = "_cuda_emulated"


class Unavailable(RuntimeError):
    """The emulator cannot be built here (no g++ or no CUDA headers)."""


def cuda_include() -> Path:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_bf16.h").exists():
            return Path(c) / "include"
    raise Unavailable("CUDA headers (cuda_bf16.h) not found: set CUDA_HOME")


# ------------------------------------------------------------------ source rewrites

def _static_shared(match: re.Match, counter: list[int]) -> str:
    typ, declarators = match.group(1), match.group(2)
    out = []
    for d in declarators.split(","):  # `__shared__ float a[8][33], b[8][33];`
        name, dims = re.fullmatch(r"\s*(\w+)\s*((?:\[[^\]]+\])+)\s*", d).groups()
        counter[0] += 1
        out.append(f"auto& {name} = emu::block_shared<{typ}{dims}>({counter[0]});")
    return " ".join(out)


def translate(source: str, name: str) -> str:
    """Host C++ for one .cu/.cuh file (see the module docstring)."""
    counter = [0]
    source = re.sub(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?((?:[\w:]+\s+)*?[\w:]+)\s+(\w+)\[\];",
                    r"\1* \2 = reinterpret_cast<\1*>(emu::dynamic_shared());", source)
    source = re.sub(r"__shared__\s+([\w:<>]+)\s+([^;]+);", lambda m: _static_shared(m, counter), source)
    source = re.sub(r"([\w:]+(?:<[^<>;]*>)?)<<<(.+?)>>>\(", lambda m: f"emu::launch({m.group(1)}, {m.group(2)}, ",
                    source, flags=re.S)
    source, n_pack = re.subn(r"reinterpret_cast<(const )?Pack<T, W>\*>\(p\)", r"emu::vector_at<\1Pack<T, W>>(p)",
                             source)
    if name == "common.cuh" and n_pack != 2:
        raise RuntimeError(f"cuda_emulator: expected the 2 Pack casts of load_pack/store_pack in {name}, "
                           f"found {n_pack}: update translate()")
    if "__shared__" in source or "<<<" in source:
        raise RuntimeError(f"cuda_emulator: {name} has a __shared__ or <<< that translate() did not rewrite")
    return '#include "emu.h"\n' + source


# ------------------------------------------------------------------ build

def _inputs() -> list[Path]:
    return sorted([*CUDA_SRC.iterdir(), *(ROOT / "csrc" / "common").iterdir(), *HERE.rglob("*.h"),
                   *HERE.rglob("*.cuh"), HERE / "module.cpp", Path(__file__)])


def sanitizer_preload() -> str:
    """LD_PRELOAD for a process that loads a ``sanitize`` build (ASan's runtime must come first)."""
    return " ".join(subprocess.run(["g++", f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
                    for lib in ("libasan.so", "libubsan.so"))


def build(out_root: Path | None = None, mutate: dict[str, tuple[str, str]] | None = None,
          sanitize: bool = False) -> Path:
    """Compile the emulated module (it and each object file cached by the hash of their inputs); returns
    its path. ``mutate`` {file name in csrc/cuda: (old, new)} plants a change in a source first (tests of
    the emulator).
    ``sanitize``: with AddressSanitizer and UBSan, so an access outside a tensor (CPU tensors are malloc'ed
    blocks with redzones around them) or undefined behaviour stops the process with a report; load it in a
    process started with LD_PRELOAD=sanitizer_preload() and ASAN_OPTIONS=detect_leaks=0."""
    if shutil.which("g++") is None:
        raise Unavailable("g++ not found")
    include = cuda_include()
    try:
        import pybind11
    except ImportError:
        raise Unavailable("pybind11 not installed (pip install -e '.[dev]')") from None

    mutate = dict(mutate or {})

    def source(name: str) -> str:
        text = (CUDA_SRC / name).read_text()
        if name in mutate:
            old, new = mutate.pop(name)
            if old not in text:
                raise ValueError(f"cuda_emulator: the text to mutate is not in {name}: {old!r}")
            text = text.replace(old, new, 1)
        return text

    # Every translated unit, then hashes: one over the headers and the emulator (every unit includes them)
    # and the flags, one per unit on top of it (its object file's cache key), one over all (the module's).
    common = translate(source("common.cuh"), "common.cuh")
    units = {"module": (HERE / "module.cpp").read_text()}
    units.update({cu.stem: translate(source(cu.name), cu.name) for cu in sorted(CUDA_SRC.glob("*.cu"))})
    if mutate:
        raise ValueError(f"cuda_emulator: no such source to mutate: {sorted(mutate)}")
    sanitizers = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"] if sanitize else []
    headers = hashlib.sha256(common.encode() + repr(sanitizers).encode())
    for p in _inputs():
        if p.is_file() and p.suffix != ".cu":
            headers.update(p.name.encode() + p.read_bytes())
    keys = {name: hashlib.sha256(headers.digest() + text.encode()).hexdigest()[:20] for name, text in units.items()}
    cache = ROOT / "build" / "cuda_emulator"
    out = (out_root or cache) / hashlib.sha256("".join(sorted(keys.values())).encode()).hexdigest()[:16]
    target = out / (MODULE + sysconfig.get_config_var("EXT_SUFFIX"))
    if target.exists():
        return target
    work = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    (work / "cuda").mkdir(parents=True)
    (work / "cuda" / "common.cuh").write_text(common)
    (cache / "objects").mkdir(parents=True, exist_ok=True)
    # include order: translated files, then the emulator's replacements (mma.h, cuda/pipeline.cuh), then csrc
    flags = ["-std=c++20", "-O1", "-fPIC", "-Wno-attributes", f"-I{work}", f"-I{HERE}", f"-I{ROOT / 'csrc'}",
             "-isystem", str(include), f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
             *sanitizers]

    def compile_unit(name: str) -> Path:
        cached = cache / "objects" / f"{keys[name]}.o"
        if cached.exists():
            return cached
        unit, obj = work / f"{name}.cpp", work / f"{name}.o"
        unit.write_text(units[name])
        r = subprocess.run(["g++", *flags, "-c", str(unit), "-o", str(obj)], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"cuda_emulator: compiling {name} failed:\n{r.stderr[-6000:]}")
        partial = cached.with_suffix(f".tmp{os.getpid()}")
        shutil.copyfile(obj, partial)
        partial.rename(cached)  # atomic: a concurrent build never links a half-written object
        return obj

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        objects = list(pool.map(compile_unit, units))
    linked = work / target.name
    r = subprocess.run(["g++", "-shared", *sanitizers, "-o", str(linked), *map(str, objects), "-lpthread"],
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"cuda_emulator: linking failed:\n{r.stderr[-4000:]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        work.rename(out)  # atomic: a concurrent build of the same sources leaves one complete directory
    except OSError:
        shutil.rmtree(work, ignore_errors=True)
    return target


def load(path: Path | None = None):
    """Import the emulated module (building it first when no path is given)."""
    path = path or build()
    spec = importlib.util.spec_from_loader(MODULE, importlib.machinery.ExtensionFileLoader(MODULE, str(path)))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def install(module=None):
    """Make pyllm's "cuda" backend call the emulated kernels on CPU tensors (this process only); returns
    the backend module. The wrappers' checks stay, except that tensors are on the CPU and the stream is 0."""
    import torch

    import pyllm
    import pyllm._C
    from pyllm.ops import registry

    if module is None:  # PYLLM_CUDA_EMULATOR_MODULE: an already built module (e.g. a planted bug's)
        prebuilt = os.environ.get("PYLLM_CUDA_EMULATOR_MODULE")
        module = load(Path(prebuilt) if prebuilt else None)
    real_c, real_available = pyllm._C, torch.cuda.is_available
    pyllm._C, torch.cuda.is_available = module, (lambda: True)
    registry._LOAD_ERRORS.pop("cuda", None)
    try:
        error = registry._load("cuda")
    finally:
        pyllm._C, torch.cuda.is_available = real_c, real_available
    if error:
        raise RuntimeError(f"cuda_emulator: the cuda backend did not load over the emulator: {error}")
    import pyllm.ops.cuda_backend as cb

    if cb._C is not module:  # the backend was imported before, over the real pyllm._C
        raise RuntimeError("cuda_emulator: pyllm.ops.cuda_backend was already loaded; install() must come first")

    def require(op, dtypes=tuple(cb._DTYPE_CODES), **tensors):  # the real one also demands a CUDA device
        for name, t in tensors.items():
            if t is not None and t.device.type != "cpu":
                raise cb.Unsupported(f"cuda backend (emulated): argument '{name}' of {op} is on {t.device}")
            if t is not None and t.dtype not in dtypes:
                raise cb.Unsupported(f"cuda backend: argument '{name}' of {op} is {t.dtype}; this kernel takes "
                                     f"{', '.join(str(d).replace('torch.', '') for d in dtypes)}")

    cb._require = require
    cb._stream = lambda: 0
    return cb

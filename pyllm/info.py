"""``pyllm info``: versions, devices and the op/backend table."""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch

import pyllm
from pyllm import ops


def cpu_identity(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """The CPU as /proc/cpuinfo names it, with its family/model/stepping and vector extensions: a lent VM's
    "AMD EPYC" has been a Zen 4 (family 25: 512-bit instructions on 256-bit units, ~107 GFLOP/s fp32 per core
    in oneDNN) one day and a CPU twice as fast per core (~247) another, so the name alone does not say what
    a figure was measured on."""
    fields: dict = {}
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model", "stepping", "flags") and key not in fields:
                fields[key] = value.strip()
            if key == "flags":
                break  # the first processor's block is enough
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16") if f in flags]
    out = {"name": name, "isa": isa}
    try:  # x86 only: other architectures' cpuinfo has no such fields
        out.update(family=int(fields["cpu family"]), model=int(fields["model"]), stepping=int(fields["stepping"]))
    except (KeyError, ValueError):
        pass
    return out


def cpu_label(ident: dict) -> str:
    """"AMD EPYC (family 25 model 17)": the name and, where known, the generation."""
    if "family" not in ident:
        return ident["name"]
    return f"{ident['name']} (family {ident['family']} model {ident['model']})"


def _cpu_line() -> str:
    ident = cpu_identity()
    line = f"device: CPU {cpu_label(ident)}, {os.cpu_count()} cores"
    if ident["isa"]:
        line += f", {' '.join(ident['isa'])}"
    try:
        from pyllm import _C
        line += f"; pyllm's C++ kernels: {_C.cpu_isa()}"
    except ImportError:
        pass
    return line


def report() -> str:
    lines = [f"pyllm {pyllm.__version__}, torch {torch.__version__}, python {platform.python_version()}"]
    try:
        import triton
        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton not installed")
    if torch.cuda.is_available():
        lines.append(f"device: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    else:
        lines.append(f"{_cpu_line()}; no CUDA device")
    lines.append("\nbackends:")
    lines += [f"  {name:<7} {status}" for name, status in ops.backends().items()]
    lines.append("\nops (backends implementing each):")
    lines += [f"  {op:<22} {', '.join(impls)}" for op, impls in ops.ops_table().items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="pyllm info", description=__doc__).parse_args(argv)
    print(report())
    return 0

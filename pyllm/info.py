"""``pyllm info``: versions, devices and the op/backend table."""

from __future__ import annotations

import argparse
import platform

import torch

import pyllm
from pyllm import ops


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
        lines.append(f"device: CPU ({platform.processor() or platform.machine()}), no CUDA device")
    lines.append("\nbackends:")
    lines += [f"  {name:<7} {status}" for name, status in ops.backends().items()]
    lines.append("\nops (backends implementing each):")
    lines += [f"  {op:<22} {', '.join(impls)}" for op, impls in ops.ops_table().items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="pyllm info", description=__doc__).parse_args(argv)
    print(report())
    return 0

"""Measure this machine's dense matmul FLOP/s for each compute dtype: the denominators of train/mfu.

python scripts/measure_peak_flops.py     # prints hardware.peak_flops.<dtype>=<value> for conf/hardware/*.yaml

A run's MFU is measured against the figure of the dtype its matmuls run in (sft.hardware.compute_dtype):
fp32 and bf16 on a CPU (fp16 autocast on a CPU is bf16); fp32, tf32 (fp32 with
torch.set_float32_matmul_precision("high")), bf16 and fp16 on a GPU. Measure on an idle machine: a second
busy process makes every figure low, and MFU then reads high.
"""

from __future__ import annotations

import argparse
import time

import torch

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def matmul_flops_per_s(size: int, dtype: torch.dtype, device: str, seconds: float) -> float:
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(3):  # warm up kernels and caches
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    iterations, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        iterations += 1
        if device == "cuda":
            torch.cuda.synchronize()  # time what ran, not what was queued
    return 2 * size**3 * iterations / (time.perf_counter() - started)


def peak(name: str, size: int, device: str, repeats: int, seconds: float) -> float:
    """The best of `repeats` timings (interference only ever slows a run down)."""
    torch.set_float32_matmul_precision("high" if name == "tf32" else "highest")
    return max(matmul_flops_per_s(size, DTYPES[name], device, seconds) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per timing")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="default: those of the device")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    names = args.dtypes or (["fp32", "tf32", "bf16", "fp16"] if device == "cuda" else ["fp32", "bf16"])
    threads = torch.get_num_threads()
    print(f"{device}, {args.size}x{args.size} matmuls, best of {args.repeats}, threads={threads}")
    for name in names:
        print(f"hardware.peak_flops.{name}={peak(name, args.size, device, args.repeats, args.seconds):.3e}")


if __name__ == "__main__":
    main()

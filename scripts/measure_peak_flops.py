"""Measure this machine's dense fp32 (or bf16 on GPU) matmul peak, the denominator of train/mfu.

python scripts/measure_peak_flops.py            # then: sft-train hardware.peak_flops=<printed value>
"""

from __future__ import annotations

import argparse
import time

import torch


def matmul_flops_per_s(size: int, dtype: torch.dtype, device: str, seconds: float = 2.0) -> float:
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(3):  # warm up kernels and caches
        a @ b
    iterations, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        iterations += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * iterations / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    peak = max(matmul_flops_per_s(args.size, dtype, device) for _ in range(3))
    print(
        f"{device} {dtype} {args.size}x{args.size} matmul: {peak:.3e} FLOP/s "
        f"(threads={torch.get_num_threads()})"
    )
    print(f"hardware.peak_flops={peak:.3e}")


if __name__ == "__main__":
    main()

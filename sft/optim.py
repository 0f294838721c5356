"""The optimizer's config and schedule: AdamW with decay / no-decay groups, warmup + cosine, clipping."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class OptimConfig:
    """The `optim` section (conf/optim/adamw.yaml). Norms and biases are never decayed."""

    lr: float = 3.0e-3  # peak learning rate
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1.0e-8
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1  # the cosine ends at min_lr_ratio * lr
    grad_clip: float | None = 1.0  # global norm; SFTModule clips (trainer.gradient_clip_val is refused)

    def __post_init__(self) -> None:
        problems = []
        if not self.lr > 0:
            problems.append(f"optim.lr={self.lr}: expected > 0")
        if self.weight_decay < 0:
            problems.append(f"optim.weight_decay={self.weight_decay}: expected >= 0")
        if len(self.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.betas):
            problems.append(f"optim.betas={self.betas}: expected two values in [0, 1)")
        if not self.eps > 0:
            problems.append(f"optim.eps={self.eps}: expected > 0")
        if self.warmup_steps < 0:
            problems.append(f"optim.warmup_steps={self.warmup_steps}: expected >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(f"optim.min_lr_ratio={self.min_lr_ratio}: expected 0..1")
        if self.grad_clip is not None and not self.grad_clip > 0:
            problems.append(f"optim.grad_clip={self.grad_clip}: expected > 0, or null for no clipping")
        if problems:
            raise ValueError("\n".join(problems))


def lr_at_step(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to `peak_lr`, then cosine decay to `min_lr_ratio * peak_lr` at `total_steps`."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)

"""Optimizers and the reference's learning-rate schedule.

The sparse optimizer is fused into the embedding backward (FBGEMM applies it while it
computes the gradient); the dense optimizer is an ordinary torch optimizer over the
data-parallel parameters. One schedule drives both.
"""

from typing import Any, Dict, List, Type

import torch
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from dlrm_torchrec.config import LRScheduleConfig, OptimizerConfig

_SPARSE: Dict[str, Type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rowwise_adagrad": RowWiseAdagrad,
    "adam": torch.optim.Adam,
}
_DENSE: Dict[str, Type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "adam": torch.optim.Adam,
}


def sparse_optimizer(cfg: OptimizerConfig):
    """(optimizer class, kwargs for `apply_optimizer_in_backward`, extra FBGEMM fused
    params for the sharder). Adam's betas go to FBGEMM as beta1/beta2: the fused kernel
    does not take torch's `betas` tuple."""
    lr = cfg.sparse_lr or cfg.lr
    kwargs: Dict[str, Any] = {"lr": lr}
    fused: Dict[str, Any] = {}
    if cfg.sparse in ("adagrad", "rowwise_adagrad", "adam"):
        kwargs["eps"] = cfg.eps
    if cfg.sparse == "adam":
        fused = {"beta1": cfg.beta1, "beta2": cfg.beta2}
    return _SPARSE[cfg.sparse], kwargs, fused


def dense_optimizer(cfg: OptimizerConfig, named_params, fused: bool = False) -> KeyedOptimizer:
    """A KeyedOptimizer over the parameters that have no optimizer fused into backward.

    fused: as few kernel launches as torch offers (the trainer asks on CUDA, where launches
    dominate a DLRM step's dense update; the arithmetic is the same): the fused
    implementation of SGD and Adam, one kernel for all parameters; for Adagrad the foreach
    (multi-tensor) one, because torch 2.11 (the GPU machine's) offers fused Adagrad on CPU
    only (`_device_dtype_check_for_fused(p, cuda_unsupported=True)`: the first step would fail
    on CUDA); torch 2.13 fuses it on CUDA too, but the code must run on both."""
    cls = _DENSE[cfg.dense]
    kwargs: Dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if fused:
        kwargs["foreach" if cfg.dense == "adagrad" else "fused"] = True
    if cfg.dense in ("adagrad", "adam"):
        kwargs["eps"] = cfg.eps
    if cfg.dense == "adam":
        kwargs["betas"] = (cfg.beta1, cfg.beta2)
    params = dict(in_backward_optimizer_filter(named_params))
    return KeyedOptimizerWrapper(params, lambda p: cls(p, **kwargs))


def lr_multiplier(step: int, cfg: LRScheduleConfig) -> float:
    """The reference's schedule as a multiplier of the base rate at optimizer step
    `step` (1-based), as docs/reference.md states it: linear warmup for s < W; quadratic decay
    max(1e-7 / base, ((N - (s - S)) / N)^2) for S <= s < S + N; otherwise the last computed
    value if N > 0 (flat between warmup and decay and after the decay), else 1."""
    w, s0, n = cfg.warmup_steps, cfg.decay_start_step, cfg.num_decay_steps
    if step < w:
        return step / w
    if s0 <= step < s0 + n:
        return ((n - (step - s0)) / n) ** 2
    if n == 0:
        return 1.0
    # the last value computed before this step
    if step >= s0 + n:
        return (1.0 / n) ** 2
    # between warmup and decay: the last warmup value, or the base rate if none
    return (w - 1) / w if w > 1 else 1.0


class LRSchedule:
    """Sets every param group's lr from the base rates and `lr_multiplier`.

    Call `step()` after each optimizer step; construction sets the rate of step 1.
    """

    MIN_LR = 1e-7

    def __init__(self, optimizer: CombinedOptimizer, cfg: LRScheduleConfig, start_step: int = 0):
        self.optimizer = optimizer
        self.cfg = cfg
        self.base_lrs: List[float] = [g["lr"] for g in optimizer.param_groups]
        self.step_count = start_step
        self.step()

    def lrs_at(self, step: int) -> List[float]:
        mult = lr_multiplier(step, self.cfg)
        in_decay = self.cfg.num_decay_steps > 0 and step >= self.cfg.decay_start_step
        lrs = [base * mult for base in self.base_lrs]
        if in_decay:
            lrs = [max(self.MIN_LR, lr) for lr in lrs]
        return lrs

    def resume_at(self, step: int) -> None:
        """After loading a checkpoint taken after `step` optimizer steps: set the rate of
        step + 1 (the loaded param groups hold the scheduled, not the base, rates)."""
        self.step_count = step
        self.step()

    def step(self) -> None:
        self.step_count += 1
        for group, lr in zip(self.optimizer.param_groups, self.lrs_at(self.step_count)):
            group["lr"] = lr

    @property
    def last_lr(self) -> float:
        return self.optimizer.param_groups[-1]["lr"]

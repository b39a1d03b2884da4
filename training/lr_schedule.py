"""Learning-rate schedules of the shared training loop, as a pure function of the step.

The multiplier of the base rate at step ``s`` (0-based: the rate of the ``s``-th optimiser update) is that of
diffusers' scheduler of the same name (``diffusers.optimization.get_scheduler``: ``constant``,
``constant_with_warmup``, ``linear``, ``cosine``) with ``lr_warmup_steps`` warm-up steps and ``max_steps`` training
steps. The loop sets each parameter group's rate to ``base × multiplier(step)`` before every update instead of keeping
a stateful ``LambdaLR``: the rate then depends on nothing but the step, so ``--resume`` and several processes need no
scheduler state in the checkpoint. A decaying schedule's shape follows ``max_steps``: a run resumed with a larger
``max_steps`` continues on the longer curve (the rate jumps up where the two curves differ).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


def check_schedule(name: str, warmup_steps: int, max_steps: int) -> None:
    """Raise ValueError, saying what is allowed, for a schedule no run can use."""
    if name not in SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")
    if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
        raise ValueError(f"lr_warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    if name == "constant" and warmup_steps:
        raise ValueError(f"lr_schedule 'constant' has no warm-up (lr_warmup_steps={warmup_steps}); "
                         "use 'constant_with_warmup'")
    if warmup_steps >= max_steps and name in ("linear", "cosine"):
        raise ValueError(f"lr_warmup_steps ({warmup_steps}) must be below max_steps ({max_steps}) for a decaying "
                         f"schedule ({name!r}), or the rate never decays")


def multiplier(name: str, warmup_steps: int, max_steps: int) -> Callable[[int], float]:
    """step -> the factor of the base learning rate at that step (diffusers' formula for ``name``)."""
    from diffusers.optimization import get_scheduler  # here, so that reading a config does not import diffusers

    check_schedule(name, warmup_steps, max_steps)
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)  # only to read the schedule's formula
    scheduler = get_scheduler(name, probe, num_warmup_steps=warmup_steps, num_training_steps=max_steps)
    (factor,) = scheduler.lr_lambdas
    return lambda step: float(factor(step))


def set_rates(optimizer: torch.optim.Optimizer, base_rates: list[float], factor: float) -> None:
    """Give each parameter group ``base × factor`` (``base_rates`` in the optimiser's group order)."""
    groups = optimizer.param_groups
    if len(groups) != len(base_rates):
        raise ValueError(f"{len(base_rates)} base rates for {len(groups)} parameter groups")
    for group, base in zip(groups, base_rates):
        group["lr"] = base * factor

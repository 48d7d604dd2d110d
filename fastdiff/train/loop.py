"""The optimisation loop both stages share: AdamW, warm-up, bf16 autocast on CUDA, gradient clipping, an
optional EMA of the weights, checkpoints that resume exactly, a progress bar and a log.

Exact resumption needs no saved random state: every random number of step s (noise, timesteps, caption
dropout, posterior samples) comes from a CPU generator seeded with (seed, stage, s), and the images of step
s are dataset indices [s * batch, (s + 1) * batch). A checkpoint therefore holds only the weights, the EMA,
the optimiser's moments and s; a run stopped and resumed performs the same arithmetic as one that was not.
Drawing on the CPU also makes the draws the same on every device.

The models' ops (`fastdiff.ops`) run on the reference backend while training: the Triton kernels are
inference-only (no backward).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from fastdiff import ops

from .recipe import Recipe, StageConfig

CHECKPOINT_FORMAT = 1
# Stage name -> its number in the per-step seed.
STAGES = {"vae": 0, "unet": 1}
LOG_EVERY = 25  # steps between loss readings (each one synchronises a GPU)


def learning_rate(stage: StageConfig, step: int) -> float:
    """Linear warm-up over `stage.warmup` steps, then constant."""
    return stage.lr * min(1.0, (step + 1) / stage.warmup) if stage.warmup > 0 else stage.lr


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """The CPU generator every random draw of `step` comes from (module docstring): a distinct seed for every
    (seed, stage, step) with seed < 2**31 and step < 2**32."""
    return torch.Generator().manual_seed(((seed * len(STAGES) + STAGES[stage]) << 32) + step)


class EMA:
    """Exponential moving average of the float parameters of named modules, kept in float32.

    decay at update n (0-based) is min(decay, (1 + n) / (10 + n)): early averages forget the random start fast.
    """

    def __init__(self, modules: dict[str, nn.Module], decay: float):
        self.decay = decay
        self.shadow = {name: {k: p.detach().float().clone() for k, p in m.named_parameters()}
                       for name, m in modules.items()}

    @torch.no_grad()
    def update(self, modules: dict[str, nn.Module], step: int) -> None:
        weight = 1.0 - min(self.decay, (1 + step) / (10 + step))
        for name, m in modules.items():
            params = dict(m.named_parameters())
            # One fused update per module, not a kernel per tensor (what torch.optim.swa_utils uses too).
            torch._foreach_lerp_([self.shadow[name][k] for k in params], [p.detach().float() for p in params.values()],
                                 weight)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        for name, tensors in state["shadow"].items():
            for k, v in tensors.items():
                self.shadow[name][k].copy_(v)


def _resume_key(recipe: Recipe, stage: str) -> dict:
    """What must be equal to resume a stage: the recipe without the other stage's settings and without this
    stage's step count and checkpoint interval, which change no step's arithmetic (a run of k steps is the
    first k steps of any longer run)."""
    d = recipe.to_dict()
    other = "unet_stage" if stage == "vae" else "vae_stage"
    del d[other]
    d[f"{stage}_stage"] = {k: v for k, v in d[f"{stage}_stage"].items() if k not in ("steps", "save_every")}
    return {"stage": stage, "recipe": d}


def checkpoint_path(out: Path, stage: str) -> Path:
    return Path(out) / f"{stage}.pt"


def save_checkpoint(path: Path, stage: str, recipe: Recipe, step: int, modules: dict[str, nn.Module],
                    optimizer: torch.optim.Optimizer, ema: Optional[EMA]) -> None:
    """Write atomically (a temporary file renamed over the old one): a run killed mid-save keeps the previous."""
    state = {"format": CHECKPOINT_FORMAT, **_resume_key(recipe, stage), "step": step,
             "models": {name: m.state_dict() for name, m in modules.items()},
             "optimizer": optimizer.state_dict(), "ema": None if ema is None else ema.state_dict()}
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, device: torch.device) -> dict:
    state = torch.load(path, map_location=device, weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a fastdiff training checkpoint of format {CHECKPOINT_FORMAT} "
                         f"(format {state.get('format')!r})")
    return state


@dataclass
class StageResult:
    steps_done: int  # optimiser steps in the checkpoint now
    finished: bool  # False when the time limit stopped the stage first
    last_loss: float  # mean loss over the last logged window (nan if no step ran)


LossFn = Callable[[int, torch.Generator], Tensor]


def run_stage(stage: str, recipe: Recipe, modules: dict[str, nn.Module], loss_fn: LossFn, out: Path,
              device: torch.device, time_limit: Optional[float] = None, progress: bool = True) -> StageResult:
    """Train `modules` (in train mode, on `device`) for the stage's steps on loss_fn(step, generator) -> scalar.

    Resumes from out/<stage>.pt when it exists (ValueError if it was made by a different recipe); saves it every
    save_every steps, at the end, and when `time_limit` (seconds of this call) runs out before the end.
    Writes one line per LOG_EVERY steps to out/<stage>_log.tsv. Returns where the stage stands.
    """
    from tqdm.auto import tqdm

    config: StageConfig = getattr(recipe, f"{stage}_stage")
    params = [p for m in modules.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay,
                                  fused=device.type == "cuda")
    ema = EMA(modules, config.ema_decay) if config.ema_decay > 0 else None
    path = checkpoint_path(out, stage)
    start = 0
    if path.exists():
        state = load_checkpoint(path, device)
        expected = _resume_key(recipe, stage)
        if {k: state[k] for k in expected} != expected:
            raise ValueError(f"{path} was written by a different recipe or stage; move it away or use the recipe "
                             f"it was trained with (checkpoint: {state['recipe']['name']!r}, stage {state['stage']!r})")
        for name, m in modules.items():
            m.load_state_dict(state["models"][name])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start = state["step"]
    for m in modules.values():
        m.train()

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    log = open(Path(out) / f"{stage}_log.tsv", "a")
    if start == 0:
        log.write("step\tloss\tlr\tseconds\n")
    began = time.monotonic()
    window: list[Tensor] = []
    last_loss = math.nan
    step = start
    bar = tqdm(total=config.steps, initial=start, desc=stage, unit="step", disable=not progress)
    try:
        with ops.use_backend("reference"):
            while step < config.steps:
                lr = learning_rate(config, step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with autocast:
                    loss = loss_fn(step, step_generator(recipe.seed, stage, step))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                if ema is not None:
                    ema.update(modules, step)
                step += 1
                bar.update(1)
                window.append(loss.detach())
                if step % LOG_EVERY == 0 or step == config.steps:
                    last_loss = torch.stack(window).mean().item()
                    window.clear()
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
                    log.write(f"{step}\t{last_loss:.6f}\t{lr:.3e}\t{time.monotonic() - began:.1f}\n")
                    log.flush()
                out_of_time = time_limit is not None and time.monotonic() - began > time_limit
                if step % config.save_every == 0 or step == config.steps or out_of_time:
                    save_checkpoint(path, stage, recipe, step, modules, optimizer, ema)
                if out_of_time and step < config.steps:
                    break
    finally:
        bar.close()
        log.close()
    return StageResult(step, step >= config.steps, last_loss)


def stage_weights(path: Path, name: str, device: torch.device = torch.device("cpu")) -> tuple[dict, dict]:
    """(weights of model `name` to ship, the checkpoint) from a stage checkpoint: the EMA if there is one."""
    state = load_checkpoint(path, device)
    weights = state["models"][name]
    if state["ema"] is not None:
        weights = {**weights, **state["ema"]["shadow"][name]}
    return weights, state

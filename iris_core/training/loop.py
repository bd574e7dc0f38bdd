"""The training loop: distributed set-up, EMA, optimiser, resume, validation, export."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from iris_core.errors import ConfigError
from iris_core.hub.checkpoint import (
    LoadedModel,
    read_safetensors,
    save_checkpoint,
    write_safetensors,
)
from iris_core.io.imaging import output_folder
from iris_core.metrics import dice_score
from iris_core.models import PRESETS, build_model
from iris_core.models.blocks import DownBlock, UpBlock
from iris_core.pipeline.device import autocast, select_device
from iris_core.pipeline.policy import Preprocessing
from iris_core.training.checks import copy_test, reference_sensitivity, standard_case
from iris_core.training.config import TrainConfig
from iris_core.training.episodes import TaskTable, _hermes_batch, _iris_batch
from iris_core.training.optim import Lamb
from iris_core.training.sources import _build_sources

log = logging.getLogger(__name__)


def plot_history(history: list[dict], path: Path) -> None:
    """Loss curve (raw and smoothed) of the training history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([h["step"] for h in history])
    loss = np.array([h["loss"] for h in history])
    k = max(1, len(loss) // 50)
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, alpha=0.3, label="loss (Dice + BCE)")
    ax.plot(steps[k - 1 :], smooth, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper left")
    val = [(h["step"], h["val_dice"]) for h in history if "val_dice" in h]
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val), "o-", color="tab:green", label="held-out Dice (EMA)")
        swap = [(h["step"], h["val_swap"]) for h in history if "val_swap" in h]
        if swap:
            ax2.plot(*zip(*swap), "s--", color="tab:red", label="Dice with other classes (swap)")
        check = [(h["step"], h["check_own"], h["check_other"]) for h in history if "check_own" in h]
        if check:
            st, own, other = zip(*check)
            ax2.plot(st, own, "^-", color="tab:purple", label="check-model: own truth")
            ax2.plot(st, other, "v:", color="tab:purple", label="check-model: other truths")
        copy = [(h["step"], h["copy_dice"]) for h in history if "copy_dice" in h]
        if copy:
            ax2.plot(*zip(*copy), "D-", color="tab:orange", label="copy test (reference image as target)")
        ax2.set_ylabel("validation Dice")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def validation_set(sources: list, table, cfg: TrainConfig, size: int) -> list:
    """Fixed episodes (their own seed, never the training stream's) scored at every save. Iris:
    held-out tasks only - the templates' held-out parcels (``cfg.holdout``, never a training task)
    and fresh synthetic draws - with 2-3 classes each, so that a swap check is possible."""
    rng = np.random.default_rng([cfg.seed, 999_983])
    vcfg = TrainConfig(**{**asdict(cfg), "batch": 1})
    if table is not None:
        return [_hermes_batch(sources, table, vcfg, size, rng) for _ in range(cfg.val_episodes)]
    held = [s.held_out() if hasattr(s, "held_out") else s for s in sources]
    vcfg = TrainConfig(**{**asdict(vcfg), "max_classes": 3})
    episodes = []
    while len(episodes) < cfg.val_episodes:
        ep = _iris_batch(held, vcfg, size, rng)
        if ep[1].shape[1] >= 2 and bool((ep[1].flatten(2).sum(-1) > 0).all()):
            episodes.append(ep)
    return episodes


@torch.no_grad()
def validation_scores(model, episodes: list, device, arch: str) -> dict[str, float]:
    """Mean Dice of thresholded predictions with their own truth (``val_dice``) and, for Iris, with
    the truth of the OTHER classes of the episode (``val_swap``): a model that ignores its reference
    predicts the same for every class, so its swap Dice approaches its own Dice."""

    own, swap = [], []
    for ep in episodes:
        if arch == "iris":
            q, qm, r, rm = (t.to(device) for t in ep)
            pred = model(q, r, rm) > 0
        else:
            x, qm, tasks, mods = (t.to(device) for t in ep)
            pred = model(x, tasks, mods)[0] > 0
        p, t = pred[0].cpu().numpy(), qm[0].cpu().numpy() > 0.5
        for i in range(len(p)):
            own.append(dice_score(p[i], t[i]))
            swap += [dice_score(p[i], t[j]) for j in range(len(t)) if j != i and arch == "iris"]
    out = {"val_dice": float(np.mean(own)) if own else float("nan")}
    if swap:
        out["val_swap"] = float(np.mean(swap))
    return out


def _lr(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to 0 at ``cfg.steps``; with ``lr_restart_at`` the schedule
    before that step ends there and a second one (warm-up included) spans the remaining steps."""
    total = cfg.steps
    if cfg.lr_restart_at:
        if step >= cfg.lr_restart_at:
            step, total = step - cfg.lr_restart_at, cfg.steps - cfg.lr_restart_at
        else:
            total = cfg.lr_restart_at
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(total - cfg.warmup, 1)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises torch.distributed under torchrun (gloo on CPU, nccl on GPUs)."""

    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


@dataclass
class _Run:
    """What the phases of one training run share: the networks (``net`` is ``model`` or its DDP wrapper), the
    optimiser, the task sources and, for the files it writes, the policy and metadata the models carry."""

    model: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    device: torch.device
    arch: str
    policy: Preprocessing
    sources: list
    table: TaskTable | None
    out_dir: Path
    net: torch.nn.Module | None = None

    @property
    def state_path(self) -> Path:
        return self.out_dir / "state.pt"

    def meta(self, cfg: TrainConfig, name: str, step: int) -> dict:
        """What a saved or exported model carries: its name, the training config, the step, the Hermes task
        modalities."""
        mod_names = {0: "CT", 1: "PET", 2: "T1 MRI"}
        modalities = [mod_names[e[3]] for e in self.table.entries] if self.table is not None else []
        return {"name": name, "train_config": asdict(cfg), "steps": step, "task_modalities": modalities}

    @property
    def names(self) -> list[str]:
        return self.table.names if self.table is not None else []


def train(cfg: TrainConfig, out_dir: str | Path, export: str | Path | None = None) -> Path:
    """Train (or resume) in ``out_dir``; export the EMA model to ``export`` at the end. Under torchrun
    every rank draws its own episodes (seeded by rank), gradients are averaged by DDP, rank 0 saves."""
    rank, world = _distributed()
    run = _set_up(cfg, output_folder(out_dir), world)
    step, history = _resume(cfg, run)
    run.net = run.model
    if world > 1:
        # find_unused_parameters: the prototype-head presets keep the (unused) token classifier's weights
        run.net = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device] if run.device.type == "cuda" else None, find_unused_parameters=True)
    rng = np.random.default_rng([cfg.seed, step, rank])
    val_set = (validation_set(run.sources, run.table, cfg, min(cfg.crop_sizes)) if rank == 0 and cfg.val_episodes
               else [])
    check_case = standard_case(run.policy) if rank == 0 and cfg.check_model and run.arch == "iris" else None
    dice = DiceLoss(sigmoid=True)
    t_run = time.perf_counter()
    while step < cfg.steps:
        t0 = time.perf_counter()
        size = int(rng.choice(cfg.crop_sizes, p=cfg.crop_probs))
        loss, k, t_data = _episode_loss(run, cfg, size, rng, dice)
        _optimise(run, cfg, loss, step)
        step += 1
        history.append({"step": step, "loss": loss.item(), "lr": _lr(step - 1, cfg), "k": k, "size": size,
                        "sec": time.perf_counter() - t0, "data_sec": t_data - t0})
        if step % 10 == 0 and rank == 0:
            recent = history[-10:]
            log.info("step %d loss %.4f  %.2f s/step (data %.2f)  %.2f episodes/s  RSS %.0f MB", step,
                     np.mean([h["loss"] for h in recent]), np.mean([h["sec"] for h in recent]),
                     np.mean([h["data_sec"] for h in recent]),
                     cfg.batch * world / np.mean([h["sec"] for h in recent]), _peak_rss_mb())
        if rank == 0 and (step % cfg.save_every == 0 or step == cfg.steps):
            _evaluate(run, history, step, val_set, check_case)
            _save(run, cfg, history, step)
    if rank == 0:
        log.info("trained %d steps in %.0f s", step, time.perf_counter() - t_run)
        if export:
            save_checkpoint(export, run.ema, run.policy, run.names,
                            run.meta(cfg, f"{cfg.preset} (step {step})", step), half=True)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return run.out_dir / "ema.safetensors"


def _set_up(cfg: TrainConfig, out_dir: Path, world: int) -> _Run:
    """The run's task sources, its model and EMA copy on the device, and its optimiser (seeded by ``cfg.seed``)."""
    preset = PRESETS[cfg.preset]
    torch.manual_seed(cfg.seed)
    spacing, window = cfg.grid()
    # what the saved and exported models carry (a position-aware readout: the pipeline aligns first)
    policy = Preprocessing(spacing=spacing, window=window, align="affine" if cfg.memory_positions else "none")
    sources = _build_sources(cfg, spacing)
    table = TaskTable(sources) if preset.arch == "hermes" else None
    config = preset.config
    if cfg.memory_positions:
        config = replace(config, memory_positions=True, position_sigma_mm=float(cfg.position_sigma_mm))
    if table is not None:
        config = replace(config, task_prior_slots=len(table.names))
    model = build_model(preset.arch, config).train()
    ema = build_model(preset.arch, config).eval()
    ema.load_state_dict(model.state_dict())
    for p in ema.parameters():
        p.requires_grad_(False)
    device = select_device(cfg.device if world == 1 or not torch.cuda.is_available() else
                           f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    model.to(device)
    ema.to(device)
    if device.type == "cuda" and cfg.amp:
        model.to(memory_format=torch.channels_last_3d)
    _set_checkpointing(model, cfg.checkpointing)
    if cfg.optimizer == "lamb":
        opt = Lamb(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; use adamw or lamb")
    return _Run(model, ema, opt, device, preset.arch, policy, sources, table, out_dir)


def _resume(cfg: TrainConfig, run: _Run) -> tuple[int, list[dict]]:
    """The step and history to go on from: the run's own ``state.pt`` (weights, EMA, optimiser), else the config's
    compact resume point (weights, step, history; the optimiser starts afresh), else step 0."""
    if run.state_path.is_file():
        state = torch.load(run.state_path, map_location=run.device, weights_only=True)
        run.model.load_state_dict(state["model"])
        run.ema.load_state_dict(state["ema"])
        run.opt.load_state_dict(state["opt"])
        log.info("resumed at step %d", int(state["step"]))
        return int(state["step"]), json.loads(state["history"])
    if cfg.resume_point:
        meta, tensors = read_safetensors(Path(cfg.resume_point), "resume point")
        _load_grown(run.model, {k[6:]: v.float() for k, v in tensors.items() if k.startswith("model.")},
                    cfg.resume_point)
        ema_sd = {k[4:]: v.float() for k, v in tensors.items() if k.startswith("ema.")}
        _load_grown(run.ema, ema_sd or run.model.state_dict(), cfg.resume_point)  # no EMA weights: the average restarts
        step = int(meta["step"])
        log.info("started from the resume point %s at step %d (fresh optimiser state)", cfg.resume_point, step)
        return step, json.loads(meta["history"])
    return 0, []


def _episode_loss(run: _Run, cfg: TrainConfig, size: int, rng: np.random.Generator,
                  dice: DiceLoss) -> tuple[torch.Tensor, int, float]:
    """One batch of episodes of crop ``size`` through the network: (loss, classes per episode, the time the batch
    was on the device: ``time.perf_counter()`` then)."""
    if run.table is None:
        q, qm, r, rm = (t.to(run.device) for t in _iris_batch(run.sources, cfg, size, rng))
        t_data = time.perf_counter()
        with autocast(run.device, cfg.amp):
            logits = run.net(q, r, rm).float()
        return dice(logits, qm) + F.binary_cross_entropy_with_logits(logits, qm), qm.shape[1], t_data
    x, m, tasks, mods = (t.to(run.device) for t in _hermes_batch(run.sources, run.table, cfg, size, rng))
    t_data = time.perf_counter()
    with autocast(run.device, cfg.amp):
        logits, mod_logits = (o.float() for o in run.net(x, tasks, mods))
    loss = dice(logits, m) + F.binary_cross_entropy_with_logits(logits, m)
    return loss + cfg.modality_loss_weight * F.cross_entropy(mod_logits, mods[:, 0]), m.shape[1], t_data


def _optimise(run: _Run, cfg: TrainConfig, loss: torch.Tensor, step: int) -> None:
    """One optimiser step at ``step``'s learning rate (gradients clipped), then the EMA follows the model."""
    for g in run.opt.param_groups:
        g["lr"] = _lr(step, cfg)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip)
    run.opt.step()
    with torch.no_grad():
        for pe, pm in zip(run.ema.parameters(), run.model.parameters()):
            pe.lerp_(pm, 1 - cfg.ema)
        for be, bm in zip(run.ema.buffers(), run.model.buffers()):
            be.copy_(bm)


def _evaluate(run: _Run, history: list[dict], step: int, val_set: list, check_case) -> None:
    """At a save, the EMA model's figures into the last history entry: held-out validation Dice (own truth and the
    other classes'), and for Iris check-model and the copy test (their reports written to the run's folder)."""
    if val_set:
        history[-1].update(validation_scores(run.ema, val_set, run.device, run.arch))
        log.info("step %d held-out validation Dice %.4f, with the other classes' truth %.4f (EMA, %d "
                 "fixed episodes)", step, history[-1]["val_dice"], history[-1].get("val_swap", float("nan")),
                 len(val_set))
    if check_case is None:
        return
    report = reference_sensitivity(run.ema, *check_case, device=run.device)
    history[-1].update({"check_own": report.own_dice, "check_other": report.other_dice,
                        "check_identified": report.identified, "check_passed": report.passed})
    report.to_json(run.out_dir / "check.json")
    (run.out_dir / "check.md").write_text(report.to_markdown(f"Reference sensitivity at step {step}") + "\n",
                                          encoding="utf-8")
    report.plot(run.out_dir / "check.png", f"EMA model, step {step}")
    log.info("step %d check-model %s: %s", step, "PASSED" if report.passed else "FAILED", report.rule)
    copy = copy_test(LoadedModel(run.ema, run.arch, run.ema.config, run.policy, "training EMA model",
                                 info={"name": f"EMA model, step {step}"}), device=str(run.device),
                     out_dir=run.out_dir)
    history[-1].update({"copy_dice": copy.mean_dice, "copy_passed": copy.passed})
    log.info("step %d copy test %s: %s", step, "PASSED" if copy.passed else "FAILED", copy.rule)


def _save(run: _Run, cfg: TrainConfig, history: list[dict], step: int) -> None:
    """The run's state (``state.pt``, replaced whole: an interrupted save leaves the previous one), its curve and
    its EMA model (``ema.safetensors``)."""
    tmp = run.state_path.with_suffix(".partial")
    torch.save({"model": run.model.state_dict(), "ema": run.ema.state_dict(), "opt": run.opt.state_dict(),
                "step": step, "history": json.dumps(history), "config": json.dumps(asdict(cfg))}, tmp)
    tmp.replace(run.state_path)
    plot_history(history, run.out_dir / "curve.png")
    save_checkpoint(run.out_dir / "ema.safetensors", run.ema, run.policy, run.names,
                    run.meta(cfg, f"{cfg.preset} step {step}", step))


#: parameters a model may gain over its resume point (they start from their initial values)
GROWN_PARAMETERS = ("memory_log_sigma",)


def _load_grown(model: torch.nn.Module, state: dict, source: str) -> None:
    """Load weights of a resume point into a model that may have gained parameters since (a position-aware
    readout's distance scale: ``GROWN_PARAMETERS``); any other missing or unexpected key is an error."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    wrong = [k for k in missing if k not in GROWN_PARAMETERS]
    if wrong or unexpected:
        raise ConfigError(f"resume point {source}: does not fit this model (missing {wrong}, unexpected {unexpected})")
    if missing:
        log.info("resume point %s: %s start from their initial values", source, ", ".join(missing))


def write_resume_point(state_file: str | Path, out: str | Path, with_ema: bool = True) -> Path:
    """A compact resume point from a run's ``state.pt``: model (and EMA) weights in float16 safetensors
    with the step and history (no optimiser state), small enough to commit; ``resume_point`` in the
    config continues from it."""

    state = torch.load(state_file, map_location="cpu", weights_only=True)
    tensors = {f"model.{k}": v.half() if v.is_floating_point() else v for k, v in state["model"].items()}
    if with_ema:
        tensors |= {f"ema.{k}": v.half() if v.is_floating_point() else v for k, v in state["ema"].items()}
    return write_safetensors(Path(out), tensors, {"step": str(int(state["step"])), "history": state["history"],
                                                  "config": state["config"]})


def _set_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Recompute the conv stages' activations in the backward pass (activation checkpointing)."""

    for m in model.modules():
        if isinstance(m, DownBlock | UpBlock):
            m.checkpointing = enabled


def _peak_rss_mb() -> float:
    """Resident memory of this process in MB (psutil: portable; peak where the platform reports it)."""
    import psutil

    info = psutil.Process().memory_info()
    return getattr(info, "peak_wset", info.rss) / 2**20

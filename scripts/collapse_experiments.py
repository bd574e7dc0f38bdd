"""The small experiments behind the default model card's "why the first model collapsed".

    python scripts/collapse_experiments.py tokens MODEL [MODEL ...]
        Five unrelated tasks on Colin27 (brain, left hemisphere, left precentral gyrus, cerebellum,
        thalamus): cosine similarity of the task tokens across tasks per stage (token 0, which the
        published head reads, and the foreground token), and each prediction's Dice with every
        task's truth. ``init:iris-small`` is an untrained network of a preset.

    python scripts/collapse_experiments.py ablate --head query|foreground [--prototype] \
            --source synthetic|synth:random --mode views|identity --steps 300
        A short training of iris-tiny on tasks only the reference defines, then Dice of each
        prediction with its own truth and with the other classes' truth (held-out episodes).
        ``--mode identity`` hands the reference itself as the query (the mask path alone decides).

Figures in Resources/Models/iris-default.md were printed by these commands on this 2-core CPU.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F


def _model(spec: str):
    from iris_core.hub.checkpoint import load_checkpoint
    from iris_core.models import PRESETS, build_model

    if spec.startswith("init:"):
        torch.manual_seed(0)
        return build_model("iris", PRESETS[spec[5:]].config).eval(), PRESETS[spec[5:]].spacing
    m = load_checkpoint(spec)
    return m.model.float().eval(), m.preprocessing.spacing


def tokens(models: list[str]) -> None:
    from iris_core.training.sources import TemplateSource

    for spec in models:
        net, spacing = _model(spec)
        src = TemplateSource("colin27", spacing)
        reg, values, _ = src.label_sets["aal"]
        tasks = {"brain": src.brain, "left hemisphere": torch.isin(reg, torch.tensor([v for v in values if v % 2])),
                 "precentral L": reg == 1, "cerebellum": torch.isin(reg, torch.tensor(range(91, 109))),
                 "thalamus": torch.isin(reg, torch.tensor([77, 78]))}
        masks = torch.stack(list(tasks.values()))[None].float()
        img = src.image[None, None]
        with torch.no_grad():
            emb = net.encode_task(img, masks)
            pred = net.segment(img, emb)[0] > 0
        print(f"== {spec}")
        for s, e in enumerate(emb[: net.config.num_prior_stage]):
            for t, label in ((0, "token 0 (query)"), (e.shape[2] - 1, "foreground token")):
                v = F.normalize(e[0, :, t], dim=-1)
                c = (v @ v.T).numpy()
                print(f"stage {s} {label}: mean cosine across tasks {c[~np.eye(len(c), dtype=bool)].mean():.4f}")
        for i, name in enumerate(tasks):
            d = [float(2 * (pred[i] & (masks[0, j] > 0)).sum() / (pred[i].sum() + masks[0, j].sum() + 1e-6))
                 for j in range(len(tasks))]
            print(f"reference {name:16s} -> Dice with each task's truth {np.round(d, 2).tolist()}")


def ablate(head: str, prototype: bool, source: str, mode: str, steps: int, lr: float, seed: int) -> None:
    from monai.losses import DiceLoss

    from iris_core.models import PRESETS, build_model
    from iris_core.training import TrainConfig
    from iris_core.training.episodes import _iris_batch
    from iris_core.training.sources import _build_sources

    torch.manual_seed(seed)
    cfg_m = replace(PRESETS["iris-tiny"].config, head_token=head, reference_prototype=prototype)
    net = build_model("iris", cfg_m).train()
    cfg = TrainConfig(sources=(source,), batch=2, max_classes=3)
    src = _build_sources(cfg, (4.0, 4.0, 4.0))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-5)
    rng, dice = np.random.default_rng(seed + 1), DiceLoss(sigmoid=True)

    def batch(r, c):
        q, qm, ref, rm = _iris_batch(src, c, 32, r)
        return (ref, rm, ref, rm) if mode == "identity" else (q, qm, ref, rm)

    t0, hist = time.time(), []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20)
        q, qm, r, rm = batch(rng, cfg)
        logits = net(q, r, rm)
        loss = dice(logits, qm) + F.binary_cross_entropy_with_logits(logits, qm)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        hist.append(loss.item())
        if (step + 1) % 50 == 0:
            print(f"step {step + 1} loss {np.mean(hist[-50:]):.3f} ({time.time() - t0:.0f} s)", flush=True)
    net.eval()
    vr, own, other, n = np.random.default_rng(12345), [], [], 0
    c3 = TrainConfig(sources=(source,), batch=1, max_classes=3)
    with torch.no_grad():
        while n < 15:
            q, qm, r, rm = batch(vr, c3)
            if qm.shape[1] < 2 or not bool((qm.flatten(2).sum(-1) > 0).all()):
                continue
            n += 1
            p = net(q, r, rm)[0] > 0
            for i in range(qm.shape[1]):
                for j in range(qm.shape[1]):
                    t = qm[0, j] > 0.5
                    (own if i == j else other).append(float(2 * (p[i] & t).sum() / (p[i].sum() + t.sum() + 1e-6)))
    print(f"head={head} prototype={prototype} source={source} mode={mode} steps={steps}: "
          f"Dice with own truth {np.mean(own):.3f}, with the other classes' truth {np.mean(other):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokens")
    t.add_argument("models", nargs="+")
    a = sub.add_parser("ablate")
    a.add_argument("--head", default="foreground", choices=["query", "foreground"])
    a.add_argument("--prototype", action="store_true")
    a.add_argument("--source", default="synthetic")
    a.add_argument("--mode", default="views", choices=["views", "identity"])
    a.add_argument("--steps", type=int, default=300)
    a.add_argument("--lr", type=float, default=3e-3)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(getattr(args, "threads", 1))
    if args.cmd == "tokens":
        tokens(args.models)
    else:
        ablate(args.head, args.prototype, args.source, args.mode, args.steps, args.lr, args.seed)


if __name__ == "__main__":
    main()

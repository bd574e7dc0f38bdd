"""Export a training run's EMA model as a bundled model file (float16) with inference choices that need no
training: the memory sample size of the readout and the label threshold (the threshold chosen on held-out tasks
with scripts/choose_threshold.py, never on the copy test or the benchmark; how the bundled file's memory sample
was set: the model card). Issue [11].

Usage: python scripts/export_model.py runs/c20/ema.safetensors Resources/Models/iris-default.safetensors \
           --memory 16384 --threshold 0.35 [--align affine] [--prior-weight 10] [--prior-power 1] \
           [--fit-window 96]
       python scripts/export_model.py default variant.safetensors --keep-choices --align none   (a variant)
The file records where the choices came from (info "inference_choices"); the weights are the EMA's.
"""

from __future__ import annotations

import argparse
import dataclasses

from iris_core.api import resolve_model
from iris_core.hub.checkpoint import save_checkpoint
from iris_core.pipeline.policy import POLICY_CHOICES

#: the policy fields this script sets (each from its --option of the same name; absent: the input file's)
POLICY_FIELDS = ("align", "prior_weight", "prior_power", "prior_labels", "fit_window")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ema", help="the run's ema.safetensors")
    ap.add_argument("out")
    ap.add_argument("--memory", type=int, help="memory sample size of the readout")
    ap.add_argument("--threshold", type=float, help="label threshold of the policy")
    ap.add_argument("--align", choices=POLICY_CHOICES["align"],
                    help="the policy's alignment of references to targets (issue [20]; default: the input's)")
    ap.add_argument("--prior-weight", type=float, help="the policy's aligned-label prior weight (issue [20]; "
                                                       "chosen on held-out tasks: the model card; default: the input's)")
    ap.add_argument("--prior-power", type=float, help="the policy's agreement power in the prior's weight "
                                                     "(chosen on held-out tasks: the model card; default: the input's)")
    ap.add_argument("--prior-labels", choices=POLICY_CHOICES["prior_labels"],
                    help="the policy's prior labels on the target grid (the model card; default: the input's)")
    ap.add_argument("--fit-window", type=int, help="the policy's fit_window: one window for a target grid up to this "
                                                   "edge (issue [21]; 0: off; default: the input's)")
    ap.add_argument("--keep-choices", action="store_true",
                    help="keep the input model file's memory sample and threshold (a variant of a bundled model: "
                         "the model card's ablation)")
    ap.add_argument("--chosen-by", help="where the choices come from (default: the input's with --keep-choices, "
                                        "else scripts/choose_threshold.py)")
    args = ap.parse_args(argv)
    loaded = resolve_model(args.ema)
    if loaded.arch != "iris" or not loaded.model.config.memory_tokens:
        raise SystemExit(f"{args.ema}: not a memory-readout Iris model")
    previous = loaded.info.get("inference_choices", {})
    if args.keep_choices:
        args.memory = args.memory or loaded.model.config.memory_tokens
        args.threshold = args.threshold or loaded.preprocessing.threshold
    if args.threshold is None or args.memory is None:
        raise SystemExit("give --memory and --threshold (or --keep-choices for a model file that has them)")
    if not 0 < args.threshold < 1 or args.memory < 1:
        raise SystemExit(f"--threshold must be in (0, 1) and --memory >= 1, got {args.threshold} and {args.memory}")
    model = loaded.model
    trained_with = previous.get("trained_with_memory_tokens", model.config.memory_tokens)
    model.config = dataclasses.replace(model.config, memory_tokens=args.memory)
    changes = {f: getattr(args, f) for f in POLICY_FIELDS if getattr(args, f) is not None}
    policy = dataclasses.replace(loaded.preprocessing, threshold=args.threshold, **changes)
    info = dict(loaded.info)
    steps = info.get("steps")
    info["name"] = f"{info.get('train_config', {}).get('preset', 'iris-small')} (step {steps})"
    info["inference_choices"] = {"memory_tokens": args.memory, "threshold": args.threshold,
                                 **{f: getattr(policy, f) for f in POLICY_FIELDS},
                                 "trained_with_memory_tokens": trained_with,
                                 "chosen_by": args.chosen_by or (previous.get("chosen_by") if args.keep_choices else None)
                                 or "scripts/choose_threshold.py (held-out parcels on moved Colin27)"}
    path = save_checkpoint(args.out, model, policy, loaded.class_names, info, half=True)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {info['name']}, memory sample {args.memory}, "
          f"threshold {args.threshold}, align {policy.align}, prior weight {policy.prior_weight} (power "
          f"{policy.prior_power}, {policy.prior_labels} labels), "
          f"fit window {policy.fit_window}")


if __name__ == "__main__":
    main()

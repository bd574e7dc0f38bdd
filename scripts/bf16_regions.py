"""bf16 in part of the network only: on the first window(s) of the MASS fixture's MR case, the labels and
probabilities of float32 against CPU bf16 autocast applied to chosen encoder/decoder modules (each
module's output cast back to float32). Prints agreement, mean/max probability difference and seconds.

    python scripts/bf16_regions.py CHECKPOINT [WINDOWS]
"""

import sys
import time

import torch

from iris_core.api import load_references, resolve_classes, resolve_model
from iris_core.commands.bench_pipeline import FIXTURE
from iris_core.io.imaging import read_image
from iris_core.pipeline.inference import Engine
from iris_core.pipeline.precision import compare
from iris_core.pipeline.strategies import encode_references, one_shot


class _Enough(Exception):
    pass


def first_windows(loaded, n: int):
    """The first ``n`` prepared windows of the fixture's MR target and the task's tokens, as the engine feeds them."""
    engine = Engine(loaded, device="cpu", threads=torch.get_num_threads(), intensity="MR")
    refs = load_references([(str(FIXTURE / "mr_reference.nii.gz"), str(FIXTURE / "mr_reference_labels.nii.gz"))])
    classes = resolve_classes(refs, None)
    prep = engine.prepare(read_image(str(FIXTURE / "mr_target.nii.gz"), "target image"), "mr_target")
    emb = one_shot(encode_references(engine, refs, classes), classes)
    got = []

    def grab(x, tokens):
        got.append((x.clone(), [t.clone() for t in tokens]))
        if len(got) >= n:
            raise _Enough
        return torch.zeros(x.shape[0], len(classes), *x.shape[2:])

    engine.segment_network = grab  # the engine's window function, replaced by this probe
    try:
        engine.predict(prep, emb)
    except _Enough:
        pass
    return got, engine.policy.threshold


def _to_float(t):
    if torch.is_tensor(t):
        return t.float()
    if isinstance(t, (tuple, list)):
        return type(t)(_to_float(u) for u in t)
    return t


def set_bf16(modules: dict, on: set) -> None:
    for name, mod in modules.items():
        for sub in (mod if isinstance(mod, torch.nn.ModuleList) else [mod]):
            fwd = type(sub).forward.__get__(sub)

            def run(*a, fwd=fwd, enabled=name in on):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                    return _to_float(fwd(*a))

            sub.forward = run


def main() -> None:
    torch.set_num_threads(2)
    loaded = resolve_model(sys.argv[1])
    windows, threshold = first_windows(loaded, int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    m = loaded.model.eval()
    enc, dec = m.encoder, m.decoder
    modules = {"inc": enc.inc, "d1": enc.down1, "d2": enc.down2, "d3": enc.down3, "d4": enc.down4,
               "fuse": dec.prior_fuse, "u1": dec.up1, "u2": dec.up2, "u3": dec.up3, "u4": dec.up4}
    splits = {"everything": set(modules), "encoder only": {"inc", "d1", "d2", "d3", "d4"},
              "decoder only": {"fuse", "u1", "u2", "u3", "u4"}, "three deepest stages": {"d3", "d4", "fuse", "u1", "u2"},
              "all but 128^3": set(modules) - {"inc", "u4"}}
    with torch.inference_mode():
        for i, (x, tokens) in enumerate(windows):
            set_bf16(modules, set())
            t = time.perf_counter()
            ref = m.segment(x, tokens).float()
            p = torch.sigmoid(ref)
            print(f"window {i}: float32 {time.perf_counter() - t:.1f} s; probabilities within 0.01 of "
                  f"{threshold}: {100 * (p - threshold).abs().lt(0.01).float().mean():.1f} %", flush=True)
            for name, on in splits.items():
                set_bf16(modules, on)
                t = time.perf_counter()
                out = m.segment(x, tokens).float()
                s = time.perf_counter() - t
                c = compare(ref, out, threshold)
                print(f"  bf16 {name:22s} {s:5.1f} s  same label {100 * c.agreement:.3f} % "
                      f"(labelled {100 * c.labelled_agreement:.2f} %)  probability difference mean "
                      f"{c.mean_difference:.2g} max {c.max_difference:.2g}", flush=True)


if __name__ == "__main__":
    main()

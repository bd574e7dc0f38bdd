"""Commands about models: ``info``, ``check-model`` (does it follow and copy its reference?), ``presets``,
``models`` (list, pull).

Modules are imported when a command runs."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from iris_core.errors import InputError

log = logging.getLogger("iris_core")

def cmd_info(args: argparse.Namespace) -> int:
    from iris_core.api import resolve_model
    from iris_core.models import config_to_dict

    m = resolve_model(args.model, allow_unsafe=args.trust_checkpoint)
    n = sum(p.numel() for p in m.model.parameters())
    print(json.dumps({"source": m.source, "arch": m.arch, "parameters": n, "config": config_to_dict(m.config),
                      "preprocessing": m.preprocessing.to_dict(), "class_names": m.class_names, "info": m.info},
                     indent=2))
    return 0



def cmd_check_model(args: argparse.Namespace) -> int:
    """Collapse detector: ten different references on Colin27 must give ten different predictions; and the
    copy test: the reference image itself as the target must give the reference's labels back."""
    if args.model and args.model_option and args.model != args.model_option:
        raise InputError(f"check-model: two models given ({args.model}, --model {args.model_option}); give one")
    args.model = args.model or args.model_option or "default"
    from iris_core.hub.download import check_model_spec

    check_model_spec(args.model)
    if args.output:  # before the model is loaded and checked: minutes
        from iris_core.io.outputs import output_folder

        output_folder(args.output, "--output", create=False)
    from iris_core.api import resolve_model
    from iris_core.training.checks import copy_test, standard_check

    loaded = resolve_model(args.model, allow_unsafe=args.trust_checkpoint)
    report = standard_check(loaded, device=args.device, out_dir=args.output)
    print(report.to_markdown(f"Reference sensitivity of {loaded.name}"))
    copy = copy_test(loaded, device=args.device, out_dir=args.output) if loaded.arch == "iris" else None
    if copy is not None:
        print(copy.to_markdown(f"Copy test of {loaded.name}"))
    if args.output:
        print(f"wrote {Path(args.output) / 'check.json'}, check.md, check.png, copy.json, copy.md")
    return 0 if report.passed and (copy is None or copy.passed) else 1


def cmd_presets(args: argparse.Namespace) -> int:
    from iris_core.models import PRESETS, build_preset

    for name, p in PRESETS.items():
        n = sum(q.numel() for q in build_preset(name).parameters()) / 1e6
        print(f"{name:12s} {p.arch:7s} {n:7.2f} M params  spacing {p.spacing} window {p.window}  {p.description}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from iris_core.hub import download as hub
    if args.action == "pull":
        if not args.name:
            raise_usage = f"models pull needs a name: {', '.join(n for n, m in hub.KNOWN.items() if m.repo_id)}"
            print(f"error: {raise_usage}", file=sys.stderr)
            return 2
        m = hub.KNOWN.get(args.name)
        if m is not None and m.repo_id:  # the cache it goes to, before the download
            from iris_core.io.outputs import output_folder

            output_folder(hub.cache_folder(), "the model cache (HF_HUB_CACHE)", create=False)
            print(f"downloading {m.name} ({m.size_text()}) from {m.url}\nlicence: {m.licence}", file=sys.stderr)
        path = hub.pull(args.name, progress=not args.quiet)
        print(f"{args.name}: {path}\nverified: loads as the {hub.KNOWN[args.name].arch} layout; licence: "
              f"{hub.KNOWN[args.name].licence}\nuse it with --model {args.name}")
        return 0
    rows = hub.describe()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        state = r["local"] or (f"not downloaded: {r['get']}" if r["get"] else "")
        print(f"{r['name']:10s} {r['size']:>7s}  {r['title']}\n{'':19s}licence: {r['licence']}\n"
              f"{'':19s}source:  {r['source']}" + (f"\n{'':19s}local:   {state}" if state else ""))
    return 0


def add_parsers(sub, parents: list[argparse.ArgumentParser]) -> None:
    """The options of ``info``, ``check-model``, ``models`` and ``presets``."""
    i = sub.add_parser("info", parents=parents, help="describe a model file")
    i.add_argument("--model", default="default")
    i.add_argument("--trust-checkpoint", action="store_true")
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("check-model", parents=parents, help="does the model follow its reference, and give a reference's labels back "
                       "when the target is the reference image (copy test)? (exit code 1 when not)")
    c.add_argument("model", nargs="?", help="model file, 'default' (bundled), a known name or preset:NAME "
                   "(or --model, as in the other commands; default: the bundled model)")
    c.add_argument("--model", dest="model_option", metavar="MODEL", help=argparse.SUPPRESS)
    c.add_argument("--output", help="folder for check.json, check.md and check.png")
    c.add_argument("--device", default="cpu")
    c.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a model file that needs full unpickling (it can run code: trusted files only)")
    c.set_defaults(func=cmd_check_model)

    mo = sub.add_parser("models", parents=parents, help="list known models (size, licence, source); 'models pull NAME' downloads one")
    mo.add_argument("action", nargs="?", choices=["list", "pull"], default="list")
    mo.add_argument("name", nargs="?", help="with pull: the model to download, e.g. mass-base")
    mo.add_argument("--json", action="store_true", help="list as JSON")
    mo.add_argument("--quiet", action="store_true", help="no progress bar")
    mo.set_defaults(func=cmd_models)

    p = sub.add_parser("presets", parents=parents, help="list the architecture presets")
    p.set_defaults(func=cmd_presets)

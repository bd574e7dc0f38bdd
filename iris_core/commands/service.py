"""``iris-segment serve`` (the server) and ``iris-segment segment --server URL`` (its CLI client)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from iris_core.commands.terminal import TerminalProgress, preview_title
from iris_core.errors import InputError, IrisError


def cmd_serve(args: argparse.Namespace) -> int:
    if not args.token_file:
        raise InputError("serve needs --token-file (one token per line): nothing runs without a token")
    if not Path(args.token_file).is_file():
        raise InputError(f"--token-file {args.token_file}: file not found (one token per line, 16 characters or more)")
    if args.workdir:  # before the models load: a folder the jobs' files cannot be written in
        from iris_core.io.outputs import output_folder

        output_folder(args.workdir, "--workdir", create=False)
    from iris_core.service.jobs import Limits
    from iris_core.service.server import serve
    limits = Limits(max_jobs=args.max_jobs, max_jobs_per_token=args.max_jobs_per_token,
                    max_upload_mb=args.max_upload_mb, max_voxels=args.max_voxels,
                    max_job_minutes=args.max_job_minutes, token_minutes_per_hour=args.token_minutes_per_hour,
                    keep_minutes=args.keep_minutes)
    for name, value in dataclasses.asdict(limits).items():  # 0 means "no limit" for these two only
        if value < 0 or (value == 0 and name not in ("max_job_minutes", "token_minutes_per_hour")):
            raise InputError(f"--{name.replace('_', '-')} {value}: must be positive")
    serve(args.host, args.port, args.token_file, args.models, limits, args.device, args.threads, args.libraries,
          args.workdir, args.docs)
    return 0


def segment_on_server(args: argparse.Namespace, jobs: list[tuple[str, str, str | None]], options) -> int:
    """Each target through the server: the same outputs as a local run (label map and sidecar), written
    atomically; progress as locally; Ctrl-C cancels the job on the server."""
    from iris_core.io.names import split_volume_name
    from iris_core.io.outputs import relative_to_sidecar
    from iris_core.service.client import Client, ServerError, read_token

    if not args.token_file:
        raise InputError("--server needs --token-file (the token the server was given)")
    if not (args.reference or args.library) or args.structures:
        raise InputError("--server segments from --reference IMAGE LABELS or --library NAME (a task library the "
                         "server offers); Hermes structures run locally")
    try:
        client = Client(args.server, read_token(args.token_file), ca_bundle=args.ca_bundle, proxy=args.proxy)
        info = client.info()
        ext = split_volume_name(Path(jobs[0][1]).name)[1].lower()  # the format the server writes, as asked
        ext = ext if ext in (".seg.nrrd", ".nii.gz", ".nrrd") else ".nii.gz"
        first = None  # several targets: the task is encoded once, on the server, and reused (not for retrieval)
        keep = len(jobs) > 1 and args.strategy != "retrieval"
        for target, output, preview in jobs:
            progress = TerminalProgress(sys.stderr.isatty() and not args.quiet)
            if first is not None:
                job = client.submit_target(first, target)
            else:
                job = client.submit(target, [tuple(r) for r in args.reference or []], model=args.model,
                                    options=options.to_dict(), classes=args.classes, output=ext,
                                    library=args.library, keep_task=keep)
            try:
                st = client.wait(job, progress)
            except KeyboardInterrupt:
                client.cancel(job)
                raise
            finally:
                progress.close()
            if st["status"] != "done":
                raise IrisError(f"target {target}: {st['status']} on the server: "
                                f"{client.user_words(job, st.get('error') or 'no result')}")
            # the sidecar names its preview (a later run may replace both)
            record = {"preview": relative_to_sidecar(preview, output)} if preview else None
            out, side, sidecar = client.fetch(job, output, forget=not (keep and first is None), record=record)
            if keep and first is None:
                first = job
            if preview:
                from iris_core.io.imaging import read_image
                from iris_core.io.viz import overlay_png

                names = {c.get("value"): c.get("name") for c in sidecar.get("classes", [])}
                overlay_png(read_image(target, "target image"), read_image(out, "result"), preview,
                            title=preview_title(target, sidecar), names=names)
            seconds = (sidecar.get("timings_s") or {}).get("total")
            print(f"wrote {out} ({len(sidecar.get('classes', []))} classes, "
                  f"{f'{seconds:.1f} s' if isinstance(seconds, int | float) else 'time unknown'} on "
                  f"{info['server']} {args.server}, {sidecar.get('device', '?')}) and {side}")
        if first is not None:
            client.forget(first)
    except ServerError as exc:
        raise IrisError(str(exc)) from None
    return 0


def add_parsers(sub, parents: list[argparse.ArgumentParser]) -> None:
    """The options of ``serve``."""
    s = sub.add_parser("serve", parents=parents, help="serve segmentations over HTTP to thin clients (token required)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--token-file", help="file of accepted tokens, one per line (required)")
    s.add_argument("--models", nargs="+", default=["default"], help="models it may load (loaded once, kept warm)")
    s.add_argument("--max-jobs", type=int, default=4, help="jobs queued or running at once, all tokens (more: HTTP 429)")
    s.add_argument("--max-jobs-per-token", type=int, default=2, help="jobs one token may have queued or running")
    s.add_argument("--max-upload-mb", type=float, default=1024, help="largest upload of one job (more: HTTP 413)")
    s.add_argument("--max-voxels", type=int, default=512 * 512 * 1024,
                   help="largest image of an upload, voxels (times components or layers), read from its header "
                        "before any voxel (default: %(default)s = 512 x 512 x 1024)")
    s.add_argument("--max-job-minutes", type=float, default=30, help="compute one job may use before it is stopped "
                   "(0: no limit)")
    s.add_argument("--token-minutes-per-hour", type=float, default=60,
                   help="compute minutes one token may use in any hour, all workers together (0: no limit)")
    s.add_argument("--keep-minutes", type=float, default=10,
                   help="an ended job's result is deleted this long after it ended if nobody fetched it (fetching "
                        "deletes it at once)")
    s.add_argument("--workdir", help="folder of the jobs' files (default: the system's temporary folder); a start "
                   "deletes what a server that died there left")
    s.add_argument("--docs", action="store_true", help="also serve /docs, /redoc and /openapi.json (no token, "
                   "scripts from a CDN)")
    s.add_argument("--device", default="auto")
    s.add_argument("--threads", type=int)
    s.add_argument("--libraries", help="folder of task libraries (.safetensors) a request may name (--library NAME)")
    s.set_defaults(func=cmd_serve)

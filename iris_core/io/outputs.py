"""Where a command may write, checked before any work, with the standard library alone (so a refusal comes
before torch is imported, and the thin client uses it too): an output is never an input, its folder can be
written, and an existing file is replaced only when this tool wrote it (its record says so) or the user
said ``--overwrite``."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from iris_core.errors import InputError
from iris_core.io.names import sidecar_path

#: the ``written_by`` field every JSON record of this tool starts with (a sidecar, a JSON report)
WRITTEN_BY = "iris-segment"
VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")  # one file holding a 3-D volume and its geometry
PICTURE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".svg", ".pdf", ".tif", ".tiff", ".webp")  # matplotlib writes them


def stamp(record: dict) -> dict:
    """``record`` with the field that says this tool wrote it (``written_by``: name and version), first."""
    from iris_core import __version__

    return {"written_by": f"{WRITTEN_BY} {__version__}"} | {k: v for k, v in record.items() if k != "written_by"}


def read_record(path: str | Path) -> dict | None:
    """The JSON object in ``path`` when this tool wrote it, else None: one whose ``written_by`` names this tool,
    or a result sidecar of a version before that field (its ``model``, ``classes`` and ``timings_s``)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    mark = data.get("written_by")
    if isinstance(mark, str) and mark.split(" ")[0] == WRITTEN_BY:
        return data
    legacy = isinstance(data.get("model"), dict) and isinstance(data.get("classes"), list) and "timings_s" in data
    return data if legacy else None


def is_our_result(output: str | Path) -> bool:
    """True when ``output`` (a label map, a DICOM SEG) has a sidecar beside it that this tool wrote."""
    return read_record(sidecar_path(output)) is not None


def listed_by_result(output: str | Path) -> Callable[[Path], bool]:
    """For the files a result lists in its sidecar (preview, probability maps): True for a file the sidecar of
    ``output``, written by this tool, names (by its path relative to the sidecar's folder)."""

    def ours(path: Path) -> bool:
        record = read_record(sidecar_path(output))
        if record is None:
            return False
        side_dir = sidecar_path(output).parent
        listed = [record.get("preview")] + list((record.get("probability_maps") or {}).values())
        return any(isinstance(p, str) and same_file(side_dir / p, path) for p in listed)

    return ours


def relative_to_sidecar(path: str | Path, output: str | Path) -> str:
    """How the sidecar of ``output`` names a file it lists: relative to its own folder (the pair can move); on
    another Windows drive, where no relative path leads, in full."""
    try:
        return Path(os.path.relpath(Path(path).absolute(), sidecar_path(output).absolute().parent)).as_posix()
    except ValueError:
        return Path(path).absolute().as_posix()


def same_file(a: Path, b: Path) -> bool:
    """True when two paths name one file: same path, another spelling of it, or a hard link."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def refuse_overwriting_inputs(outputs: dict[str, str | Path | None], inputs: dict[str, str | Path | None]) -> None:
    """Raise before any work when an output would land on an input file (same path, another spelling
    of it, or the same file by hard link) or on another output; ``None`` entries are ignored. No flag
    lifts this: an input is never written."""
    outs = [(what, Path(p)) for what, p in outputs.items() if p is not None]
    ins = [(what, Path(p)) for what, p in inputs.items() if p is not None]
    for i, (what, out) in enumerate(outs):
        for in_what, src in ins:
            if same_file(out, src):
                raise InputError(f"{what} {out} is the input {in_what} {src}: writing it would destroy the "
                                 "input; choose another output path")
        for other_what, other in outs[i + 1:]:
            if same_file(out, other):
                raise InputError(f"{what} and {other_what} are both {out}; choose another output path")


def _writable(folder: Path, what: str, path: Path) -> None:
    """Refuse ``path`` when nothing can be created in ``folder`` (its nearest existing folder): tried with a
    hidden file made and removed at once, the one test that holds for permissions, read-only mounts, ACLs
    and /proc alike."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".iris-segment-probe-", dir=folder)
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot write in {folder} ({exc.strerror or exc}); choose a folder you "
                         "can write to") from None
    os.close(fd)
    os.unlink(probe)


def _nearest_folder(path: Path, what: str) -> Path:
    """The nearest existing folder above ``path`` (where the missing ones would be made); a file in the way
    is refused."""
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{what} {path}: {parent} is a file, not a folder; choose another output path")
            return parent
    return Path(path.absolute().anchor)


def check_output_place(path: str | Path, what: str = "output") -> None:
    """Refuse, before any work, an output file that could not be written where it is named: a folder of
    that name, a file where one of its folders should be (``--output notes.txt/seg.nii.gz``), or a folder
    nothing can be written in (``/proc``, read-only, another user's)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path}: a folder of that name exists; name a file in it (e.g. {path / 'seg.nii.gz'})")
    _writable(_nearest_folder(path, what), what, path)


def check_output_file(path: str | Path, what: str, overwrite: bool = False,
                      ours: Callable[[Path], bool] | None = None) -> None:
    """The one check of an output file before any work: it can be written where it is named
    (``check_output_place``), and an existing file there is replaced only when ``overwrite`` (the user's
    ``--overwrite``) or when ``ours(path)`` says this tool wrote it (a result whose sidecar says so, a task
    library, a report of ours). Whether it is an input is ``refuse_overwriting_inputs``' job, whatever the
    flags."""
    path = Path(path)
    check_output_place(path, what)
    if path.exists() and not overwrite and not (ours is not None and ours(path)):
        raise InputError(f"{what} {path} exists and is not a result of iris-segment (nothing of ours records writing it): "
                         "choose another output path, or give --overwrite to replace it")


def output_folder(path: str | Path, what: str = "--out", create: bool = True) -> Path:
    """Create (if needed) the folder a command writes into; a file in its place, a folder that cannot be
    made or one nothing can be written in is one clear error, not a traceback after the work. ``create=False``
    only checks, for a command that makes the folder when it has something to write (a failed run leaves no
    empty one)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {path}: a file, not a folder; this command writes several files into a folder")
    if not create:
        _writable(path if path.is_dir() else _nearest_folder(path, what), what, path)
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot create the folder ({exc.strerror or exc}); choose a folder you "
                         "can write to") from None
    _writable(path, what, path)
    return path


def check_volume_output(path: str | Path, what: str = "output") -> None:
    """Refuse, before any work, an output name whose format cannot hold a 3-D volume with its
    geometry (a PNG, no extension) or that ITK would write as two files (.mhd/.nhdr + raw)."""
    name = Path(path).name.lower()
    if not name.endswith(VOLUME_EXTENSIONS):
        raise InputError(f"{what} {path}: write a 3-D volume as {', '.join(VOLUME_EXTENSIONS)} "
                         "(e.g. seg.nii.gz or seg.seg.nrrd)")


def check_picture_output(path: str | Path, what: str = "picture") -> None:
    """Refuse, before any work, a picture name matplotlib cannot write as named (it appends .png to a
    name without extension and fails on an unknown one)."""
    if not Path(path).name.lower().endswith(PICTURE_EXTENSIONS):
        raise InputError(f"{what} {path}: name the picture with one of {', '.join(PICTURE_EXTENSIONS)}")


def write_csv(path: str | Path, fields: list[str], rows: list[dict]) -> None:
    """A CSV report (UTF-8, a header row, then ``rows``), its folder made if needed."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def first_line_is(line: str) -> Callable[[Path], bool]:
    """For a report file without a record of its own (CSV, Markdown): True when its first line is ``line`` (its
    header, its marker), so a later run may replace it."""

    def ours(path: Path) -> bool:
        try:
            with open(path, encoding="utf-8", newline="") as f:
                return f.readline().rstrip("\r\n") == line
        except (OSError, UnicodeDecodeError):
            return False

    return ours


def write_json_report(path: str | Path, data: dict | list) -> Path:
    """A JSON report (``bench --json``, ``score --json``) stamped as ours (a list goes under ``results``),
    written through a temporary moved into place."""
    from iris_core.io.names import publish

    path = Path(path)
    record = stamp(data if isinstance(data, dict) else {"results": data})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path

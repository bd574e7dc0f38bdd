"""What the service's client puts on the wire, with the standard library alone: multipart bodies streamed from
files, and the check of a value against the JSON schema a server publishes (the subset pydantic writes), worded for
the user."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

#: the file types an upload may be; the server keeps the part's name and this extension, nothing else of the
#: client's file name (the client puts its user's file names back into the sidecar it writes: ``rename_parts``)
UPLOAD_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")


def part_file_name(part: str, filename: str) -> str | None:
    """The name the server stores an upload under: the part ('target', 'reference_image_0') and the known
    extension of the client's file name (``target.nii.gz``); None for a file type it does not take."""
    name = (filename or "").lower()
    ext = next((e for e in UPLOAD_EXTENSIONS if name.endswith(e)), None)
    return None if ext is None else f"{part}{ext}"


def rename_parts(value, names: dict[str, str]):
    """A server's record (a sidecar, an error) with the names it stored the uploads under replaced by the
    user's file names (``{'target.nii.gz': 'case01.nii.gz'}``), in every text, in one pass."""
    if not names:
        return value
    pattern = re.compile("|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)))

    def rename(v):
        if isinstance(v, dict):
            return {k: rename(x) for k, x in v.items()}
        if isinstance(v, list):
            return [rename(x) for x in v]
        return pattern.sub(lambda m: names[m.group(0)], v) if isinstance(v, str) else v

    return rename(value)


def multipart(files: list[tuple[str, Path]], request: bytes | None = None) -> tuple[str, list]:
    """A multipart/form-data body as pieces (bytes, and the files' paths, read as they are sent)."""
    boundary = uuid.uuid4().hex
    body: list = []
    if request is not None:
        body.append(f'--{boundary}\r\nContent-Disposition: form-data; name="request"\r\n\r\n'.encode() + request
                    + b"\r\n")
    for name, path in files:
        safe = path.name.replace('"', "_").replace("\r", "_").replace("\n", "_")
        body += [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{safe}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n".encode(), path, b"\r\n"]
    body.append(f"--{boundary}--\r\n".encode())
    return boundary, body


def resolve(schema: dict, defs: dict) -> dict:
    ref = schema.get("$ref") if isinstance(schema, dict) else None
    return defs.get(ref.rsplit("/", 1)[-1], {}) if isinstance(ref, str) else schema if isinstance(schema, dict) else {}


_TYPES = {"integer": "an integer", "number": "a number", "string": "a text", "boolean": "true or false",
          "null": "null", "array": "a list", "object": "an object"}


def _is(value: object, kind: str) -> bool:
    if kind in ("integer", "number") and isinstance(value, bool):
        return False
    return {"integer": isinstance(value, int), "number": isinstance(value, int | float),
            "string": isinstance(value, str), "boolean": isinstance(value, bool), "null": value is None,
            "array": isinstance(value, list | tuple), "object": isinstance(value, dict)}.get(kind, True)


def mismatch(value: object, schema: dict, defs: dict) -> str | None:
    """What ``schema`` (the JSON schema subset pydantic writes: type, enum, const, bounds, items, anyOf/oneOf,
    $ref) accepts, in words, when ``value`` does not fit it; None when it does."""
    schema = resolve(schema, defs)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            problems = [mismatch(value, s, defs) for s in schema[key]]
            return None if not all(problems) else " or ".join(dict.fromkeys(p for p in problems if p))
    if "const" in schema and value != schema["const"]:
        return f"only {json.dumps(schema['const'])}"
    if "enum" in schema and value not in schema["enum"]:
        return "one of " + ", ".join(json.dumps(v) for v in schema["enum"])
    kind = schema.get("type")
    if isinstance(kind, str) and not _is(value, kind):
        return _TYPES.get(kind, kind)
    if isinstance(value, int | float) and not isinstance(value, bool):
        lo, hi = schema.get("minimum"), schema.get("maximum")
        xlo, xhi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        if (lo is not None and value < lo) or (hi is not None and value > hi) or \
                (xlo is not None and value <= xlo) or (xhi is not None and value >= xhi):
            low = f"from {lo}" if lo is not None else f"above {xlo}" if xlo is not None else ""
            high = f"to {hi}" if hi is not None else f"below {xhi}" if xhi is not None else ""
            return f"{_TYPES.get(kind, 'a number')} {low} {high}".strip()
    if isinstance(value, str) and len(value) > schema.get("maxLength", len(value)):
        return f"a text of at most {schema['maxLength']} characters"
    if isinstance(value, list | tuple):
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            return f"a list of {schema.get('minItems', 0)} to {schema.get('maxItems', len(value))} items"
        items = schema.get("prefixItems") or [schema.get("items") or {}] * len(value)
        for i, (v, s) in enumerate(zip(value, items)):
            problem = mismatch(v, s, defs)
            if problem:
                return f"item {i}: {problem}"
    if isinstance(value, dict) and "properties" in schema:
        for k, v in value.items():
            if k not in schema["properties"]:
                if schema.get("additionalProperties") is False:
                    return f"no {k!r} (it knows {', '.join(schema['properties'])})"
                continue
            problem = mismatch(v, schema["properties"][k], defs)
            if problem:
                return f"{k}: {problem}"
    return None

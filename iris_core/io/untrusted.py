"""Image files from a sender who is not trusted (the uploads of ``iris-segment serve``), checked from their headers
before any voxel is read: NIfTI-1 (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.seg.nrrd``) and MetaImage
(``.mha``), each parsed here as text or bytes before SimpleITK opens the file.

What is refused, each with a message naming the part (never a path of this machine): a file whose content is not the
format its extension names; a header whose voxels live in another file (NRRD ``data file``, MetaImage
``ElementDataFile`` other than ``LOCAL``, a NIfTI ``.hdr``/``.img`` pair; teem reads ``DATA FILE`` as ``data file``): a header naming ``/etc/shadow`` or
``/dev/zero`` would otherwise make the reader open it; more voxels than the caller's limit (a 100-byte gzip file
may declare 1600^3 voxels); a header over 1 MiB; text voxels (NRRD ascii/hex, MetaImage ``BinaryData = False``);
voxel bytes (decompressed, counted in 1 MiB chunks and never kept) that differ from what the header declares. Then
SimpleITK reads the header with the format's own ImageIO (no other reader is tried) and its size must agree with
the parse here, and the volume must be 3-D and scalar (a ``.seg.nrrd`` label part may have layers)."""

from __future__ import annotations

import bz2
import gzip
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from iris_core.errors import InputError, reason
from iris_core.io.imaging import check_shape

#: a text header (NRRD, MetaImage) or a NIfTI header with its extensions is at most this long
MAX_HEADER_BYTES = 2**20
#: compressed voxels are counted in chunks of this size, never held whole
CHUNK = 2**20

#: NRRD type names (teem's synonyms) -> bytes per value
_NRRD_TYPES = {
    1: ("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"),
    2: ("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort", "unsigned short",
        "unsigned short int", "uint16", "uint16_t"),
    4: ("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"),
    8: ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t",
        "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t", "double"),
}
NRRD_TYPE_BYTES = {name: n for n, names in _NRRD_TYPES.items() for name in names}
#: NRRD encodings read here and by ITK without a text parser
NRRD_ENCODINGS = {"raw": "raw", "gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2"}
#: MetaImage element types -> bytes per value (MET_LONG is left out: its size is the platform's)
MET_TYPE_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                  "MET_FLOAT": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_DOUBLE": 8}
#: NIfTI datatype codes -> bytes per voxel (scalars; RGB24 and RGBA32 too, refused later as not scalar)
NIFTI_TYPE_BYTES = {2: 1, 4: 2, 8: 4, 16: 4, 64: 8, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8, 128: 3, 2304: 4}


@dataclass(frozen=True)
class HeaderFacts:
    """What a checked header declares: the format's ITK reader, the sizes (every axis, components included),
    the values they hold, bytes per value, how the voxels are stored and where they start."""

    imageio: str
    sizes: tuple[int, ...]
    values: int
    value_bytes: int
    encoding: str  # raw, gzip, bzip2, zlib (MetaImage), or nifti-gz (the whole file is gzip)
    offset: int


def _refuse(what: str, why: str) -> InputError:
    return InputError(f"{what}: refused: {why}")


def _unreadable(what: str, why: str) -> InputError:
    return InputError(f"{what}: unreadable ({why})")


def check_untrusted_image(path: str | Path, what: str, max_voxels: int, labels: bool = False) -> HeaderFacts:
    """Check an uploaded image from its header before any voxel is read (see the module's docstring), or raise an
    InputError naming ``what`` (the part, never ``path``). ``max_voxels`` bounds the values of the file (voxels
    times components or layers); ``labels``: a label part, whose ``.seg.nrrd`` may hold several layers."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".nrrd"):
        facts = _nrrd(path, what)
    elif name.endswith(".mha"):
        facts = _metaimage(path, what)
    elif name.endswith((".nii", ".nii.gz")):
        facts = _nifti(path, what, name.endswith(".gz"))
    else:
        raise _refuse(what, "not a NIfTI, NRRD or MetaImage (.mha) file")
    if facts.values > max_voxels:
        shape = " x ".join(str(s) for s in facts.sizes)
        raise _refuse(what, f"its header declares {shape} = {facts.values:,} voxels, over this server's limit of "
                            f"{max_voxels:,} per image")
    _check_voxel_bytes(path, what, facts)
    _check_with_itk(path, what, facts, layers_allowed=labels and name.endswith(".seg.nrrd"))
    return facts


def _text_header(path: Path, what: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(MAX_HEADER_BYTES + 1)


def _nrrd(path: Path, what: str) -> HeaderFacts:
    """The header of an NRRD file with attached voxels; refuses a detached one (``data file``)."""
    head = _text_header(path, what)
    if not head.startswith(b"NRRD000"):
        raise _unreadable(what, "not an NRRD file: it does not start with 'NRRD000'")
    fields: dict[str, str] = {}
    pos, offset = 0, None
    while True:
        end = head.find(b"\n", pos)
        if end < 0:
            break
        line = head[pos:end].rstrip(b"\r").decode("latin-1")
        pos = end + 1
        if not line:  # the blank line: the voxels follow
            offset = pos
            break
        if line.startswith("#") or line.startswith("NRRD000"):
            continue
        if "".join(line.lower().split()).startswith("datafile:"):  # a field, or a key teem might take for one
            fields["datafile"] = line.split(":", 1)[1].lstrip("=").strip()
            continue
        kv, field = line.find(":="), line.find(": ")
        if field < 0 or 0 <= kv < field:
            continue  # a key/value pair (metadata, Slicer's segments), not a field
        # teem reads field names without regard to case or spaces ('data file', 'datafile', 'DATA FILE')
        fields["".join(line[:field].lower().split())] = line[field + 2:].strip()
    if "datafile" in fields:
        raise _refuse(what, f"its header names another file for its voxels (data file: {fields['datafile']!r}); "
                            "send a single .nrrd with its voxels attached")
    if offset is None:
        if len(head) > MAX_HEADER_BYTES:
            raise _refuse(what, f"its header is over {MAX_HEADER_BYTES // 2**20} MiB")
        raise _refuse(what, "no voxels follow its header (a detached .nhdr header?); send a single .nrrd")
    for skip in ("lineskip", "byteskip"):
        if fields.get(skip, "0").strip() != "0":
            raise _refuse(what, f"'{skip}: {fields[skip]}' is not supported here; save it again without skips")
    try:
        dimension = int(fields["dimension"])
        sizes = tuple(int(s) for s in fields["sizes"].split())
    except (KeyError, ValueError):
        raise _unreadable(what, "its NRRD header lacks a valid 'dimension' or 'sizes'") from None
    if not 1 <= dimension <= 16 or len(sizes) != dimension or min(sizes) < 1:
        raise _unreadable(what, f"its NRRD sizes {fields['sizes']!r} do not fit its dimension {dimension}")
    type_name = " ".join(fields.get("type", "").lower().split())
    if type_name not in NRRD_TYPE_BYTES:
        raise _refuse(what, f"NRRD type {fields.get('type', '(none)')!r} is not a number type read here")
    encoding = fields.get("encoding", "").lower()
    if encoding not in NRRD_ENCODINGS:
        raise _refuse(what, f"NRRD encoding {encoding or '(none)'!r}; save it as raw or gzip")
    return HeaderFacts("NrrdImageIO", sizes, math.prod(sizes), NRRD_TYPE_BYTES[type_name], NRRD_ENCODINGS[encoding],
                       offset)


def _metaimage(path: Path, what: str) -> HeaderFacts:
    """The header of a MetaImage ``.mha``: ``Key = Value`` lines up to ``ElementDataFile = LOCAL``."""
    head = _text_header(path, what)
    fields: dict[str, str] = {}
    pos, offset = 0, None
    while pos < len(head):
        end = head.find(b"\n", pos)
        if end < 0:
            break
        line = head[pos:end].rstrip(b"\r").decode("latin-1")
        pos = end + 1
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise _unreadable(what, "not a MetaImage file: a header line without '='")
        key, value = key.strip().lower(), value.strip()
        fields[key] = value
        if key == "elementdatafile":  # MetaIO's last header line: what follows is the voxels
            offset = pos
            break
    if offset is None:
        if "ndims" not in fields:
            raise _unreadable(what, "not a MetaImage file: no 'NDims' before the voxels")
        raise _refuse(what, "its header does not end with 'ElementDataFile = LOCAL' within "
                            f"{MAX_HEADER_BYTES // 2**20} MiB")
    if fields["elementdatafile"].lower() != "local":
        raise _refuse(what, f"its header names another file for its voxels (ElementDataFile = "
                            f"{fields['elementdatafile']!r}); send a single .mha with its voxels (LOCAL)")
    if fields.get("headersize", "0") not in ("0", ""):
        raise _refuse(what, f"'HeaderSize = {fields['headersize']}' is not supported here; save it again")
    if fields.get("binarydata", "false").lower() != "true":
        raise _refuse(what, "its voxels are text (BinaryData = False); save it as binary")
    try:
        ndims = int(fields["ndims"])
        sizes = tuple(int(s) for s in fields["dimsize"].split())
        channels = int(fields.get("elementnumberofchannels", "1"))
    except (KeyError, ValueError):
        raise _unreadable(what, "its MetaImage header lacks a valid 'NDims' or 'DimSize'") from None
    if not 1 <= ndims <= 16 or len(sizes) != ndims or min(sizes) < 1 or channels < 1:
        raise _unreadable(what, f"its MetaImage DimSize {fields['dimsize']!r} does not fit NDims {ndims}")
    element = fields.get("elementtype", "").upper()
    if element not in MET_TYPE_BYTES:
        raise _refuse(what, f"MetaImage element type {element or '(none)'!r} is not read here")
    compressed = fields.get("compresseddata", "false").lower() == "true"
    return HeaderFacts("MetaImageIO", (*sizes, channels) if channels > 1 else sizes, math.prod(sizes) * channels,
                       MET_TYPE_BYTES[element], "zlib" if compressed else "raw", offset)


def _nifti(path: Path, what: str, gz: bool) -> HeaderFacts:
    """The header of a single-file NIfTI-1 (``n+1``); a header/image pair and NIfTI-2 (which ITK does not read)
    are refused."""
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            head = f.read(540)
    except (OSError, EOFError, zlib.error) as exc:
        raise _unreadable(what, f"not a gzip-compressed NIfTI: {reason(exc)}") from None
    for order in "<>":
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:
            if head[344:348] == b"ni1\0":
                raise _refuse(what, "a NIfTI header whose voxels are in a separate .img file; send a single .nii")
            if head[344:348] != b"n+1\0":
                raise _unreadable(what, "not a single-file NIfTI-1 (magic 'n+1')")
            code = struct.unpack(order + "h", head[70:72])[0]
            dims = struct.unpack(order + "8h", head[40:56])
            vox_offset = struct.unpack(order + "f", head[108:112])[0]
            break
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540:
            raise _refuse(what, "a NIfTI-2 file, which the image reader here (ITK) does not read; save it as "
                                "NIfTI-1")
    else:
        raise _unreadable(what, "not a NIfTI-1 or NIfTI-2 file")
    if code not in NIFTI_TYPE_BYTES:
        raise _refuse(what, f"NIfTI datatype {code} is not a number type read here")
    if not 1 <= dims[0] <= 7 or min(dims[1:dims[0] + 1]) < 1:
        raise _unreadable(what, f"its NIfTI dimensions {tuple(dims)} are not valid")
    if not (vox_offset == int(vox_offset) and 352 <= vox_offset <= MAX_HEADER_BYTES):
        raise _refuse(what, f"its voxels start at byte {vox_offset:.0f}, outside 352..{MAX_HEADER_BYTES}")
    sizes = tuple(int(d) for d in dims[1:dims[0] + 1])
    return HeaderFacts("NiftiImageIO", sizes, math.prod(sizes), NIFTI_TYPE_BYTES[code],
                       "nifti-gz" if gz else "raw", int(vox_offset))


def _counted(stream, limit: int) -> int:
    """Bytes a decompressing stream yields, read in chunks and dropped; stops once past ``limit``."""
    n = 0
    while n <= limit:
        chunk = stream.read(CHUNK)
        if not chunk:
            break
        n += len(chunk)
    return n


def _inflated(f, limit: int) -> int:
    """Bytes a zlib or gzip stream (MetaImage's compressed voxels) inflates to, at most ``limit`` + 1 counted."""
    inflate = zlib.decompressobj(47)  # 32 + 15: a zlib or a gzip header, as MetaIO accepts
    n = 0
    while n <= limit and not inflate.eof:
        data = f.read(CHUNK)
        if not data:
            break
        while data and n <= limit:
            n += len(inflate.decompress(data, CHUNK))
            data = inflate.unconsumed_tail
    return n


def _check_voxel_bytes(path: Path, what: str, facts: HeaderFacts) -> None:
    """The voxel bytes of the file (decompressed) are exactly what its header declares."""
    expected = facts.values * facts.value_bytes
    try:
        if facts.encoding == "raw":
            found = path.stat().st_size - facts.offset
        elif facts.encoding == "nifti-gz":  # the header is inside the gzip stream too
            with gzip.open(path, "rb") as f:
                found = _counted(f, facts.offset + expected) - facts.offset
        else:
            with open(path, "rb") as raw:
                raw.seek(facts.offset)
                if facts.encoding == "gzip":
                    with gzip.GzipFile(fileobj=raw) as f:
                        found = _counted(f, expected)
                elif facts.encoding == "bzip2":
                    with bz2.BZ2File(raw) as f:
                        found = _counted(f, expected)
                else:
                    found = _inflated(raw, expected)
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise _unreadable(what, f"its compressed voxels are damaged: {reason(exc)}") from None
    if found != expected:
        more = "more" if found > expected else "fewer"
        raise _refuse(what, f"it holds {more} voxel bytes than its header declares ({expected:,} = "
                            f"{' x '.join(str(s) for s in facts.sizes)} x {facts.value_bytes} bytes)")


def _check_with_itk(path: Path, what: str, facts: HeaderFacts, layers_allowed: bool) -> None:
    """SimpleITK's reading of the header, with the format's own ImageIO only: the same number of values as the
    parse here, a 3-D scalar volume (a label part's .seg.nrrd: layers allowed)."""
    reader = sitk.ImageFileReader()
    reader.SetImageIO(facts.imageio)
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _unreadable(what, reason(exc).replace(str(path), "the file")) from None
    size, components = reader.GetSize(), reader.GetNumberOfComponents()
    if math.prod(size) * components != facts.values:
        raise _refuse(what, f"its header reads as {size} x {components} values here and {facts.sizes} in its "
                            "text; save it again")
    if not (layers_allowed and components > 1):
        check_shape(components, size, what)

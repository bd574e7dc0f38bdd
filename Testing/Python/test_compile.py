"""``--compile`` on a CPU: the network is compiled ahead of time once, cached on disk under a key of its
weights, method and input shapes, loaded (not rebuilt) by a later process, and gives the labels the
uncompiled network gives."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import save_in_authors_format
from iris_core.commands.cli import main as cli
from iris_core.errors import ConfigError
from iris_core.hub.checkpoint import load_checkpoint
from iris_core.models.config import IrisConfig
from iris_core.models.iris import IrisNet
from iris_core.pipeline.aot import BUILD_PREFIX, CompiledMethod, prune_cache


def _mass_like(seed: int = 0) -> IrisNet:
    """The MASS architecture in miniature (no memory bank: both segment and encode_task export)."""
    torch.manual_seed(seed)
    cfg = IrisConfig(channels=(4, 8, 32, 32, 32), num_block=(1, 1, 1, 1), query_tokens=2, attn_blocks=1,
                     pos_embed_size=32)
    return IrisNet(cfg).eval()


@pytest.fixture(scope="module")
def mass_like_file(tmp_path_factory):
    """Saved in the authors' training format: it gets the MASS pipeline (window 32 here)."""
    return save_in_authors_format(_mass_like().state_dict(), tmp_path_factory.mktemp("mass_like") / "mass_like.pth",
                                  32, 0.5)


def _segment_args(phantom_files, model, out) -> list[str]:
    return ["segment", "--target", str(phantom_files["tgt"]), "--reference", str(phantom_files["ref"]),
            str(phantom_files["ref_lab"]), "--model", str(model), "--device", "cpu", "--threads", "2", "--quiet",
            "--output", str(out)]


def _files_seen_while(proc: subprocess.Popen, folder: Path, pattern: str, timeout: float) -> set[Path]:
    """The files matching ``pattern`` in ``folder`` at any moment while ``proc`` runs (looked at every 50 ms;
    a build's files live for seconds), until it ends or ``timeout`` (then it is killed)."""
    seen: set[Path] = set()
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the process did not end within {timeout} s")
        try:
            seen.update(p.relative_to(folder) for p in folder.glob(pattern) if p.is_file())
        except FileNotFoundError:  # a build folder removed between listing and scanning it: look again
            pass
        time.sleep(0.05)
    return seen


@pytest.fixture(scope="module")
def compiled_cache(tmp_path_factory):
    """One cache for this module: the packages the CLI builds are the ones the other tests load."""
    return tmp_path_factory.mktemp("compiled")


@pytest.mark.slow
def test_compile_builds_once_per_machine_and_gives_the_uncompiled_labels(tmp_path, monkeypatch, phantom_files,
                                                                         mass_like_file, compiled_cache):
    cache = compiled_cache
    monkeypatch.setenv("IRIS_SEGMENT_COMPILED", str(cache))
    assert cli(_segment_args(phantom_files, mass_like_file, tmp_path / "eager.nii.gz")) == 0
    # the build, in a process where a library has set LC_CTYPE to "C" (ASCII text files) before: inductor
    # reads its UTF-8 templates with the locale's encoding, and the build once fell back to uncompiled there
    code = ("import locale, sys; locale.setlocale(locale.LC_CTYPE, 'C'); "
            "assert locale.getpreferredencoding(False) != 'UTF-8'; from iris_core.commands.cli import main; "
            f"sys.exit(main({[*_segment_args(phantom_files, mass_like_file, tmp_path / 'compiled.nii.gz'), '--compile']!r}))")
    # the build's own files go to a build- folder in our cache, not to inductor's default in the system's
    # temporary folder (TMPDIR here: an empty folder of the test's, and no TORCHINDUCTOR_CACHE_DIR): seen there
    # while the build runs, and nothing of the build in the temporary folder afterwards. Only inductor's
    # precompiled headers are there: torch keeps them in its default folder on purpose, "global, rather than
    # ignored by fresh_cache" (torch 2.13 _inductor/codecache.py, _HEADER_DIR), reused by later builds
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env, "IRIS_SEGMENT_COMPILED": str(cache), "TMPDIR": str(system_tmp)})
    build_files = _files_seen_while(proc, cache, f"{BUILD_PREFIX}*/**/*", timeout=900)
    stderr = proc.stderr.read()
    assert proc.returncode == 0 and "could not be compiled" not in stderr, stderr[-2000:]
    assert any(p.suffix in (".cpp", ".so", ".o") for p in build_files), sorted(build_files)[:20]
    left = [p.relative_to(system_tmp) for p in system_tmp.rglob("*") if p.is_file()]
    assert all(p.parts[0].startswith("torchinductor_") and p.parts[1] == "precompiled_headers" for p in left), left[:20]
    packages = sorted(cache.glob("*.pt2"))
    assert [p.name.split("-")[0] for p in packages] == ["encode_task", "segment"], packages
    eager = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "eager.nii.gz")))
    compiled = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "compiled.nii.gz")))
    assert eager.any() and (eager == compiled).mean() >= 0.999

    # inductor's build files (generated code, objects, a copy of the weights) are gone with the build:
    # the cache holds the two packages and nothing else
    assert sorted(cache.iterdir()) == packages
    # where a build puts them: inductor's cache folder is a new build- folder inside ours for the duration,
    # removed after, and the caller's setting comes back
    import torch._inductor.utils  # noqa: F401  (importing inductor sets its default folder itself)

    from iris_core.pipeline.aot import _build_files_in

    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    (tmp_path / "builds").mkdir()
    with _build_files_in(tmp_path / "builds"):
        inside = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
        assert (tmp_path / "builds") in inside.parents and inside.relative_to(tmp_path / "builds").parts[0].startswith(
            BUILD_PREFIX)
        inside.mkdir(parents=True, exist_ok=True)
        (inside / "generated.cpp").write_text("// a build file")
    assert not any((tmp_path / "builds").iterdir()) and os.environ.get("TORCHINDUCTOR_CACHE_DIR") == before

    # a later process loads the packages: nothing is compiled again (same files: a rebuild replaces
    # them), the result is the same, and each load marks its package as recently used
    stamps = {p: (p.stat().st_ino, p.stat().st_size) for p in packages}
    for p in packages:
        os.utime(p, (1_000_000_000, 1_000_000_000))
    code = ("import locale, sys; locale.setlocale(locale.LC_CTYPE, 'C'); from iris_core.commands.cli import main; "
            f"sys.exit(main({[*_segment_args(phantom_files, mass_like_file, tmp_path / 'again.nii.gz'), '--compile']!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          env={**os.environ, "IRIS_SEGMENT_COMPILED": str(cache)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(cache.glob("*.pt2")) == packages and {p: (p.stat().st_ino, p.stat().st_size) for p in packages} == stamps
    assert all(p.stat().st_mtime > 1_000_000_000 + 86400 for p in packages)
    assert not list(cache.glob("*.partial.pt2"))
    again = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "again.nii.gz")))
    assert np.array_equal(again, compiled)


@pytest.mark.slow
def test_bench_compares_the_compiled_network_with_eager(monkeypatch, mass_like_file, compiled_cache):
    """``bench --compile``: the compiled window's output against the eager one, and its speed, on the same model
    and cache as the CLI run above. Two classes, as the phantoms have: the CLI's package has the bench's key and
    is loaded, not rebuilt (a build is about 80 s on the 2-core machine; the CLI test covers building)."""
    from iris_core.commands.bench import format_table, run_benchmark

    monkeypatch.setenv("IRIS_SEGMENT_COMPILED", str(compiled_cache))
    built = sorted(compiled_cache.glob("segment-*.pt2"))
    res = run_benchmark([str(mass_like_file)], window=32, classes=(1, 2), repeats=1, compile=True)[0]
    assert "error" not in res, res
    assert res["compiled_max_abs_difference"] < 1e-3 and res["compiled_speedup"] > 0
    how = "loaded from the cache in" if res["compile_cached"] else "compiled ahead of time in"
    assert how in format_table([res]) and "per window of 2 classes" in format_table([res])
    after = sorted(compiled_cache.glob("segment-*.pt2"))
    if built:  # after the CLI test (the module's order): its package is the bench's, loaded
        assert res["compile_cached"] and after == built
    else:  # this test alone: it builds the one package
        assert not res["compile_cached"] and len(after) == 1


@pytest.mark.slow
def test_compiled_calls_do_not_drift(mass_like_file, compiled_cache):
    """Call after call, with other inputs in between, the compiled encoder and decoder give what the
    model gives (an inductor fusion once wrote into a weight on the first call: every later
    embedding was off by up to 0.1). Same shapes as the CLI run above: its packages are loaded."""
    model = load_checkpoint(mass_like_file).model.eval()
    enc = CompiledMethod(model, "encode_task", directory=compiled_cache)
    seg = CompiledMethod(model, "segment", list_arg=True, directory=compiled_cache)
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(1, 1, 32, 32, 32, generator=g) * s + s for s in (1.0, 3.0)]
    masks = [(torch.rand(1, 1, 32, 32, 32, generator=g) > t).float() for t in (0.8, 0.3)]
    with torch.inference_mode():
        expect = [model.encode_task(i, m) for i, m in zip(images, masks)]
        for n in (0, 0, 1, 0, 1):
            got = enc(images[n], masks[n])
            assert max(float((a - b).abs().max()) for a, b in zip(got, expect[n])) < 1e-4
        tokens = [torch.cat([a, b], dim=1) for a, b in zip(*expect)]  # two classes
        logits = [model.segment(i, tokens) for i in images]
        for n in (0, 1, 0):
            assert float((seg(images[n], tokens) - logits[n]).abs().max()) < 1e-4 * max(1.0, float(logits[n].abs().max()))
    assert enc.fallback is None and seg.fallback is None


def test_a_package_is_keyed_by_the_weights_method_and_shapes(tmp_path):
    """A package built for other weights, another method or other input shapes is never loaded."""
    x = torch.zeros(1, 1, 32, 32, 32)
    tokens = [torch.zeros(1, 2, 3, 32)] * 3
    a = CompiledMethod(_mass_like(0), "segment", list_arg=True, directory=tmp_path)
    same = CompiledMethod(_mass_like(0), "segment", list_arg=True, directory=tmp_path)
    other = CompiledMethod(_mass_like(1), "segment", list_arg=True, directory=tmp_path)
    assert a.path((x, *tokens)) == same.path((x, *tokens))
    assert a.path((x, *tokens)) != other.path((x, *tokens))
    assert a.path((x, *tokens)) != a.path((torch.zeros(1, 1, 64, 64, 64), *tokens))
    assert a.path((x, *tokens)) != a.path((x, *[t[:, :1] for t in tokens]))
    enc = CompiledMethod(_mass_like(0), "encode_task", directory=tmp_path)
    assert enc.path((x, x)).name.startswith("encode_task-") and a.path((x, *tokens)).parent == tmp_path


def test_a_network_that_cannot_be_exported_runs_uncompiled_and_says_why(tmp_path, caplog, tiny_model):
    """The bundled model's memory sample is data-dependent: forcing its encode_task through export
    falls back to the model's own method (same embedding) with a warning naming the cause, and the
    model still works uncompiled afterwards (export leaves no traced state behind)."""
    model = tiny_model.model.eval()
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 1, 32, 32, 32, generator=g)
    masks = (torch.rand(1, 2, 32, 32, 32, generator=g) > 0.8).float()
    enc = CompiledMethod(model, "encode_task", directory=tmp_path)
    with torch.inference_mode():
        expect = model.encode_task(ref, masks)
        with caplog.at_level("WARNING", logger="iris_core.pipeline.aot"):
            got = enc(ref, masks)
        again = model.encode_task(ref, masks)
    assert enc.fallback and "encode_task could not be compiled" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(expect, got)) and all(torch.equal(a, b) for a, b in zip(expect, again))
    assert not list(tmp_path.glob("*.pt2"))


def test_the_cache_keeps_its_budget_removing_the_least_recently_used(tmp_path, monkeypatch):
    """Over budget, the oldest packages go first; the one just built or loaded never; partial files and
    other files are not packages and are left alone; a bad budget names the variable."""
    sizes = {"a": 400, "b": 300, "c": 200, "d": 100}
    for age, (name, size) in enumerate(sizes.items()):  # a: least recently used
        p = tmp_path / f"segment-{name}.pt2"
        p.write_bytes(b"x" * size)
        os.utime(p, (1_000_000 + age, 1_000_000 + age))
    (tmp_path / "segment-e.123.partial.pt2").write_bytes(b"x" * 1000)
    (tmp_path / "notes.txt").write_text("kept")
    keep = tmp_path / "segment-a.pt2"
    removed = prune_cache(tmp_path, keep=keep, budget=650)
    # 1000 bytes of packages: a (oldest) is kept, b goes (700 left), then c (500 <= 650); d stays
    assert [p.name for p in removed] == ["segment-b.pt2", "segment-c.pt2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "segment-a.pt2", "segment-d.pt2",
                                                          "segment-e.123.partial.pt2"]
    assert prune_cache(tmp_path, budget=10_000) == [] and prune_cache(tmp_path, budget=0) == []
    monkeypatch.setenv("IRIS_SEGMENT_COMPILED_MAX_MB", "lots")
    with pytest.raises(ConfigError, match="IRIS_SEGMENT_COMPILED_MAX_MB"):
        CompiledMethod(_mass_like(0), "segment", list_arg=True, directory=tmp_path)
    monkeypatch.setenv("IRIS_SEGMENT_COMPILED_MAX_MB", "0.0004")  # 419 bytes < 500: a, the oldest, goes
    assert [p.name for p in prune_cache(tmp_path)] == ["segment-a.pt2"]

"""retain_freed_memory: a process of ours reuses the activations it frees instead of faulting them in
again for every window (glibc; elsewhere it reports that it did not apply)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

# six 128^3 "windows" through a small real 3-D network (activations of 134 MB each), counting the minor
# page faults of each window (/proc/self/stat, field 10): memory the kernel had to hand over afresh
SCRIPT = r"""
import json, sys, torch
from iris_core.pipeline.device import retain_freed_memory, retained_free_bytes

applied = retain_freed_memory() if sys.argv[1] != "default" else False
if sys.argv[1] == "applied-only":
    print(json.dumps({"applied": applied}))
    sys.exit()
torch.set_num_threads(2)

def faults():
    return int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[7])

net = torch.nn.Sequential(torch.nn.Conv3d(1, 16, 3, padding=1), torch.nn.InstanceNorm3d(16), torch.nn.ReLU(),
                          torch.nn.Conv3d(16, 16, 3, padding=1), torch.nn.InstanceNorm3d(16), torch.nn.ReLU(),
                          torch.nn.Conv3d(16, 2, 1)).eval()
per_window = []
with torch.inference_mode():
    for _ in range(6):
        before = faults()
        y = net(torch.randn(1, 1, 128, 128, 128)).softmax(1)
        del y
        per_window.append(faults() - before)
print(json.dumps({"applied": applied, "faults": per_window, "retained": retained_free_bytes()}))
"""

glibc_linux = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                 reason="retain_freed_memory acts on glibc's allocator only (Linux)")


def run(mode: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=300,
                         env=os.environ | env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_linux
def test_freed_memory_is_reused_window_after_window():
    default, retained = run("default"), run("retain")
    assert not default["applied"] and retained["applied"]
    page = os.sysconf("SC_PAGE_SIZE")  # test-side only (Linux): the product code never calls it
    # by default every window gets its activations afresh from the kernel (over 134 MB of faults each) ...
    assert min(default["faults"][2:]) * page > 134 * 2**20
    # ... retained, the later windows reuse what the earlier ones freed
    assert sum(retained["faults"][2:]) < 0.1 * sum(default["faults"][2:])
    # what the process keeps for reuse is counted as available to it (the memory checks stay right)
    assert retained["retained"] > 134 * 2**20 and default["retained"] == 0


@glibc_linux
def test_the_opt_out_leaves_the_allocator_alone():
    assert run("applied-only")["applied"]
    assert not run("applied-only", IRIS_SEGMENT_RETAIN_MEMORY="0")["applied"]

"""The memory guard's estimate bounds what a call really takes, and its refusal says how many images fit."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastdiff import memory

# Resident memory one call adds to a warmed-up pipeline, in a fresh process: the kernel's high-water mark of the
# resident set (VmHWM, reset by writing 5 to /proc/self/clear_refs just before the call), over the resident set then.
# glibc is made to map every allocation above 64 KiB on its own and unmap it when freed (MALLOC_MMAP_THRESHOLD_), so
# the resident set follows the live tensors: with its usual heap, memory freed by earlier work and kept by the
# allocator made the same call measure anywhere from 241 to 310 MiB (209 MiB live) from one run to the next.
PROBE = """
import ctypes, gc, json, sys
import torch
from fastdiff import memory
from fastdiff.pipeline import load_cached

def status_bytes(field):
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB

torch.set_num_threads(2)
images, size, output_type = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
pipe = load_cached(None, "cpu")
pipe("a red circle", 1, height=64, width=64, seed=0, progress=False)
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := the current resident set
before = status_bytes("VmRSS")
pipe("a red circle", 1, height=size, width=size, seed=0, num_images=images, output_type=output_type, progress=False)
peak = status_bytes("VmHWM")
need = memory.estimate(pipe.unet.config, pipe.vae.config, pipe.dtype, images, 2 * images, size, size,
                       decode=output_type != "latent")
print(json.dumps({"peak": peak - before, "estimate": need.device + need.host}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm and calls glibc")
@pytest.mark.parametrize("images, size, output_type", [(16, 256, "pil"), (64, 128, "latent")])
def test_the_estimate_bounds_the_measured_peak_of_the_default_model(images, size, output_type):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    done = subprocess.run([sys.executable, "-c", PROBE, str(images), str(size), output_type], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{images} x {size}^2 {output_type}: peak {got['peak'] / 2**20:.0f} MiB, "
          f"estimate {got['estimate'] / 2**20:.0f} MiB")
    assert got["peak"] <= got["estimate"], "the guard would let through a request that does not fit"
    # room for the allocator's slack over the live peak (up to 1.5x of it above), and not much more
    assert got["estimate"] <= 2.5 * got["peak"], "the guard would refuse requests that fit"


def test_a_refusal_says_how_many_images_fit():
    need = memory.Estimate(device=10 * memory.GIB, host=0)
    with pytest.raises(ValueError) as e:
        memory.check(need, 10, 512, 768, torch.device("cpu"), limit=3 * memory.GIB + 1)
    assert str(e.value) == ("10 image(s) of 768x512 need about 10.0 GiB of working memory on cpu, 3.0 GiB allowed: "
                            "at most 3 fit at this size; ask for fewer or smaller images, or raise the memory limit")
    memory.check(need, 10, 512, 768, torch.device("cpu"), limit=10 * memory.GIB)  # exactly enough passes


def test_the_estimate_grows_with_images_and_pixels():
    from fastdiff.models import UNetConfig, VAEConfig

    unet, vae = UNetConfig(), VAEConfig(block_out_channels=(128, 256, 512, 512))  # SD1.5
    one = memory.estimate(unet, vae, torch.float16, 1, 2, 512, 512, decode=True)
    assert memory.estimate(unet, vae, torch.float16, 4, 8, 512, 512, decode=True).device == 4 * one.device
    assert memory.estimate(unet, vae, torch.float16, 1, 2, 1024, 1024, decode=True).device == 4 * one.device
    assert memory.estimate(unet, vae, torch.float32, 1, 2, 512, 512, decode=True).device == 2 * one.device
    # SD1.5 at 512x512 in fp16: the decoder's 6 x 256 values per pixel (its measured peak is 547 MB reserved)
    assert one.device == 512 * 512 * 6 * 256 * 2

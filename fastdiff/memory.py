"""The memory guard: a request's working memory, estimated before anything is allocated, against what the device has.

A call runs the UNet at (images x 2 with guidance) rows on the latents, then the VAE decoder on every image at full
size; their activations are alive one stage at a time, so the peak is the larger of the two. Both grow linearly
with the batch and the pixels, with a width per pixel read from the model's config:

    UNet      UNET_LIVE x block_out_channels[0] values per latent pixel and row (the top level's GEGLU
              intermediate is 16 widths; the skip connections, norms and attention the rest)
    decoder   VAE_LIVE x block_out_channels[1] values per output pixel (the top level runs on the upsampled
              second-level width: its input, norm output, convolution output and shortcut)

in the models' dtype. The finished images (float32 and 8-bit copies) are held in host memory until returned.
The factors are upper bounds of measured peaks, with room for the allocator's moods (tests/test_memory.py checks
them on the default model): the embedded default model on a CPU, float32, 1 to 64 images of 128x128 to 1024x1024,
peaked at 0.59 to 0.94 of the estimate with decoding and 0.54 to 0.57 as latents in resident memory (glibc's heap
keeps freed memory, so that figure moves from run to run: 0.47 to 0.61 for 64 latents of 128x128), and its live
allocations at 0.58 (16 images of 256x256) and 0.41 (64 latents of 128x128); SD1.5 fp16 on an H200 at 512x512 took
362 MB allocated (547 MB reserved) per image beyond the first, against 805 MB estimated.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

UNET_LIVE = 64
VAE_LIVE = 6
HOST_OUTPUT_BYTES = 3 * (4 + 4 + 1)  # per pixel: the float32 images, their numpy copy and the 8-bit image
GIB = 2**30


@dataclass
class Estimate:
    """Bytes a request needs beyond the loaded weights: on the models' device, and in host memory."""

    device: int
    host: int


def estimate(unet_config, vae_config, dtype: torch.dtype, images: int, rows: int, height: int, width: int,
             decode: bool) -> Estimate:
    """Working memory of sampling `images` images at height x width with the UNet at `rows` rows per call."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    factor = 2 ** (len(vae_config.block_out_channels) - 1)
    latent_pixels = (height // factor) * (width // factor)
    unet = rows * latent_pixels * UNET_LIVE * unet_config.block_out_channels[0] * itemsize
    widths = vae_config.block_out_channels
    vae = images * height * width * VAE_LIVE * widths[min(1, len(widths) - 1)] * itemsize if decode else 0
    host = images * height * width * HOST_OUTPUT_BYTES if decode else 0
    return Estimate(device=max(unet, vae), host=host)


def available(device: torch.device) -> int:
    """Bytes free for new tensors on `device`: CUDA's free memory plus what torch's allocator holds unused; on the
    CPU the kernel's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return host_available()


def host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check(need: Estimate, images: int, height: int, width: int, device: torch.device,
          limit: Optional[int] = None) -> None:
    """ValueError, saying how many images fit, when `need` exceeds what is available (or `limit` bytes of working
    memory on the device, when given)."""
    budgets = [(need.device, limit if limit is not None else available(device), str(device))]
    if device.type != "cpu":
        budgets.append((need.host, host_available(), "host memory"))
    else:
        budgets[0] = (need.device + need.host, budgets[0][1], "cpu")
    for bytes_needed, bytes_free, where in budgets:
        if bytes_needed <= bytes_free:
            continue
        fits = images * bytes_free // bytes_needed
        raise ValueError(
            f"{images} image(s) of {width}x{height} need about {bytes_needed / GIB:.1f} GiB of working memory on "
            f"{where}, {bytes_free / GIB:.1f} GiB {'allowed' if limit is not None else 'available'}: "
            + (f"at most {fits} fit at this size" if fits else "not one fits at this size")
            + "; ask for fewer or smaller images" + ("" if limit is None else ", or raise the memory limit"))

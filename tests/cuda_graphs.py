"""CUDA-graph helpers for the GPU tests: `capture`, for the tests that check an op replays correctly, and
`fast_engine`, for the tests of the fast path's graph-replayed model calls."""
import torch


def capture(fn, warm: bool = True):
    """Capture fn() into a new CUDA graph; return (graph, what fn returned during the capture), the static
    outputs a replay rewrites. warm: call fn once first, on a side stream as capture requires, so that compiles,
    autotuning and lazy initialisation happen outside the capture (False when the caller has just called it)."""
    if warm:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def fast_engine(unet=None, *, vae=None, text_encoder=None, config=None):
    """A `fastdiff.engine.FastEngine` over the given fastdiff models (on the GPU; the engine converts them in place),
    for the tests of one of its parts: the UNet's calls (`denoiser`, `eager_call`, their graphs) or the text
    encoder's (`encode_text`). The engine takes all three models: tiny random stand-ins, in the given ones' dtype
    and device, for those not given, which such a test never calls."""
    from fastdiff.engine import FastEngine
    from fastdiff.models import (AutoencoderKL, CLIPTextConfig, CLIPTextModel, UNet2DConditionModel, UNetConfig,
                                 VAEConfig)

    given = next(m for m in (unet, vae, text_encoder) if m is not None)
    weight = next(given.parameters())
    with torch.device(weight.device):
        if unet is None:
            unet = UNet2DConditionModel(UNetConfig(
                block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
                attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))).to(weight.dtype).eval().requires_grad_(False)
        if vae is None:
            vae = AutoencoderKL(VAEConfig(block_out_channels=(32,), norm_num_groups=8)).to(weight.dtype).eval()
        if text_encoder is None:
            text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=1, num_attention_heads=2))
            text_encoder = text_encoder.to(weight.dtype).eval()
    return FastEngine(unet, vae.requires_grad_(False), text_encoder.requires_grad_(False), config)

"""Full-size SD1.5 and SD2.1 architectures with random weights on a GPU: fastdiff in float16 must be as close
to a float32 reference as diffusers/transformers in float16 are (error <= 2x theirs + 1e-3).

The reference is the oracle library in float32 with TF32 off. fastdiff runs two ways (`path`): its reference
modules as written (plain PyTorch, what `fastdiff.engine.Engine` runs), and the fast path's fused modules over
the same weights (`FastUNet`, `fast_vae`, `FastEngine`'s text encoder, as `FastEngine` runs them) on the `auto`
backend, so this also checks the Triton kernels inside real models. Run on the device: `pytest -m gpu`.
"""
import pytest
import torch

pytestmark = pytest.mark.gpu
PATHS = ["reference", "fast"]

SD15_UNET = dict(cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False)
SD21_UNET = dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
                 upcast_attention=True)
SD_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
SD15_CLIP = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 hidden_act="quick_gelu", projection_dim=768)
SD21_CLIP = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 hidden_act="gelu", projection_dim=512)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def judge(name, ours16, theirs16, ref32):
    e_ours, e_theirs = rel(ours16, ref32), rel(theirs16, ref32)
    print(f"{name}: fastdiff fp16 err {e_ours:.2e}, oracle fp16 err {e_theirs:.2e} (vs fp32 reference)")
    assert torch.isfinite(ours16).all()
    assert e_ours <= 2 * e_theirs + 1e-3


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def three_ways(oracle, ours_cls, ours_cfg, run_oracle, run_ours):
    """(fastdiff fp16, oracle fp16, oracle fp32) outputs for identical weights."""
    ours = ours_cls(ours_cfg)
    ours.load_state_dict(oracle.state_dict(), strict=True)
    ref = run_oracle(oracle.cuda().float())
    theirs = run_oracle(oracle.half())
    mine = run_ours(ours.cuda().half())
    return mine, theirs, ref


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("arch", ["sd15", "sd21"])
@torch.no_grad()
def test_unet_fp16_parity_full_size(arch, path):
    from diffusers import UNet2DConditionModel as Oracle

    from fastdiff.engine import FastConfig, FastUNet
    from fastdiff.models import UNet2DConditionModel, UNetConfig

    torch.manual_seed(0)
    oracle = Oracle(**(SD15_UNET if arch == "sd15" else SD21_UNET)).eval()
    cfg = UNetConfig.from_dict(dict(oracle.config))
    x = torch.randn(2, 4, 64, 64, device="cuda")
    ctx = torch.randn(2, 77, oracle.config.cross_attention_dim, device="cuda")
    t = torch.tensor([999.0, 250.0], device="cuda")

    def run_ours(m):
        if path == "reference":
            return m(x.half(), t, ctx.half()).float()
        x_in = x.half().contiguous(memory_format=torch.channels_last)  # the layout FastEngine passes
        return FastUNet(m, FastConfig())(x_in, t, ctx.half()).float()

    mine, theirs, ref = three_ways(
        oracle, UNet2DConditionModel, cfg,
        lambda m: m(x.to(m.dtype), t, ctx.to(m.dtype)).sample.float(), run_ours)
    judge(f"unet {arch} {path}", mine, theirs, ref)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("part", ["decode", "encode"])
@torch.no_grad()
def test_vae_fp16_parity_full_size(part, path):
    from diffusers import AutoencoderKL as Oracle

    from fastdiff.engine import FastConfig, fast_vae
    from fastdiff.models import AutoencoderKL, VAEConfig

    torch.manual_seed(0)
    oracle = Oracle(**SD_VAE).eval()
    cfg = VAEConfig.from_dict(dict(oracle.config))
    ours = (lambda m: m) if path == "reference" else (lambda m: fast_vae(m, FastConfig()))
    if part == "decode":
        z = torch.randn(1, 4, 64, 64, device="cuda")
        run_oracle = lambda m: m.decode(z.to(m.dtype)).sample.float()  # noqa: E731
        run_ours = lambda m: ours(m).decode(z.half()).float()  # noqa: E731
    else:
        img = torch.rand(1, 3, 512, 512, device="cuda") * 2 - 1
        run_oracle = lambda m: m.encode(img.to(m.dtype)).latent_dist.mean.float()  # noqa: E731
        run_ours = lambda m: ours(m).encode(img.half()).float()  # noqa: E731
    mine, theirs, ref = three_ways(oracle, AutoencoderKL, cfg, run_oracle, run_ours)
    judge(f"vae {part} {path}", mine, theirs, ref)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("arch", ["sd15", "sd21"])
@torch.no_grad()
def test_text_encoder_fp16_parity_full_size(arch, path):
    from transformers import CLIPTextConfig as OracleConfig
    from transformers import CLIPTextModel as Oracle

    from cuda_graphs import fast_engine
    from fastdiff.models import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    oracle = Oracle(OracleConfig(**(SD15_CLIP if arch == "sd15" else SD21_CLIP))).eval()
    cfg = CLIPTextConfig.from_dict(oracle.config.to_dict())
    ids = torch.randint(0, 49406, (2, 77), device="cuda")

    def run_ours(m):
        if path == "reference":
            return m(ids).float()
        return fast_engine(text_encoder=m).encode_text(ids).float()  # fused q/k/v, replayed from its CUDA graph

    mine, theirs, ref = three_ways(
        oracle, CLIPTextModel, cfg,
        lambda m: m(ids).last_hidden_state.float(), run_ours)
    judge(f"text encoder {arch} {path}", mine, theirs, ref)

"""fastdiff._C's fused sampling update (csrc/) against `scheduler_step_ref`, on CPU and (marked gpu) CUDA.

Coefficients come from real solvers at one step each, so every specialisation the kernels have (guidance
or not, prev_x0 or not, noise or not) is hit the way the samplers hit it.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

from fastdiff import _ext, ops
from fastdiff.kernels.scheduler_step import scheduler_step_ref
from step_cases import SOLVERS
from cuda_graphs import capture

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# dtype -> (rtol, atol as a fraction of max|ref|). Both sides compute in float32 (float64) and round once,
# so low precision differs by at most one rounding (rtol >= the dtype's eps); the atol covers values that
# cancel to near zero, where float32 rounding of the intermediate terms (FMA or not) dominates.
TOLERANCES = {torch.float64: (1e-12, 1e-13), torch.float32: (1e-5, 1e-6), torch.float16: (1e-3, 1e-5),
              torch.bfloat16: (8e-3, 1e-5)}
GUIDANCE = 7.5


@pytest.fixture
def ext():
    assert _ext._C is not None, f"fastdiff._C did not load: {_ext._load_error}"
    return _ext._C


def device_ready(device: str) -> None:
    ok, why = _ext.availability(device)
    assert ok, f"fastdiff._C cannot run on {device}: {why}"


def operands(shape, dtype, device, guided, generator_dtype=torch.float32):
    """x, model_output, prev_x0, noise with distinct random values, in `dtype` on `device`."""
    batch = shape[0]
    mo_shape = (2 * batch, *shape[1:]) if guided else shape
    make = lambda s: torch.randn(s, dtype=generator_dtype).to(device=device, dtype=dtype)
    return make(shape), make(mo_shape), make(shape), make(shape)


def poison_allocator(like: torch.Tensor) -> None:
    """On CUDA, free a NaN-filled block big enough for both outputs, so that an output element the kernel
    fails to write shows up as NaN instead of as stale plausible data."""
    if like.is_cuda:
        torch.full((2 * like.numel() + 1024,), float("nan"), dtype=like.dtype, device=like.device)


def assert_matches(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    rtol, atol_frac = TOLERANCES[ref.dtype]
    diff = (ours.double() - ref.double()).abs()
    scale = ref.double().abs().max().item()
    print(f"{what}: max |diff| {diff.max().item():.3e}, mean {diff.mean().item():.3e}, max |ref| {scale:.3e}")
    assert ours.shape == ref.shape and ours.dtype == ref.dtype and ours.device == ref.device
    assert torch.isfinite(ours).all(), f"{what}: non-finite values (an element left unwritten?)"
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol_frac * scale)


@pytest.mark.parametrize("shape", [(3, 4, 17, 13), (2, 4, 65, 67)], ids=["odd_3x4x17x13", "multithread_2x4x65x67"])
@pytest.mark.parametrize("guided", [False, True], ids=["no_cfg", "cfg"])
@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference_for_every_solver(ext, device, dtype, solver, guided, shape):
    device_ready(device)
    x, mo, prev, noise = operands(shape, dtype, device, guided)
    coeffs = SOLVERS[solver]
    g = GUIDANCE if guided else None
    poison_allocator(x)
    x_next, x0 = ext.scheduler_step(x, mo, coeffs, g, prev, noise)
    ref_next, ref_x0 = scheduler_step_ref(x, mo, coeffs, g, prev, noise)
    assert_matches(x0, ref_x0, "x0")
    assert_matches(x_next, ref_next, "x_next")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_misaligned_views_take_the_scalar_path_correctly(ext, device, dtype):
    # Contiguous views starting one element into their storage: no pointer is 16-byte aligned, so the CUDA
    # kernel must not use 16-byte accesses; (1, 3, 5, 7) also leaves a tail after any whole 16-byte packs.
    device_ready(device)
    shape = (1, 3, 5, 7)
    n = math.prod(shape)
    views = [torch.randn(k * n + 1).to(device=device, dtype=dtype)[1:].view(k * shape[0], *shape[1:])
             for k in (1, 2, 1, 1)]
    coeffs = SOLVERS["dpmpp_2m_sde"]
    poison_allocator(views[0])
    ours = ext.scheduler_step(*views[:2], coeffs, GUIDANCE, *views[2:])
    ref = scheduler_step_ref(*views[:2], coeffs, GUIDANCE, *views[2:])
    for o, r, what in zip(ours, ref, ("x_next", "x0")):
        assert_matches(o, r, what)


@pytest.mark.parametrize("operand", ["x", "model_output", "prev_x0", "noise"])
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input_is_rejected_by_the_extension(ext, device, operand):
    device_ready(device)
    args = dict(zip(("x", "model_output", "prev_x0", "noise"), operands((2, 4, 6, 5), torch.float32, device, True)))
    args[operand] = args[operand].transpose(-1, -2).contiguous().transpose(-1, -2)  # same shape, strided
    assert not args[operand].is_contiguous()
    with pytest.raises(ValueError, match=f"{operand} must be contiguous.*, got strides"):
        ext.scheduler_step(args["x"], args["model_output"], SOLVERS["dpmpp_2m_sde"], GUIDANCE, args["prev_x0"],
                           args["noise"])


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_inputs_run_in_place_of_layout(ext, device):
    # A channels_last UNet returns channels_last model_output: with x channels_last too, no copy is needed.
    device_ready(device)
    x, mo, prev, noise = (t.contiguous(memory_format=torch.channels_last)
                          for t in operands((2, 4, 6, 5), torch.float32, device, True))
    coeffs = SOLVERS["dpmpp_2m_sde"]
    ours = ext.scheduler_step(x, mo, coeffs, GUIDANCE, prev, noise)
    ref = scheduler_step_ref(x, mo, coeffs, GUIDANCE, prev, noise)
    for o, r, what in zip(ours, ref, ("x_next", "x0")):
        assert o.is_contiguous(memory_format=torch.channels_last)
        assert_matches(o, r, what)
    with pytest.raises(ValueError, match="noise must be channels_last like x, got strides"):
        ext.scheduler_step(x, mo, coeffs, GUIDANCE, prev, noise.contiguous())


@pytest.mark.parametrize("layout", ["transposed", "mixed"])
@pytest.mark.parametrize("device", DEVICES)
def test_strided_input_is_handled_by_the_seam_wrapper(ext, device, layout):
    device_ready(device)
    x, mo, prev, noise = operands((2, 4, 6, 5), torch.float32, device, True)
    if layout == "transposed":  # nothing dense: everything is copied to contiguous
        x, mo, prev, noise = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (x, mo, prev, noise))
    else:  # channels_last model output, contiguous sample: the output is copied into x's layout
        mo = mo.contiguous(memory_format=torch.channels_last)
    assert not mo.is_contiguous()
    coeffs = SOLVERS["dpmpp_2m_sde"]
    ours = _ext.scheduler_step(x, mo, coeffs, GUIDANCE, prev, noise)
    ref = scheduler_step_ref(x, mo, coeffs, GUIDANCE, prev, noise)
    for o, r, what in zip(ours, ref, ("x_next", "x0")):
        assert_matches(o, r, what)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments_raise_value_errors_naming_the_value(ext, device):
    device_ready(device)
    x, mo, prev, noise = operands((2, 4, 6, 5), torch.float32, device, True)
    euler, dpm = SOLVERS["euler"], SOLVERS["dpmpp_2m"]
    cases = [
        (lambda: ext.scheduler_step(x, mo[:2], euler, GUIDANCE), r"model_output has shape \[2, 4, 6, 5\], expected "
                                                                 r"\[4, 4, 6, 5\] \(2B, ...\) = \[uncond; cond\]"),
        (lambda: ext.scheduler_step(x, mo, euler), r"model_output has shape \[4, 4, 6, 5\], expected \[2, 4, 6, 5\]"),
        (lambda: ext.scheduler_step(x, mo.double(), euler, GUIDANCE), "model_output has dtype Double, expected x's"),
        (lambda: ext.scheduler_step(x, mo, dpm, GUIDANCE), "coefficient a_p=.* needs prev_x0, got None"),
        (lambda: ext.scheduler_step(x, mo, SOLVERS["euler_ancestral"], GUIDANCE), "a_n=.* needs noise, got None"),
        (lambda: ext.scheduler_step(x, mo, dpm, GUIDANCE, prev[:1]), r"prev_x0 has shape \[1, 4, 6, 5\]"),
        (lambda: ext.scheduler_step(x.int(), mo.int(), euler, GUIDANCE), "x must be float16, bfloat16, float32 or "
                                                                         "float64, got Int"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("device", DEVICES)
def test_operand_with_zero_coefficient_is_ignored_like_the_reference(ext, device):
    device_ready(device)
    x, mo, prev, noise = operands((2, 4, 6, 5), torch.float32, device, True)
    # Unread, so neither its NaNs nor its strides matter.
    nan_prev = torch.full_like(prev, float("nan")).transpose(-1, -2).contiguous().transpose(-1, -2)
    x_next, x0 = ext.scheduler_step(x, mo, SOLVERS["euler"], GUIDANCE, nan_prev, None)
    ref_next, ref_x0 = scheduler_step_ref(x, mo, SOLVERS["euler"], GUIDANCE, nan_prev, None)
    assert_matches(x_next, ref_next, "x_next")
    assert_matches(x0, ref_x0, "x0")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_returns_empty_outputs(ext, device):
    device_ready(device)
    x = torch.empty(0, 4, 8, 8, device=device)
    x_next, x0 = ext.scheduler_step(x, x, SOLVERS["euler"])
    assert x_next.shape == x0.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
def test_matches_the_triton_kernel(ext, device):
    device_ready(device)
    try:
        from fastdiff.kernels.scheduler_step import scheduler_step as triton_step
    except ImportError:
        pytest.skip("kernels/scheduler_step.py has no Triton `scheduler_step` yet")
    ok, why = ops.availability("triton", device)
    if not ok:
        pytest.skip(f"Triton cannot run on {device}: {why}")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x, mo, prev, noise = operands((3, 4, 17, 13), dtype, device, True)
        coeffs = SOLVERS["dpmpp_2m_sde"]
        ours = ext.scheduler_step(x, mo, coeffs, GUIDANCE, prev, noise)
        theirs = triton_step(x, mo, coeffs, GUIDANCE, prev, noise)
        for o, t, what in zip(ours, theirs, ("x_next", "x0")):
            assert_matches(o, t, f"{dtype} {what} vs triton")


def test_auto_backend_picks_the_extension_on_cpu(ext):
    with ops.use_backend("auto", op="scheduler_step"):
        assert ops.resolve("scheduler_step", "cpu") == "cuda"  # the `cuda` backend is fastdiff._C, C++ half
        x, mo, prev, noise = operands((2, 4, 6, 5), torch.float32, "cpu", True)
        via_seam = ops.scheduler_step(x, mo, SOLVERS["dpmpp_2m"], GUIDANCE, prev)
    direct = ext.scheduler_step(x, mo, SOLVERS["dpmpp_2m"], GUIDANCE, prev)
    assert all(torch.equal(a, b) for a, b in zip(via_seam, direct))


def test_cpu_only_build_reports_why_cuda_is_unavailable(ext):
    if ext.with_cuda:
        pytest.skip("this build has the CUDA part")
    ok, why = _ext.availability("cuda")
    print(why)
    assert not ok and "built without its CUDA part" in why
    assert ext.cuda_status() == "fastdiff._C was built without its CUDA part"


# A meta-path finder that makes importing fastdiff._C raise, as a missing or ABI-broken build does.
_BREAK_EXTENSION = """
import sys
class Broken:
    def find_spec(self, name, path=None, target=None):
        if name == "fastdiff._C":
            raise {error}("simulated broken build")
sys.meta_path.insert(0, Broken())
import torch
import fastdiff
from fastdiff import _ext, ops
from fastdiff.kernels.scheduler_step import StepCoeffs, scheduler_step_ref
ok, why = _ext.availability("cpu")
assert not ok and "simulated broken build" in why, why
assert ops.resolve("scheduler_step", "cpu") == "reference"
x, mo = torch.randn(1, 4, 8, 8), torch.randn(2, 4, 8, 8)
coeffs = StepCoeffs(1.0, -3.0, 0.8, 0.2)
assert all(torch.equal(a, b) for a, b in zip(ops.scheduler_step(x, mo, coeffs, 7.5),
                                              scheduler_step_ref(x, mo, coeffs, 7.5)))
print("fallback:", why)
"""


@pytest.mark.parametrize("error", ["ImportError", "OSError"])
def test_broken_extension_never_breaks_import_fastdiff(error):
    result = subprocess.run([sys.executable, "-c", _BREAK_EXTENSION.format(error=error)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "FASTDIFF_BACKEND": "auto"})
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stderr
    assert "fallback: fastdiff._C not built or failed to load" in result.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_grid_stride_loop_covers_large_tensors(ext, dtype):
    # 33*4*128*129 = 2.18 M elements: more 16-byte packs than the grid has threads (8 blocks of 256 per SM
    # on up to 132 SMs), so every thread loops, and 129 leaves a tail.
    device_ready("cuda")
    x, mo, prev, noise = operands((33, 4, 128, 129), dtype, "cuda", True)
    coeffs = SOLVERS["dpmpp_2m_sde"]
    poison_allocator(x)
    ours = ext.scheduler_step(x, mo, coeffs, GUIDANCE, prev, noise)
    ref = scheduler_step_ref(x, mo, coeffs, GUIDANCE, prev, noise)
    for o, r, what in zip(ours, ref, ("x_next", "x0")):
        assert_matches(o, r, what)


@pytest.mark.gpu
def test_cuda_step_replays_inside_a_cuda_graph(ext):
    device_ready("cuda")
    x, mo, prev, noise = operands((2, 4, 64, 64), torch.float16, "cuda", True)
    coeffs = SOLVERS["dpmpp_2m_sde"]
    graph, (x_next, x0) = capture(lambda: ext.scheduler_step(x, mo, coeffs, GUIDANCE, prev, noise))
    for fresh, static in zip(operands((2, 4, 64, 64), torch.float16, "cuda", True), (x, mo, prev, noise)):
        static.copy_(fresh)
    graph.replay()
    ref_next, ref_x0 = scheduler_step_ref(x, mo, coeffs, GUIDANCE, prev, noise)
    assert_matches(x_next, ref_next, "x_next")
    assert_matches(x0, ref_x0, "x0")


@pytest.mark.gpu
def test_cuda_rejects_operands_on_another_device(ext):
    device_ready("cuda")
    x, mo, prev, noise = operands((2, 4, 6, 5), torch.float32, "cuda", True)
    with pytest.raises(ValueError, match="noise is on cpu, expected x's device cuda:0"):
        ext.scheduler_step(x, mo, SOLVERS["euler_ancestral"], GUIDANCE, prev, noise.cpu())

"""The Triton fused scheduler step against scheduler_step_ref.

Coefficients come from real solvers at one step each (tests/step_cases.py), so every
specialisation of the kernel (guidance or not, prev_x0 or not, noise or not) is hit as the samplers hit it.
CPU: under TRITON_INTERPRET=1 on a small odd latent; GPU (`-m gpu`): every dtype on SD latents.
"""
import importlib

import pytest
import torch

from fastdiff.kernels.scheduler_step import scheduler_step, scheduler_step_ref
from step_cases import SOLVERS
from cuda_graphs import capture

# Against a float64 reference: dtype, atol, rtol. Low precision: one rounding of outputs of size ~10
# (guidance 7.5 amplifies cond - uncond).
CPU_TOLERANCES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 2e-2, 2e-3),
    (torch.bfloat16, 1.5e-1, 1e-2),
]


def _inputs(shape, dtype, guidance, device="cpu"):
    x = (torch.randn(shape, device=device) * 3).to(dtype)
    batch = shape[0] * (2 if guidance is not None else 1)
    model_output = torch.randn((batch, *shape[1:]), device=device).to(dtype)
    prev_x0 = torch.randn(shape, device=device).to(dtype)
    noise = torch.randn(shape, device=device).to(dtype)
    return x, model_output, prev_x0, noise


def _report(name, outs, refs):
    errs = []
    for label, out, ref in zip(("x_next", "x0"), outs, refs):
        err = (out.double() - ref.double()).abs()
        print(f"{name} {label}: max abs err {err.max().item():.3e}, mean abs err {err.mean().item():.3e}")
        errs.append(err)
    return errs


@pytest.mark.parametrize("dtype, atol, rtol", CPU_TOLERANCES)
@pytest.mark.parametrize("guidance", [None, 7.5])
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_scheduler_step_matches_reference(solver, guidance, dtype, atol, rtol):
    x, model_output, prev_x0, noise = _inputs((2, 4, 7, 9), dtype, guidance)
    coeffs = SOLVERS[solver]
    outs = scheduler_step(x, model_output, coeffs, guidance, prev_x0, noise)
    refs = scheduler_step_ref(x.double(), model_output.double(), coeffs, guidance, prev_x0.double(), noise.double())
    _report(f"{solver} {dtype} g={guidance}", outs, refs)
    for out, ref in zip(outs, refs):
        assert out.dtype == dtype and out.shape == x.shape
        torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)


def test_scheduler_step_keeps_channels_last_and_copies_mixed_layouts():
    coeffs = SOLVERS["dpmpp_2m"]
    x, model_output, prev_x0, _ = _inputs((2, 4, 7, 9), torch.float32, 7.5)
    channels_last = [t.to(memory_format=torch.channels_last) for t in (x, model_output, prev_x0)]
    refs = scheduler_step_ref(x, model_output, coeffs, 7.5, prev_x0)
    outs = scheduler_step(*channels_last[:2], coeffs, 7.5, channels_last[2])
    _report("channels_last", outs, refs)
    assert all(o.is_contiguous(memory_format=torch.channels_last) for o in outs)
    mixed = scheduler_step(x, channels_last[1], coeffs, 7.5, prev_x0)  # model_output alone is channels_last
    for out, other, ref in zip(outs, mixed, refs):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(other, ref, atol=1e-5, rtol=1e-5)


def test_scheduler_step_ignores_inputs_whose_coefficient_is_zero():
    x, model_output, _, _ = _inputs((1, 4, 5, 3), torch.float32, None)
    poison = torch.full_like(x, float("nan"))
    outs = scheduler_step(x, model_output, SOLVERS["euler"], None, poison, poison)
    _report("zero coefficients", outs, scheduler_step_ref(x, model_output, SOLVERS["euler"]))
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("call, message", [
    (lambda x, m, p: scheduler_step(x, m, SOLVERS["euler"], 7.5), r"model_output has shape \(2, 4, 7, 9\), expected"),
    (lambda x, m, p: scheduler_step(x, m.half(), SOLVERS["euler"]), "model_output has dtype torch.float16"),
    (lambda x, m, p: scheduler_step(x, m, SOLVERS["dpmpp_2m"]), "a_p=.* needs prev_x0, got None"),
    (lambda x, m, p: scheduler_step(x, m, SOLVERS["euler_ancestral"]), "a_n=.* needs noise, got None"),
    (lambda x, m, p: scheduler_step(x, m, SOLVERS["dpmpp_2m"], None, p[:1]), "prev_x0 has shape"),
    (lambda x, m, p: scheduler_step(x.double(), m.double(), SOLVERS["euler"]), "x has dtype torch.float64"),
])
def test_scheduler_step_rejects_invalid_inputs(call, message):
    x, model_output, prev_x0, _ = _inputs((2, 4, 7, 9), torch.float32, None)
    with pytest.raises(ValueError, match=message):
        call(x, model_output, prev_x0)


def test_scheduler_step_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(importlib.import_module("fastdiff.kernels._triton"), "INTERPRET", False)
    x, model_output, _, _ = _inputs((1, 4, 5, 3), torch.float32, None)
    with pytest.raises(ValueError, match="need CUDA tensors, got a tensor on cpu"):
        scheduler_step(x, model_output, SOLVERS["euler"])


def test_scheduler_step_op_traces_without_graph_breaks():
    x, model_output, prev_x0, _ = _inputs((1, 4, 5, 3), torch.float32, 7.5)
    compiled = torch.compile(scheduler_step, backend="aot_eager", fullgraph=True)
    for out, ref in zip(compiled(x, model_output, SOLVERS["dpmpp_2m"], 7.5, prev_x0),
                        scheduler_step(x, model_output, SOLVERS["dpmpp_2m"], 7.5, prev_x0)):
        torch.testing.assert_close(out, ref)


# ------------------------------------------------------------------------------------------------ GPU

# SD1.5 at 512 px (batch 1 and 8), SD2 at 768 px, SDXL at 1024 px: latents (B, 4, H/8, W/8).
SD_LATENTS = [(1, 4, 64, 64), (8, 4, 64, 64), (1, 4, 96, 96), (2, 4, 128, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("shape", SD_LATENTS, ids=lambda s: "x".join(map(str, s)))
def test_scheduler_step_error_on_gpu_at_most_twice_torch_error(shape, solver, dtype):
    x, model_output, prev_x0, noise = _inputs(shape, dtype, 7.5, "cuda")
    coeffs = SOLVERS[solver]
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    refs = scheduler_step_ref(*(t.to(ref_dtype) for t in (x, model_output)), coeffs, 7.5,
                              prev_x0.to(ref_dtype), noise.to(ref_dtype))
    outs = scheduler_step(x, model_output, coeffs, 7.5, prev_x0, noise)
    # torch's own error: the same arithmetic written eagerly in the tensors' dtype.
    uncond, cond = model_output.chunk(2)
    x0_t = coeffs.c_x * x + coeffs.c_m * (uncond + 7.5 * (cond - uncond))
    x_next_t = coeffs.a_x * x + coeffs.a_0 * x0_t + coeffs.a_p * prev_x0 + coeffs.a_n * noise
    errs = _report(f"fastdiff {solver} {dtype}", outs, refs)
    errs_torch = _report(f"torch    {solver} {dtype}", (x_next_t, x0_t), refs)
    floor = 1e-5 if dtype == torch.float32 else 0.0
    for err, err_torch in zip(errs, errs_torch):
        assert err.max() <= 2 * err_torch.max() + floor
        assert err.mean() <= 2 * err_torch.mean() + floor


@pytest.mark.gpu
def test_scheduler_step_survives_cuda_graph_capture():
    x, model_output, prev_x0, _ = _inputs((1, 4, 64, 64), torch.float16, 7.5, "cuda")
    coeffs = SOLVERS["dpmpp_2m"]
    graph, outs = capture(lambda: scheduler_step(x, model_output, coeffs, 7.5, prev_x0))
    x.copy_(torch.randn_like(x))
    graph.replay()
    refs = scheduler_step_ref(x, model_output, coeffs, 7.5, prev_x0)
    _report("graph replay", outs, refs)
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, atol=1e-2, rtol=2e-3)

"""fastdiff.schedulers vs diffusers' same-named schedulers: schedules, multi-step trajectories, img2img, errors.

diffusers keeps its schedules in float32 and casts samples to float32 inside several `step`s, so "equal" here
means relative error <= 1e-6 in float64 runs (observed ~1e-7, i.e. diffusers' own float32 rounding).
"""
import importlib

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, HeunDiscreteScheduler, LCMScheduler, UniPCMultistepScheduler)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from fastdiff import ops
from fastdiff import schedulers as S
from fastdiff.kernels.scheduler_step import StepCoeffs

TOL = 1e-6
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# Stable Diffusion 1.x's published scheduler/scheduler_config.json (a PNDM config, as shipped).
SD1 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
       "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
       "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
       "clip_sample": False}

# name -> (diffusers class, config keys selecting the algorithm, diffusers module that draws the noise)
DIFFUSERS = {
    "ddpm": (DDPMScheduler, {}, "scheduling_ddpm"),
    "ddim": (DDIMScheduler, {}, None),
    "euler": (EulerDiscreteScheduler, {}, None),
    "euler_a": (EulerAncestralDiscreteScheduler, {}, "scheduling_euler_ancestral_discrete"),
    "heun": (HeunDiscreteScheduler, {}, None),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}, None),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"},
                     "scheduling_dpmsolver_multistep"),
    "unipc": (UniPCMultistepScheduler, {}, None),
    "lcm": (LCMScheduler, {}, "scheduling_lcm"),
}
KARRAS = ("euler", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc")  # euler_a: diffusers has no Karras option
NO_SAMPLE_PREDICTION = ("euler_a",)  # diffusers raises NotImplementedError for prediction_type="sample"
SHAPE = (2, 4, 5, 3)


@pytest.fixture(autouse=True)
def _reference_step():
    # the samplers' math is under test here, not the kernels (tests/test_scheduler_step*.py cover those)
    with ops.use_backend("reference", op="scheduler_step"):
        yield


def rel_err(ours, theirs) -> float:
    ours, theirs = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(theirs, dtype=torch.float64)
    diff = (ours - theirs).abs()
    err = (diff.max() / theirs.abs().max()).item()
    print(f"max abs err {diff.max().item():.3e}  mean abs err {diff.mean().item():.3e}  rel {err:.3e}")
    return err


class ToyModel:
    """A fixed smooth nonlinear 'denoiser' of (x, t); with `guided` it returns [uncond; cond] for x."""

    def __init__(self, guided: bool = False):
        g = torch.Generator().manual_seed(1234)
        self.w = torch.randn(SHAPE[1], SHAPE[1], generator=g, dtype=torch.float64) * 0.3
        self.guided = guided

    def _f(self, x, t):
        return torch.tanh(torch.einsum("bchw,cd->bdhw", x, self.w.to(x.dtype))) + 0.1 * torch.sin(3 * x + t / 300)

    def __call__(self, x, t):
        return self._f(torch.cat([x, 0.8 * x]), t) if self.guided else self._f(x, t)


def diffusers_scheduler(name, config):
    cls, algo, _ = DIFFUSERS[name]
    return cls.from_config({**config, **algo})


def run_diffusers(name, steps, config, x, noises, monkeypatch, guidance_scale=None, eta=0.0, start=0, x0=None):
    """diffusers' StableDiffusion(Img2Img)Pipeline loop around the scheduler; returns (sample, noise draws)."""
    ds = diffusers_scheduler(name, config)
    ds.set_timesteps(steps)
    queue = list(noises)
    module = DIFFUSERS[name][2]
    if module is not None:
        monkeypatch.setattr(importlib.import_module(f"diffusers.schedulers.{module}"), "randn_tensor",
                            lambda shape, **kw: queue.pop(0))
    timesteps = ds.timesteps[start * ds.order:]
    if x0 is None:
        x = x * ds.init_noise_sigma
    else:
        if hasattr(ds, "set_begin_index"):
            ds.set_begin_index(start * ds.order)
        x = ds.add_noise(x0, x, timesteps[:1])
    model = ToyModel(guided=guidance_scale is not None)
    for t in timesteps:
        out = model(ds.scale_model_input(x, t), t)
        if guidance_scale is not None:
            uncond, cond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        kwargs = {"eta": eta, "variance_noise": queue.pop(0)} if eta else {}
        x = ds.step(out, t, x, **kwargs).prev_sample
    return x, len(noises) - len(queue)


def run_ours(name, steps, config, x, noises, guidance_scale=None, eta=0.0, start=0, x0=None, karras=None):
    sched = S.make_schedule(name, steps, config, karras=karras, eta=eta)
    queue = list(noises)
    x = x * sched.init_noise_sigma if x0 is None else S.add_noise(x0, x, sched, start)
    out = S.sample(ToyModel(guided=guidance_scale is not None), x, sched, guidance_scale=guidance_scale,
                   noise_fn=lambda shape: queue.pop(0), start_index=start)
    return out, len(noises) - len(queue)


def compare_trajectories(name, steps, config, monkeypatch, karras=None, **kw):
    x = torch.randn(SHAPE, dtype=torch.float64)
    noises = [torch.randn(SHAPE, dtype=torch.float64) for _ in range(2 * steps + 2)]
    dconfig = {**config, "use_karras_sigmas": True} if karras else config
    theirs, their_draws = run_diffusers(name, steps, dconfig, x, noises, monkeypatch, **kw)
    ours, our_draws = run_ours(name, steps, config, x, noises, karras=karras, **kw)
    assert our_draws == their_draws, f"drew noise {our_draws} times, diffusers {their_draws}"
    assert rel_err(ours, theirs) <= TOL
    return ours


def diffusers_plan(name, ds):
    """(timesteps, ve sigmas incl. the final one) of a diffusers scheduler after set_timesteps, one per step."""
    t, sigmas = ds.timesteps.double(), getattr(ds, "sigmas", None)
    if name == "heun":  # diffusers interleaves the second-order evaluations: [t0, t1, t1, t2, t2, ...]
        t, sigmas = torch.cat([t[:1], t[1::2]]), torch.cat([sigmas[:1], sigmas[1::2]])
    if name in ("ddpm", "ddim", "lcm"):  # alpha_bar-indexed: sigma of each step's timestep
        abar = ds.alphas_cumprod.double()[ds.timesteps]
        sigmas = ((1 - abar) / abar).sqrt()
    return t, sigmas.double()


# ---- schedules --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("name", S.SCHEDULERS)
def test_timesteps_and_sigmas_match_diffusers(name, steps, spacing, beta_schedule):
    config = {**SD1, "timestep_spacing": spacing, "beta_schedule": beta_schedule}
    ds = diffusers_scheduler(name, config)
    ds.set_timesteps(steps)
    sched = S.make_schedule(name, steps, config)
    t, sigmas = diffusers_plan(name, ds)
    assert rel_err(sched.timesteps, t) <= TOL
    assert rel_err(sched.model_timesteps, ds.timesteps if name != "heun" else t) <= TOL
    n = len(sigmas) if name not in ("ddpm", "ddim", "lcm") else steps  # those have no final sigma in diffusers
    ours = torch.tensor(sched.sigmas[:n], dtype=torch.float64)
    err = ((ours - sigmas).abs() / sigmas.abs().clamp(min=1e-12)).max().item()  # per element: small sigmas too
    print(f"sigma per-element rel err {err:.3e}")
    assert err <= TOL
    assert abs(sched.init_noise_sigma - float(ds.init_noise_sigma)) <= TOL * float(ds.init_noise_sigma)


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("name", KARRAS)
def test_karras_sigmas_match_diffusers(name, steps, spacing):
    config = {**SD1, "timestep_spacing": spacing}
    ds = diffusers_scheduler(name, {**config, "use_karras_sigmas": True})
    ds.set_timesteps(steps)
    sched = S.make_schedule(name, steps, config, karras=True)
    t, sigmas = diffusers_plan(name, ds)
    assert rel_err(sched.timesteps, t) <= TOL
    assert rel_err(sched.sigmas, sigmas) <= TOL
    assert S.make_schedule(name, steps, {**config, "use_karras_sigmas": True}).sigmas == sched.sigmas


def test_karras_sigmas_formula():
    sigmas = S.karras_sigmas(0.03, 14.6, 5)
    ramp = np.linspace(0, 1, 5)
    expected = (14.6 ** (1 / 7) + ramp * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7
    assert rel_err(sigmas, expected) <= 1e-14
    assert sigmas[0] == pytest.approx(14.6, rel=1e-14) and sigmas[-1] == pytest.approx(0.03, rel=1e-14)


@pytest.mark.parametrize("name", S.SCHEDULERS)
def test_missing_config_keys_take_the_diffusers_class_defaults(name):
    cls, algo, _ = DIFFUSERS[name]
    ds = cls(**algo)
    sched = S.make_schedule(name, 10, {})
    for field in ("beta_start", "beta_end", "beta_schedule", "timestep_spacing", "clip_sample", "set_alpha_to_one"):
        if field in ds.config:
            assert getattr(sched.config, field) == ds.config[field], field
    ds.set_timesteps(10)
    assert rel_err(sched.timesteps, diffusers_plan(name, ds)[0]) <= TOL


# ---- trajectories -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("name", S.SCHEDULERS)
def test_trajectory_matches_diffusers(name, steps, prediction_type, monkeypatch):
    if prediction_type == "sample" and name in NO_SAMPLE_PREDICTION:
        pytest.skip(f"diffusers' {DIFFUSERS[name][0].__name__} does not implement prediction_type='sample'")
    compare_trajectories(name, steps, {**SD1, "prediction_type": prediction_type}, monkeypatch)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("name", KARRAS)
def test_karras_trajectory_matches_diffusers(name, steps, prediction_type, monkeypatch):
    compare_trajectories(name, steps, {**SD1, "prediction_type": prediction_type}, monkeypatch, karras=True)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("name", S.SCHEDULERS)
def test_trajectory_matches_diffusers_for_each_spacing(name, spacing, monkeypatch):
    # 25 steps with linspace is where DDIM's t - T // steps convention departs from the next timestep
    compare_trajectories(name, 25, {**SD1, "timestep_spacing": spacing}, monkeypatch)


@pytest.mark.parametrize("name", S.SCHEDULERS)
def test_linear_betas_default_config_trajectory_matches_diffusers(name, monkeypatch):
    compare_trajectories(name, 10, {}, monkeypatch)  # every key from the class defaults


@pytest.mark.parametrize("name", S.SCHEDULERS)
def test_guided_trajectory_matches_diffusers(name, monkeypatch):
    compare_trajectories(name, 10, SD1, monkeypatch, guidance_scale=1.5)


@pytest.mark.parametrize("name", S.SCHEDULERS)
def test_fused_guidance_equals_guiding_inside_the_model(name):
    # with a large scale, diffusers' float32 rounding is amplified beyond 1e-6; check our plumbing exactly instead
    sched = S.make_schedule(name, 10, SD1)
    x = torch.randn(SHAPE, dtype=torch.float64) * sched.init_noise_sigma
    noises = [torch.randn(SHAPE, dtype=torch.float64) for _ in range(12)]
    guided = ToyModel(guided=True)

    def combined(x_in, t):
        return S.combine_guidance(guided(x_in, t), 7.5)

    q1, q2 = list(noises), list(noises)
    a = S.sample(guided, x, sched, guidance_scale=7.5, noise_fn=lambda s: q1.pop(0))
    b = S.sample(combined, x, sched, noise_fn=lambda s: q2.pop(0))
    assert rel_err(a, b) <= 1e-13


@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_eta_matches_diffusers(eta, set_alpha_to_one, monkeypatch):
    compare_trajectories("ddim", 25, {**SD1, "set_alpha_to_one": set_alpha_to_one}, monkeypatch, eta=eta)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "heun", "lcm"])
def test_clip_sample_matches_diffusers(name, monkeypatch):
    config = {**SD1, "clip_sample": True, "clip_sample_range": 0.5}
    ours = compare_trajectories(name, 10, config, monkeypatch)
    x = torch.randn(SHAPE, dtype=torch.float64)
    noises = [torch.randn(SHAPE, dtype=torch.float64) for _ in range(22)]
    unclipped, _ = run_ours(name, 10, SD1, x, noises)
    assert rel_err(ours, unclipped) > 1e-3, "clipping never triggered: the test would not see it missing"


def test_ddpm_fixed_large_variance_matches_diffusers(monkeypatch):
    compare_trajectories("ddpm", 25, {**SD1, "variance_type": "fixed_large"}, monkeypatch)


@pytest.mark.parametrize("steps", [10, 20])  # lower_order_final applies below 15 steps
@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_sde", "unipc"])
def test_final_sigma_min_matches_diffusers(name, steps, monkeypatch):
    compare_trajectories(name, steps, {**SD1, "final_sigmas_type": "sigma_min"}, monkeypatch)


@pytest.mark.parametrize("config", [{"final_sigmas_type": "sigma_min", "euler_at_final": True},
                                    {"final_sigmas_type": "sigma_min", "lower_order_final": False}])
def test_dpm_final_step_options_match_diffusers(config, monkeypatch):
    compare_trajectories("dpmpp_2m", 10, {**SD1, **config}, monkeypatch)


def test_euler_final_sigma_min_matches_diffusers(monkeypatch):
    compare_trajectories("euler", 10, {**SD1, "final_sigmas_type": "sigma_min"}, monkeypatch)


@pytest.mark.parametrize("name", S.SCHEDULERS)
def test_img2img_matches_diffusers(name, monkeypatch):
    steps = 10
    start = S.img2img_start_index(steps, 0.6)
    assert start == 4
    x0 = torch.randn(SHAPE, dtype=torch.float64)
    compare_trajectories(name, steps, SD1, monkeypatch, start=start, x0=x0)


@pytest.mark.parametrize("name", KARRAS)
def test_karras_img2img_matches_diffusers(name, monkeypatch):
    # img2img on Karras sigmas (the non-Karras case is above): noise added at the Karras sigmas[start]
    # (diffusers' set_begin_index), the multistep history restarting there (first order, and no UniPC
    # corrector, at the first step run) and the rounded Karras timesteps from there on
    steps, start = 10, S.img2img_start_index(10, 0.6)
    x0 = torch.randn(SHAPE, dtype=torch.float64)
    compare_trajectories(name, steps, SD1, monkeypatch, karras=True, start=start, x0=x0)


def test_img2img_start_index_edges():
    assert S.img2img_start_index(50, 1.0) == 0
    assert S.img2img_start_index(50, 0.0) == 50
    assert S.img2img_start_index(10, 0.75) == 3  # int(7.5) = 7 steps run, as diffusers
    with pytest.raises(ValueError, match="strength must be in"):
        S.img2img_start_index(10, 1.5)


# ---- structure: fused steps, callbacks, guidance rescale ---------------------------------------------------

FUSED_CALLS = {"ddpm": 1, "ddim": 1, "euler": 1, "euler_a": 1, "heun": 2, "dpmpp_2m": 1, "dpmpp_2m_sde": 1,
               "lcm": 1}


@pytest.mark.parametrize("name", list(FUSED_CALLS))
def test_fusable_samplers_step_through_ops_scheduler_step(name, monkeypatch):
    calls = []
    real = ops.scheduler_step

    def spy(x, model_output, coeffs, guidance_scale=None, prev_x0=None, noise=None):
        assert isinstance(coeffs, StepCoeffs) and all(type(c) is float for c in coeffs), coeffs
        calls.append(coeffs)
        return real(x, model_output, coeffs, guidance_scale, prev_x0, noise)

    monkeypatch.setattr(ops, "scheduler_step", spy)
    steps = 6
    sched = S.make_schedule(name, steps, SD1)
    seen = []
    S.sample(ToyModel(guided=True), torch.randn(SHAPE) * sched.init_noise_sigma, sched, guidance_scale=5.0,
             noise_fn=torch.randn, callback=lambda i, x, x0: seen.append((i, x.shape, x0.shape)))
    expected = steps * FUSED_CALLS[name] - (1 if name == "heun" else 0)  # heun's step to sigma 0 is plain Euler
    assert len(calls) == expected
    assert seen == [(i, SHAPE, SHAPE) for i in range(steps)]


def test_rescale_guidance_matches_diffusers():
    out = torch.randn(4, *SHAPE[1:], dtype=torch.float64)
    uncond, cond = out.chunk(2)
    guided = uncond + 7.5 * (cond - uncond)
    expected = rescale_noise_cfg(guided, cond, guidance_rescale=0.7)
    assert rel_err(S.combine_guidance(out, 7.5, guidance_rescale=0.7), expected) <= 1e-14
    assert rel_err(S.rescale_guidance(guided, cond, 0.0), guided) == 0.0


def test_float32_sampling_stays_close_to_float64():
    sched = S.make_schedule("dpmpp_2m", 10, SD1)
    x = torch.randn(SHAPE, dtype=torch.float64)
    model = ToyModel()
    ref = S.sample(model, x, sched)
    low = S.sample(lambda x_in, t: model(x_in.double(), t).float(), x.float(), sched)
    assert low.dtype == torch.float32
    assert rel_err(low, ref) <= 1e-5


# ---- errors ---------------------------------------------------------------------------------------------------

def test_bad_scheduler_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="scheduler must be one of .*'ddpm'.*'lcm'.*got 'plms'"):
        S.make_schedule("plms", 10, SD1)


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "ddim", "karras": True}, "karras sigmas apply to"),
    ({"name": "euler", "eta": 0.5}, "eta is a DDIM parameter"),
    ({"name": "ddim", "steps": 0}, r"steps must be in \[1, num_train_timesteps=1000\], got 0"),
    ({"name": "lcm", "steps": 60}, "lcm steps must be <= original_inference_steps=50, got 60"),
    ({"name": "euler", "config": {"thresholding": True}}, "thresholding=True is not supported"),
    ({"name": "euler", "config": {"prediction_type": "flow"}}, "prediction_type must be one of"),
    ({"name": "ddpm", "config": {"variance_type": "learned_range"}}, "variance_type must be one of"),
    ({"name": "euler", "config": {"beta_schedule": "sigmoid"}}, "beta_schedule must be one of"),
])
def test_make_schedule_rejects_bad_arguments(kwargs, match):
    args = {"name": "euler", "steps": 10, "config": SD1, **kwargs}
    with pytest.raises(ValueError, match=match):
        S.make_schedule(args.pop("name"), args.pop("steps"), args.pop("config"), **args)


def test_sampler_errors_name_the_problem():
    sched = S.make_schedule("euler_a", 4, SD1)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="euler_a draws noise during sampling: pass noise_fn"):
        S.sample(ToyModel(), x, sched)
    with pytest.raises(ValueError, match="schedule was made for 'euler_a', not 'euler'"):
        S.sample_euler(ToyModel(), x, sched)
    with pytest.raises(ValueError, match=r"model_output has shape \(2, 4, 5, 3\), expected \(4, 4, 5, 3\)"):
        S.sample(ToyModel(), x, S.make_schedule("euler", 4, SD1), guidance_scale=7.5)
    with pytest.raises(ValueError, match=r"start_index must be in \[0, 4\], got 5"):
        S.sample(ToyModel(), x, sched, noise_fn=torch.randn, start_index=5)

"""DDPM forward process and posterior (fastdiff.schedulers.ddpm) against closed forms evaluated in float64."""
import math

import pytest
import torch
from diffusers import DDPMScheduler

from fastdiff import schedulers as S


def rel_err(ours, theirs) -> float:
    diff = (ours.double() - theirs.double()).abs()
    err = (diff.max() / theirs.double().abs().max()).item()
    print(f"max abs err {diff.max().item():.3e}  mean abs err {diff.mean().item():.3e}  rel {err:.3e}")
    return err


def random_alphas_cumprod(T: int = 50) -> list[float]:
    """A float64 alpha_bar table from random betas in (1e-4, 0.3), by explicit products."""
    betas = (torch.rand(T, dtype=torch.float64) * 0.3 + 1e-4).tolist()
    table, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        table.append(prod)
    return table


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_beta_schedules_match_closed_form(beta_schedule):
    T, b0, b1 = 1000, 0.00085, 0.012
    config = S.SchedulerConfig(beta_start=b0, beta_end=b1, beta_schedule=beta_schedule)
    if beta_schedule == "linear":
        expected = [b0 + i * (b1 - b0) / (T - 1) for i in range(T)]
    elif beta_schedule == "scaled_linear":
        expected = [(b0 ** 0.5 + i * (b1 ** 0.5 - b0 ** 0.5) / (T - 1)) ** 2 for i in range(T)]
    else:  # Nichol & Dhariwal 2021, eq. 17 with s = 0.008, betas capped at 0.999
        f = [math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(T + 1)]
        expected = [min(1 - f[i + 1] / f[i], 0.999) for i in range(T)]
    expected = torch.tensor(expected, dtype=torch.float64)
    betas = S.betas_for_config(config)
    assert betas.dtype == torch.float64
    assert rel_err(betas, expected) <= 1e-6  # evaluated in float32, as diffusers does
    abar = S.alphas_cumprod_for_config(config)
    # the product of the float32 betas, in float64 (float32 betas themselves lose up to ~3e-5 in 1 - beta
    # where beta nears the 0.999 cap, which no product can recover)
    one_minus = (1 - betas).tolist()
    expected_abar = torch.tensor([math.prod(one_minus[: t + 1]) for t in range(T)], dtype=torch.float64)
    err = ((abar - expected_abar).abs() / expected_abar).max().item()
    print(f"alpha_bar per-element rel err {err:.3e}")
    assert err <= 5e-6  # a 1000-term float32 product
    diffusers_abar = DDPMScheduler(beta_start=b0, beta_end=b1, beta_schedule=beta_schedule).alphas_cumprod
    assert torch.equal(abar, diffusers_abar.double())  # bit-identical to the table diffusers samples with


def test_q_sample_matches_closed_form():
    table = random_alphas_cumprod()
    x0 = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, 7, 25, 48, 49])
    ours = S.q_sample(x0, t, noise, torch.tensor(table, dtype=torch.float64))
    expected = torch.stack([math.sqrt(table[ti]) * x0[b] + math.sqrt(1 - table[ti]) * noise[b]
                            for b, ti in enumerate(t.tolist())])
    assert rel_err(ours, expected) <= 1e-14


def test_q_sample_matches_diffusers_add_noise():
    ds = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0 = torch.randn(4, 4, 8, 8, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 250, 600, 999])
    config = S.SchedulerConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours = S.q_sample(x0, t, noise, S.alphas_cumprod_for_config(config))
    assert rel_err(ours, ds.add_noise(x0, noise, t)) <= 1e-6


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_training_target_matches_closed_form(prediction_type):
    table = random_alphas_cumprod()
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 20, 49])
    ours = S.training_target(x0, noise, t, torch.tensor(table, dtype=torch.float64), prediction_type)
    if prediction_type == "epsilon":
        expected = noise
    elif prediction_type == "sample":
        expected = x0
    else:  # v = alpha eps - sigma x0 (Salimans & Ho 2022)
        expected = torch.stack([math.sqrt(table[ti]) * noise[b] - math.sqrt(1 - table[ti]) * x0[b]
                                for b, ti in enumerate(t.tolist())])
    assert rel_err(ours, expected) <= 1e-14


def test_q_posterior_matches_closed_form():
    table = random_alphas_cumprod()
    x0 = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    xt = torch.randn_like(x0)
    t = torch.tensor([0, 1, 13, 30, 49])
    mean, var = S.q_posterior_mean_variance(x0, xt, t, torch.tensor(table, dtype=torch.float64))
    for b, ti in enumerate(t.tolist()):
        abar_t, abar_prev = table[ti], (table[ti - 1] if ti > 0 else 1.0)
        beta = 1 - abar_t / abar_prev  # Ho et al. 2020, eq. 7
        mu = (math.sqrt(abar_prev) * beta / (1 - abar_t)) * x0[b] \
            + (math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar_t)) * xt[b]
        assert rel_err(mean[b], mu) <= 1e-13
        assert var[b].flatten()[0].item() == pytest.approx((1 - abar_prev) / (1 - abar_t) * beta, rel=1e-13, abs=1e-300)
    assert rel_err(mean[0], x0[0]) <= 1e-14 and var[0].abs().max().item() == 0.0  # t = 0 returns x0 exactly


def test_posterior_coeffs_are_gaussian_conditioning_of_the_forward_process():
    # Independent derivation: x_s ~ N(sqrt(a_s) x0, 1 - a_s), x_t = sqrt(a_t / a_s) x_s + N(0, 1 - a_t / a_s);
    # conditioning the joint Gaussian on x_t gives mean m_s + C / V_t (x_t - m_t) and variance V_s - C^2 / V_t.
    for abar_t, abar_s in [(0.3, 0.9), (0.0047, 0.05), (0.999, 0.9999), (0.5, 1.0)]:
        v_s, v_t, cov = 1 - abar_s, 1 - abar_t, math.sqrt(abar_t / abar_s) * (1 - abar_s)
        c_x0, c_xt, var = S.posterior_coeffs(abar_t, abar_s)
        assert c_xt == pytest.approx(cov / v_t, rel=1e-13)
        assert c_x0 == pytest.approx(math.sqrt(abar_s) - cov / v_t * math.sqrt(abar_t), rel=1e-12, abs=1e-15)
        assert var == pytest.approx(v_s - cov ** 2 / v_t, rel=1e-12, abs=1e-15)


def test_q_sample_rejects_mismatched_shapes():
    table = torch.tensor(random_alphas_cumprod(), dtype=torch.float64)
    x0 = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"noise has shape \(2, 3, 4\), expected x0's shape \(2, 3, 4, 4\)"):
        S.q_sample(x0, torch.tensor([1, 2]), torch.randn(2, 3, 4), table)
    with pytest.raises(ValueError, match=r"t must have shape \(2,\) \(one timestep per sample\), got \(3,\)"):
        S.q_sample(x0, torch.tensor([1, 2, 3]), torch.randn_like(x0), table)

"""Scheduler settings, read from a checkpoint's diffusers `scheduler/scheduler_config.json`.

A checkpoint's config usually names some other class (SD 1.x ships a PNDMScheduler config) and omits keys.
diffusers' `XScheduler.from_config(config)` keeps the keys X understands and fills the rest with X's own
defaults, which differ between classes (DDIM clips x0 and uses "leading" spacing by default, Euler does
neither). `SchedulerConfig.from_dict(config, name)` reproduces exactly that, so a sampler picked by name
sees the settings diffusers' same-named scheduler would.
"""
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, Optional

# Sampler names, and the diffusers class each one reproduces.
DIFFUSERS_CLASSES = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",            # algorithm_type="dpmsolver++", solver_order=2
    "dpmpp_2m_sde": "DPMSolverMultistepScheduler",        # algorithm_type="sde-dpmsolver++", solver_order=2
    "unipc": "UniPCMultistepScheduler",                   # solver_type="bh2", solver_order=2
    "lcm": "LCMScheduler",
}
SCHEDULERS = tuple(DIFFUSERS_CLASSES)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class SchedulerConfig:
    """The subset of diffusers' scheduler config that fastdiff implements (diffusers' names and meanings)."""

    num_train_timesteps: int = 1000  # T: length of the training noise schedule
    beta_start: float = 0.0001  # beta_1 of the training schedule
    beta_end: float = 0.02  # beta_T of the training schedule
    beta_schedule: str = "linear"  # "linear" | "scaled_linear" (SD) | "squaredcos_cap_v2" (cosine)
    trained_betas: Optional[tuple[float, ...]] = None  # explicit betas (length T); overrides the three above
    prediction_type: str = "epsilon"  # what the model predicts: "epsilon" | "v_prediction" | "sample"
    timestep_spacing: str = "linspace"  # how inference timesteps are picked: "leading" | "trailing" | "linspace"
    steps_offset: int = 0  # added to "leading" timesteps (SD 1.x/2.x use 1)
    clip_sample: bool = False  # clamp the x0 estimate to +-clip_sample_range (ddpm, ddim, heun, lcm only)
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True  # ddim/lcm: alpha_bar after the last step is 1 (else alpha_bar[0])
    variance_type: str = "fixed_small"  # ddpm noise: "fixed_small" posterior variance | "fixed_large" beta_t
    use_karras_sigmas: bool = False  # sigma-space samplers: Karras et al. (2022) rho=7 noise levels
    sigma_min: Optional[float] = None  # Karras range; None takes it from the schedule
    sigma_max: Optional[float] = None
    final_sigmas_type: str = "zero"  # euler/dpm/unipc: the last step lands on sigma 0 ("zero") or sigma(t=0)
    lower_order_final: bool = True  # dpm/unipc: lower-order last step(s) for stability at few steps
    euler_at_final: bool = False  # dpm: first-order last step regardless of step count
    original_inference_steps: int = 50  # lcm: length of the distillation timestep grid
    timestep_scaling: float = 10.0  # lcm: t multiplier in the consistency boundary condition

    @classmethod
    def from_dict(cls, config: Optional[Mapping[str, Any]], name: str) -> "SchedulerConfig":
        """Resolve a scheduler_config.json dict for sampler `name` as diffusers' `from_config` would.

        Keys fastdiff does not model (`_class_name`, `skip_prk_steps`, `solver_order`, ...) are ignored: the
        sampler name fixes the algorithm. Keys that would change the schedule in a way fastdiff does not
        implement raise ValueError rather than being silently ignored.
        """
        if name not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {name!r}")
        config = dict(config or {})
        for key, default in _UNSUPPORTED.items():
            if key in config and config[key] not in default:
                raise ValueError(f"scheduler config {key}={config[key]!r} is not supported "
                                 f"(fastdiff implements {key} in {default})")
        names = {f.name for f in fields(cls)}
        values = dict(_CLASS_DEFAULTS.get(name, {}))
        values.update({k: v for k, v in config.items() if k in names and v is not None})
        if values.get("trained_betas") is not None:
            values["trained_betas"] = tuple(float(b) for b in values["trained_betas"])
        return replace(cls(), **values).validated()

    def validated(self) -> "SchedulerConfig":
        """Raise ValueError naming the first bad value; return self."""
        choices = {"prediction_type": PREDICTION_TYPES, "beta_schedule": BETA_SCHEDULES,
                   "timestep_spacing": TIMESTEP_SPACINGS, "variance_type": ("fixed_small", "fixed_small_log",
                   "fixed_large"), "final_sigmas_type": ("zero", "sigma_min")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"scheduler config {key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ValueError(f"trained_betas has {len(self.trained_betas)} entries, expected "
                             f"num_train_timesteps={self.num_train_timesteps}")
        return self


# Where diffusers' class defaults differ from the dataclass defaults above.
_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "ddpm": {"clip_sample": True, "timestep_spacing": "leading"},
    "ddim": {"clip_sample": True, "timestep_spacing": "leading"},
    "heun": {"beta_start": 0.00085, "beta_end": 0.012},
    "lcm": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "timestep_spacing": "leading"},
}

# Config keys with behaviour fastdiff does not implement -> the values it accepts (diffusers' defaults).
_UNSUPPORTED: dict[str, tuple] = {
    "thresholding": (False,),
    "rescale_betas_zero_snr": (False,),
    "timestep_type": ("discrete",),
    "interpolation_type": ("linear",),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "lambda_min_clipped": (float("-inf"),),
}

"""The samplers people deploy with, as diffusers' own scheduler classes (what a user's pipeline or ComfyUI's
KSampler runs), by the names the deployment matrix uses.

Each image is reproducible from its seed in any batch: the pipeline draws each image's noise from its own
generator, and DPM++ SDE's Brownian tree (seeded by the scheduler, not the generator) gets one seed per image.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DeploySampler:
    scheduler: str  # a diffusers scheduler class
    options: dict = field(default_factory=dict)  # its config overrides
    eta: float = 0.0  # DDIM's eta (the pipeline passes it to schedulers whose step takes it)
    label: str = ""  # ComfyUI's / A1111's name


SAMPLERS: dict[str, DeploySampler] = {
    "ddim": DeploySampler("DDIMScheduler", eta=0.0, label="DDIM (eta 0)"),
    "ddim-eta1": DeploySampler("DDIMScheduler", eta=1.0, label="DDIM (eta 1)"),
    "euler": DeploySampler("EulerDiscreteScheduler", label="Euler"),
    "euler-a": DeploySampler("EulerAncestralDiscreteScheduler", label="Euler a"),
    "dpmpp-2m-karras": DeploySampler(
        "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, label="DPM++ 2M Karras"
    ),
    "dpmpp-sde-karras": DeploySampler(
        "DPMSolverSDEScheduler", {"use_karras_sigmas": True}, label="DPM++ SDE Karras"
    ),
    "unipc": DeploySampler("UniPCMultistepScheduler", label="UniPC"),
}


def sampler_names() -> list[str]:
    return list(SAMPLERS)


def make_scheduler(name: str, base_config, seeds: list[int]):
    """A fresh scheduler of sampler `name` from the model's scheduler config, for one batch of images."""
    import diffusers

    spec = SAMPLERS[name]
    options = dict(spec.options)
    if spec.scheduler == "DPMSolverSDEScheduler":
        options["noise_sampler_seed"] = list(seeds)  # one Brownian tree per image: batch-independent
    return getattr(diffusers, spec.scheduler).from_config(base_config, **options)

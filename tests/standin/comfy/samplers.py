"""Stand-in for ``comfy.samplers``: the sampler and scheduler names nodes offer (``KSampler.SAMPLERS``)."""

SAMPLER_NAMES = ["euler", "euler_ancestral", "heun", "dpmpp_2m"]
SCHEDULER_NAMES = ["normal", "karras", "simple"]


class KSampler:
    SCHEDULERS = SCHEDULER_NAMES
    SAMPLERS = SAMPLER_NAMES

"""The parallel layout a config implies: data-parallel size and the pipeline split.

Used by validation (which collects the problems) and by the dry run and the
process-group set-up (which raise the same message as a ConfigError).
"""

from typing import Optional

from megavl.config.errors import ConfigError
from megavl.config.schema import Config


def model_parallel_size(config: Config) -> int:
    p = config.parallel
    return p.tensor * p.pipeline * p.context


def data_parallel_size(config: Config, world_size: int) -> int:
    """Number of data-parallel replicas for this config at world_size."""
    mp = model_parallel_size(config)
    if mp < 1 or world_size < 1 or world_size % mp:
        raise ConfigError(
            f"world size {world_size} is not a positive multiple of "
            f"parallel.tensor * parallel.pipeline * parallel.context = {mp}"
        )
    return world_size // mp


def pipeline_split(config: Config) -> tuple[Optional[list[int]], Optional[str]]:
    """(LM layers on each pipeline stage, first stage first; None) or (None, the problem).

    The first stage also runs the vision encoder, so parallel.first_stage_lm_layers
    may give it fewer LM layers; the other stages share the rest evenly.
    """
    n = config.model.lm.num_layers
    pp = config.parallel.pipeline
    first = config.parallel.first_stage_lm_layers
    if pp < 1 or n < 1:
        return None, (f"parallel.pipeline = {pp} with model.lm.num_layers = {n}: "
                      "both must be >= 1")
    if pp > n:
        return None, (f"parallel.pipeline = {pp}: must be <= model.lm.num_layers ({n}) so "
                      "every stage holds at least one LM layer")
    if pp == 1:
        if first is not None and first != n:
            return None, (f"parallel.first_stage_lm_layers = {first}: only meaningful with "
                          f"parallel.pipeline > 1; use null (or {n}) with a single stage")
        return [n], None
    if first is None:
        if n % pp:
            return None, (f"model.lm.num_layers = {n}: must be divisible by parallel.pipeline "
                          f"({pp}) for an even split, or set parallel.first_stage_lm_layers")
        return [n // pp] * pp, None
    rest_stages = pp - 1
    upper = n - rest_stages
    if not 1 <= first <= upper:
        return None, (f"parallel.first_stage_lm_layers = {first}: must be between 1 and "
                      f"model.lm.num_layers - (parallel.pipeline - 1) = {upper}")
    if (n - first) % rest_stages:
        valid = [f for f in range(1, upper + 1) if (n - f) % rest_stages == 0]
        return None, (f"parallel.first_stage_lm_layers = {first}: the remaining {n - first} LM "
                      f"layers must be divisible by the other {rest_stages} pipeline stages; "
                      f"valid values: {valid}")
    return [first] + [(n - first) // rest_stages] * rest_stages, None


def lm_layers_per_stage(config: Config) -> list[int]:
    """LM layer count on each pipeline stage, first stage first; ConfigError if it cannot split."""
    split, problem = pipeline_split(config)
    if problem:
        raise ConfigError(problem)
    return split

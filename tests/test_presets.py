"""The example configs are valid for the world sizes they are written for."""

from __future__ import annotations

import pytest

from megavl.config import load_config, validate
from megavl.models.param_count import active_language_model_parameters
from megavl.models.param_count import total_parameter_counts as parameter_counts

from conftest import ROOT

CONFIGS = ROOT / "examples" / "configs"


@pytest.mark.parametrize("name,world_sizes", [
    ("tiny_cpu.yaml", [1, 2]),
    ("tiny_moe_cpu.yaml", [2]),
    ("moe_8b_a1b.yaml", [128]),
])
def test_example_config_validates(name, world_sizes):
    config = load_config(str(CONFIGS / name))
    for world_size in world_sizes:
        validate(config, world_size)


def test_production_preset_is_8b_total_1b_active():
    config = load_config(str(CONFIGS / "moe_8b_a1b.yaml"))
    total = sum(parameter_counts(config).values())
    assert 7.5e9 < total < 8.5e9
    lm = config.model.lm
    embeddings = 2 * lm.vocab_size * lm.hidden_size  # untied input and output
    active_without_embeddings = active_language_model_parameters(config) - embeddings
    assert 0.9e9 < active_without_embeddings < 1.3e9

"""Typed run configuration for megavl.

Configs are plain dataclasses (schema.py) built from YAML plus ``key.path=value``
overrides (loading.py) and checked as a whole (checks.py) before any process
group exists, so a bad setting fails in seconds on one process with a message
that names the field, instead of as a shape error deep inside a parallel run.
A config is not changed once it is handed out: values resolved at start-up
(such as ``data.image_backend: auto``) give a new config (``replace_field``).
"""

from megavl.config.checks import check_resolution, check_resolution_override, validate
from megavl.config.errors import ConfigError
from megavl.config.layout import data_parallel_size, lm_layers_per_stage, model_parallel_size, pipeline_split
from megavl.config.loading import (
    add_config_args,
    config_from_args,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    replace_field,
)
from megavl.config.schema import *  # noqa: F401,F403  (the schema's sections and choices)
from megavl.config.schema import __all__ as _schema_names

__all__ = [
    "ConfigError",
    "add_config_args",
    "check_resolution",
    "check_resolution_override",
    "config_from_args",
    "config_from_dict",
    "config_to_dict",
    "data_parallel_size",
    "dump_config",
    "lm_layers_per_stage",
    "load_config",
    "model_parallel_size",
    "pipeline_split",
    "replace_field",
    "validate",
    *_schema_names,
]

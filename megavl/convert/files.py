"""Names of the files and folders the converters read and write, in one place so that
the import and export flows (and the descriptions) share them without importing each other."""

from __future__ import annotations

import os

# A Hugging Face model folder.
CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# A converted megavl checkpoint folder: the weights (dist_checkpointing), the YAML
# config and the config.json of every folder it was imported from. The exporter
# takes the fields megavl does not model (e.g. video token ids) from SOURCE_HF_CONFIG.
CONFIG_FILE = "megavl_config.yaml"
SOURCE_HF_CONFIG = "hf_config.json"
SOURCE_VISION_CONFIG = "hf_vision_config.json"

# The model code an export for megavl's remote-code class copies next to config.json.
REMOTE_DIR = os.path.join(os.path.dirname(__file__), "remote")
REMOTE_FILES = ("configuration_megavl.py", "modeling_megavl.py", "processing_megavl.py")
# Names AutoProcessor looks for in an exported folder (written with the tokenizer).
PROCESSOR_NAME = "processor_config.json"

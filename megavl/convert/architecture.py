"""The description of one supported Hugging Face architecture.

A description is a mapping table plus the translation between its
config.json and megavl's Config; the one import flow (megavl.convert.importer)
and the one export flow (megavl.convert.exporter) run every description alike.
Adding an architecture (e.g. Qwen3-VL-MoE, whose stacked expert tensors map
with StackedExperts) means one module with a subclass of Architecture,
registered in megavl.convert.registry.

Most descriptions hold a whole vision-language model. One whose checkpoints
hold a language model alone names, in vision_from, the description whose
folder gives the vision tower and adapter on import; its export writes the
language model only (language_model_only).
"""

from __future__ import annotations

import abc
from typing import Iterable, Optional, Sequence

from megavl.config import Config
from megavl.convert.mapping import MappingTable
from megavl.convert.verify import verify_conversion


class Architecture(abc.ABC):
    #: The name in config.json's "architectures".
    name: str = ""
    #: config.json's "model_type".
    model_type: str = ""
    #: The transformers classes of the config and the model (names in transformers).
    transformers_config: str = ""
    transformers_model: str = ""
    #: (stored prefix, canonical prefix): names other transformers versions save
    #: tensors under, rewritten to the names the mapping table uses.
    hf_aliases: tuple[tuple[str, str], ...] = ()
    #: The prefix of the vision tower's and adapter's tensors in this architecture's
    #: checkpoints: what a pairing takes from its folder.
    vision_prefix: str = ""
    #: For a language model without a vision tower: the architecture whose folder
    #: (import_from_hf's vision_from) gives the vision tower and adapter.
    vision_from: Optional["Architecture"] = None
    #: The export writes the language model only, so export_to_hf picks this
    #: architecture only when asked for the language model alone.
    language_model_only: bool = False

    def config_class(self):
        import transformers

        return getattr(transformers, self.transformers_config)

    def model_class(self):
        """What verification loads the Hugging Face folder with (from_pretrained)."""
        import transformers

        return getattr(transformers, self.transformers_model)

    @abc.abstractmethod
    def megavl_config(self, hf_configs: Sequence, preprocessor: Optional[dict]) -> tuple[Config, list[str]]:
        """The megavl Config reproducing the model, and notes for the user.

        hf_configs: the transformers config object of each folder read, this
        architecture's first (then vision_from's); preprocessor: the folder with the
        vision tower's preprocessor_config.json. Raises ConversionError listing what
        megavl cannot reproduce.
        """
        ...

    @abc.abstractmethod
    def export_problems(self, config: Config) -> list[str]:
        """Why this architecture cannot reproduce config's model; empty when it can."""
        ...

    @abc.abstractmethod
    def hf_config(self, config: Config, token_ids: dict, base: Optional[dict]):
        """A transformers config object for config's model.

        token_ids: special-token ids from a tokenizer; base: the config.json (of this
        architecture) the model was imported from, whose fields megavl does not model
        (e.g. token ids for video) are kept.
        """
        ...

    @abc.abstractmethod
    def table(self, config: Config) -> MappingTable:
        """The mappings of config's model. Export binds them to the tensors it writes
        only, so mappings of tensors it leaves out bind to nothing."""
        ...

    def preprocessor_config(self, config: Config) -> Optional[dict]:
        """preprocessor_config.json for the exported folder (None: the model takes no images)."""
        return None

    def processor_config(self, config: Config) -> Optional[dict]:
        """processor_config.json for AutoProcessor, written when the tokenizer is (None: transformers
        finds the processor from the model type)."""
        return None

    def extra_hf_tensors(self, config: Config) -> dict:
        """Tensors {name: value} the export writes beside the mapped ones: parts of the Hugging Face
        class that config's outputs do not use, so that it loads without new weights."""
        return {}

    def remote_code_files(self) -> list[str]:
        """Python files the exported folder needs for trust_remote_code=True (none for
        classes that ship with transformers)."""
        return []

    def canonical_hf_name(self, stored: str) -> str:
        for prefix, canonical in self.hf_aliases:
            if stored.startswith(prefix):
                return canonical + stored[len(prefix):]
        return stored

    def verify(self, hf_dirs: Sequence[str], config: Config, megavl_dir: str, reserved: Iterable[int],
               tolerance: float):
        """Compares the megavl checkpoint in megavl_dir with the Hugging Face folders
        hf_dirs (those the import read, or the one the export wrote)."""
        return verify_conversion(hf_dirs[0], config, self, megavl_dir, reserved=reserved, tolerance=tolerance)

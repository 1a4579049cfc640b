"""What every supported Hugging Face architecture provides to the converters.

An architecture is a mapping table plus the translation between its
config.json and megavl's Config. Adding one (e.g. Qwen3-VL-MoE, whose stacked
expert tensors map with StackedExperts) means a new module with a subclass of
Architecture, registered in megavl.convert.registry; the import, export and
verification code stays as it is.
"""

from __future__ import annotations

import abc
from typing import Optional

from megavl.config import Config
from megavl.convert.mapping import MappingTable


class Architecture(abc.ABC):
    #: The name in config.json's "architectures".
    name: str = ""
    #: config.json's "model_type".
    model_type: str = ""
    #: (stored prefix, canonical prefix): names other transformers versions save
    #: tensors under, rewritten to the names the mapping table uses.
    hf_aliases: tuple[tuple[str, str], ...] = ()

    @abc.abstractmethod
    def config_class(self):
        ...

    @abc.abstractmethod
    def model_class(self):
        ...

    @abc.abstractmethod
    def megavl_config(self, hf_config, preprocessor: Optional[dict]) -> tuple[Config, list[str]]:
        """The megavl Config reproducing hf_config (a transformers config object), and notes
        for the user. Raises ConversionError listing what megavl cannot reproduce."""
        ...

    @abc.abstractmethod
    def export_problems(self, config: Config) -> list[str]:
        """Why this architecture cannot reproduce config's model; empty when it can."""
        ...

    @abc.abstractmethod
    def hf_config(self, config: Config, token_ids: dict, base: Optional[dict]):
        """A transformers config object for config's model.

        token_ids: special-token ids from a tokenizer; base: the config.json the
        model was imported from, whose fields megavl does not model (e.g. token
        ids for video) are kept.
        """
        ...

    @abc.abstractmethod
    def table(self, config: Config) -> MappingTable:
        ...

    def remote_code_files(self) -> list[str]:
        """Python files the exported folder needs for trust_remote_code=True (none for
        classes that ship with transformers)."""
        return []

    def canonical_hf_name(self, stored: str) -> str:
        for prefix, canonical in self.hf_aliases:
            if stored.startswith(prefix):
                return canonical + stored[len(prefix):]
        return stored

"""megavl: Megatron-style pretraining of vision-language models on megatron-core.

Start with ``pretrain_vlm.py`` (the training entry point) and README.md.
"""

__version__ = "0.1.0"

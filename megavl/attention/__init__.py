"""Attention masking for megavl.

The language model and the vision encoder each get their attention pattern
from a single FlexAttention ``mask_mod`` (see :mod:`megavl.attention.mask`), so
the CPU path (dense mask + SDPA) and the CUDA path (BlockMask + compiled
flex_attention) cannot drift apart.
"""

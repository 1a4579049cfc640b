"""Models: vision encoder, adapter, layer specs and the assembled VLM."""

# Every module here imports megatron-core; megavl.platform first silences the
# warnings megatron prints at import when Transformer Engine or apex is absent.
import megavl.platform  # noqa: F401

"""Models: vision encoder, adapter, layer specs and the assembled VLM."""

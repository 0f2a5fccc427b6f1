"""The model: its config (the groups of it only some models have, its files, named presets),
rotary embeddings, attention masks and kernels, the experts' routing and dispatch, the rolling
KV cache, and the Flax modules that assemble them (transformer.py)."""

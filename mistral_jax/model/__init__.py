"""The model: its config (the groups of it only some models have, its files, named presets),
rotary embeddings, attention masks and kernels, the experts' routing and dispatch, the rolling
KV cache, the Flax layers (layers.py) and the model that assembles them (transformer.py)."""

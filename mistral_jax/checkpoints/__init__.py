"""Models on disk, both ways: safetensors and PyTorch files one tensor at a time, orbax
checkpoints written atomically with checksums, HF and Mistral-native checkpoints converted to
params and back, and a conversion verified against transformers."""

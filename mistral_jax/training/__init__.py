"""Training: the data pipeline, the loss fused with the output projection, LoRA adapters (and
HF PEFT's files), metrics and MFU, the train step and loop, and the run train.py sets up."""

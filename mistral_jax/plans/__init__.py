"""Plans at scale: the train step and generate compiled ahead of time for TPU slices and an
8-device stand-in, their memory per device read from XLA (docs/SCALING.md)."""

"""Every row of docs/SCALING.md: the train step and generate of Mistral 7B, Ministral 8B,
Mistral Nemo 12B and Mixtral 8x7B, 7B's LoRA fine-tune, Ministral 3 8B at 128k context,
Devstral 2 123B's generation, Mistral Small 4's generation and LoRA fine-tune, Large 3's
generation, serve.py's programs for 7B and Ministral 3 8B, and 7B with int8 / int4 weights on one
device (generation, QLoRA), compiled ahead of time for TPU slices and chips, the 8-device CPU
stand-in and a one-device one (mistral_jax.plans.aot), per-device memory from XLA.

  python -m bench.plans                      # compiles and prints every row
  python -m bench.plans --write              # ... and rewrites the tables in docs/SCALING.md
  python -m bench.plans --only experts --write  # the Mixtral table alone
"""

from __future__ import annotations

import argparse
import os

from bench.report import rewrite_section
from mistral_jax.plans import aot
from mistral_jax.runtime.cli import run

SCALING = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "SCALING.md")

PLANS = [
    aot.Plan("v5e-16", "fsdp=16", "train", 16, 4096),
    aot.Plan("v4-8", "fsdp=4", "train", 4, 4096),
    aot.Plan("v4-8", "fsdp=4", "train", 4, 1024),
    aot.Plan("v5p-8", "fsdp=4", "train", 16, 4096),
    aot.Plan("cpu-8", "fsdp=8", "train", 8, 4096),
    aot.Plan("cpu-8", "fsdp=4,tensor=2", "train", 8, 1024),  # tests/test_aot.py's guard
    aot.Plan("v5e-16", "data=2,tensor=8", "generate", 8, 4096),
    aot.Plan("v4-8", "tensor=4", "generate", 8, 4096),
    aot.Plan("v5p-8", "tensor=4", "generate", 8, 4096),
    aot.Plan("cpu-8", "tensor=8", "generate", 8, 4096),
    # Ministral 8B (a full-attention layer, then three sliding) and Nemo 12B.
    *(aot.Plan(target, mesh, program, batch, seq, preset)
      for preset in ("ministral-8b", "mistral-nemo-12b")
      for target, mesh, program, batch, seq in [
          ("v5e-16", "fsdp=16", "train", 16, 4096), ("v5p-8", "fsdp=4", "train", 16, 4096),
          ("cpu-8", "fsdp=8", "train", 8, 4096),
          ("v5e-16", "data=2,tensor=8", "generate", 8, 4096), ("cpu-8", "tensor=8", "generate", 8, 4096)]),
]


# Mixtral 8x7B: 46.7B parameters, 12 bytes each of f32 master weights and AdamW moments
# (560 GB) before gradients and activations, so training needs 16 v5p chips; the experts
# over `expert` or every weight over `fsdp`.
EXPERT_PLANS = [
    aot.Plan("v5p-32", "fsdp=16", "train", 16, 4096, "mixtral-8x7b-v0.1"),
    aot.Plan("v5p-32", "fsdp=2,expert=8", "train", 16, 4096, "mixtral-8x7b-v0.1"),
    aot.Plan("cpu-8", "fsdp=8", "train", 8, 4096, "mixtral-8x7b-v0.1"),
    aot.Plan("v5e-16", "data=2,tensor=8", "generate", 8, 4096, "mixtral-8x7b-v0.1"),
    aot.Plan("cpu-8", "tensor=8", "generate", 8, 4096, "mixtral-8x7b-v0.1"),
    aot.Plan("cpu-8", "expert=8", "generate", 8, 4096, "mixtral-8x7b-v0.1"),
]
# Mistral 7B fine-tuned with rank-16 LoRA adapters on all seven projections, the base frozen
# in bf16: at each target the largest global batch of 4096-token sequences that fits with 5%
# to spare and the next one, which does not (`python -m mistral_jax.plans.aot ... --lora-rank 16
# --largest-batch` found them).
LORA_PLANS = [aot.Plan("v5e-8", "fsdp=8", "train", 8, 4096)] + [  # the full fine-tune beside them (v4-8, v5e-16: above)
    aot.Plan(target, mesh, "train", batch, 4096, lora_rank=16)
    for target, mesh, batches in [("v4-8", "fsdp=4", (36, 40)), ("v5e-8", "fsdp=8", (32, 40)),
                                  ("v5e-16", "fsdp=16", (64, 80))]
    for batch in batches]
# The Mistral 3 generation's long context: Ministral 3 8B with a 128k-token prompt then as many
# new tokens (262144 = its max_position_embeddings), batch 2 and 4, and Devstral 2 123B's
# generation, its bf16 weights (246 GB) split over 8 or 16 chips.
MISTRAL3_PLANS = [
    aot.Plan("v5e-16", "data=2,tensor=8", "generate", 2, 262144, "ministral-3-8b"),
    aot.Plan("v5p-8", "tensor=4", "generate", 4, 262144, "ministral-3-8b"),
    aot.Plan("cpu-8", "tensor=8", "generate", 4, 262144, "ministral-3-8b"),
    aot.Plan("v5p-8", "tensor=4", "generate", 8, 8192, "devstral-2-123b"),
    aot.Plan("v5p-32", "data=2,tensor=8", "generate", 16, 8192, "devstral-2-123b"),
    aot.Plan("cpu-8", "tensor=8", "generate", 8, 8192, "devstral-2-123b"),
]
# Latent attention with fine-grained experts: Mistral Small 4 (119B, bf16 238 GB) generating
# 32k-token contexts with its heads or its experts over the chips, fine-tuned with rank-16 LoRA
# on its attention's projections (the base frozen in bf16); Large 3 (673B, 1.35 TB in bf16)
# generating over 16 chips, and over the 8-GPU stand-in, which cannot hold it.
MISTRAL4_PLANS = [
    aot.Plan("v5p-8", "tensor=4", "generate", 16, 32768, "mistral-small-4"),
    aot.Plan("v5p-8", "expert=4", "generate", 16, 32768, "mistral-small-4"),
    aot.Plan("cpu-8", "tensor=8", "generate", 16, 32768, "mistral-small-4"),
    aot.Plan("v5p-32", "fsdp=16", "train", 16, 4096, "mistral-small-4", lora_rank=16),
    aot.Plan("cpu-8", "fsdp=8", "train", 8, 4096, "mistral-small-4", lora_rank=16),
    aot.Plan("v5p-32", "tensor=16", "generate", 4, 8192, "mistral-large-3"),
    aot.Plan("cpu-8", "tensor=8", "generate", 4, 8192, "mistral-large-3"),
]
# serve.py's programs (inference/engine.py) with N slots of L tokens, tensor-parallel over the
# chips: Mistral 7B with slots of its 4096-token window, Ministral 3 8B with 32k-token slots.
SERVE_PLANS = [
    aot.Plan("v5e-8", "tensor=8", "serve", 128, 4096),
    aot.Plan("v4-8", "tensor=4", "serve", 64, 4096),
    aot.Plan("cpu-8", "tensor=8", "serve", 64, 4096),
    aot.Plan("v5e-8", "tensor=8", "serve", 8, 32768, "ministral-3-8b"),
    aot.Plan("v5p-8", "tensor=4", "serve", 32, 32768, "ministral-3-8b"),
    aot.Plan("cpu-8", "tensor=8", "serve", 16, 32768, "ministral-3-8b"),
]
# Images in (the 0.4B Pixtral tower, presets.PIXTRAL): Ministral 3 8B and Mistral Small 4 with a
# 1024 x 1024 image per prompt (1036² as mistral-common sizes it: 1369 image tokens, 37 row
# breaks) in 8192-token contexts: the encoder over the batch's images, then prefill and decode.
VISION_PLANS = [
    aot.Plan("v5e-8", "tensor=8", "generate", 8, 8192, "ministral-3-8b", image=1024),
    aot.Plan("cpu-8", "tensor=8", "generate", 8, 8192, "ministral-3-8b", image=1024),
    aot.Plan("v5p-8", "tensor=4", "generate", 16, 8192, "mistral-small-4", image=1024),
    aot.Plan("cpu-8", "tensor=8", "generate", 16, 8192, "mistral-small-4", image=1024),
]
# Low-bit weights on one device: Mistral 7B generating (prefill + decode, 4096-token contexts) with
# bf16, int8 (per channel) and int4 (groups of 128) weights, and its rank-16 LoRA step on one
# 4096-token sequence with the frozen base in bf16 (LoRA) or int8 / int4 (QLoRA), on one 16 GiB
# TPU v5e chip and the stand-in for one 24 GB GPU.
QUANTIZED_PLANS = [
    *(aot.Plan(target, "tensor=1", "generate", batch, 4096, quantize=weights)
      for target in ("v5e-1", "cpu-24g") for batch in (1, 8) for weights in (None, "int8", "int4")),
    *(aot.Plan(target, "fsdp=1", "train", 1, 4096, lora_rank=16, quantize=base)
      for target in ("v5e-1", "cpu-24g") for base in (None, "int8", "int4")),
]
TABLES = {"dense": ("aot", PLANS), "experts": ("aot:experts", EXPERT_PLANS), "lora": ("aot:lora", LORA_PLANS),
          "mistral3": ("aot:mistral3", MISTRAL3_PLANS), "mistral4": ("aot:mistral4", MISTRAL4_PLANS),
          "serve": ("aot:serve", SERVE_PLANS), "vision": ("aot:vision", VISION_PLANS),
          "quantized": ("aot:quantized", QUANTIZED_PLANS)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=sorted(TABLES), default=sorted(TABLES))
    p.add_argument("--write", action="store_true", help="rewrite the tables in docs/SCALING.md")
    args = p.parse_args()
    aot.compile_only_environment()
    for table in args.only:
        section, plans = TABLES[table]
        print(aot.HEADER)
        rows = aot.compile_rows(plans)
        if args.write:
            rewrite_section(SCALING, section, "\n".join([aot.HEADER, *rows]))


if __name__ == "__main__":
    run(main)

"""Images in (small-vision: the small text model behind a Pixtral tower of the released width,
1024 wide with 16 heads, cut to 4 of its 24 layers) against HF transformers'
Mistral3ForConditionalGeneration (sdpa attention): the encoder and projector on one 448 x 448
image (1024 patches, 256 image tokens) and on a batch of 4 such images, and the prefill of a
prompt showing the image (its 272 image tokens among 64 of text) to its first token.

Rates count patches per second through the encoder, prompt tokens per second through the
prefill.
"""

from __future__ import annotations

import os

import numpy as np

from bench.common import CONFIGS, random_hf_model, timed

SIDE, TEXT = 448, 64  # the image's side in pixels; text tokens around it in the prompt


def run(bandwidth: float, peak_flops: float, names=("small-vision",), reps: int = 3, side: str = "ours") -> list[dict]:
    del bandwidth, peak_flops
    import torch

    torch.set_num_threads(os.cpu_count())
    rows = []
    for name in names:
        if CONFIGS[name].vision is None:
            raise ValueError(f"the vision suite runs configs with a vision encoder (small-vision), not {name}")
        hf, (config, params) = random_hf_model(CONFIGS[name])
        images, prompt = _inputs(config)
        times = _ours(config, params, images, prompt, reps) if side == "ours" else _hf(hf, images, prompt, reps)
        patches = (SIDE // config.vision.patch_size) ** 2
        for workload, count in ((f"encode 1 image {SIDE}²", patches), (f"encode 4 images {SIDE}²", 4 * patches),
                                (f"prefill {len(prompt)} tokens with the image + first token", len(prompt))):
            unit = "patch/s" if workload.startswith("encode") else "tok/s"
            rows.append(dict(workload=f"{workload} {name}", unit=unit, **{side: count / times[workload]},
                             note=f"{'ours' if side == 'ours' else 'HF'}: {1e3 * times[workload]:.0f} ms"))
        del hf, params
    return rows


def _inputs(config) -> tuple[list[np.ndarray], list[int]]:
    """4 random images [3, SIDE, SIDE] and a prompt with the first one's tokens as mistral-common
    lays them out ([IMG] rows each closed by [IMG_BREAK], the last by [IMG_END]) amid text."""
    v = config.vision
    rng = np.random.default_rng(0)
    images = [rng.standard_normal((3, SIDE, SIDE), dtype=np.float32) for _ in range(4)]
    per_side = SIDE // v.pixels_per_token
    block = ([v.image_token_id] * per_side + [v.image_break_token_id]) * per_side
    block[-1] = v.image_end_token_id
    text = rng.integers(100, config.vocab_size, TEXT).tolist()
    return images, [1] + text[:TEXT // 2] + block + text[TEXT // 2:]


def _ours(config, params, images, prompt, reps: int) -> dict:
    from mistral_jax.inference.sampling import generate, image_embeddings

    return {f"encode 1 image {SIDE}²": timed(
                lambda: image_embeddings(params["vision"], config, images[:1]).block_until_ready(), reps=reps),
            f"encode 4 images {SIDE}²": timed(
                lambda: image_embeddings(params["vision"], config, images).block_until_ready(), reps=reps),
            f"prefill {len(prompt)} tokens with the image + first token": timed(
                lambda: generate(config, params, [prompt], 1, eos_id=None, images=[images[:1]]), reps=reps)}


def _hf(model, images, prompt, reps: int) -> dict:
    import torch

    pixels = torch.from_numpy(np.stack(images))
    sizes = torch.tensor([[SIDE, SIDE]] * len(images))

    def encode(n):
        with torch.no_grad():
            model.get_image_features(pixel_values=pixels[:n], image_sizes=sizes[:n])

    def prefill():
        with torch.no_grad():
            model.generate(torch.tensor([prompt]), pixel_values=pixels[:1], image_sizes=sizes[:1], max_new_tokens=1,
                           do_sample=False, eos_token_id=None, pad_token_id=0)

    return {f"encode 1 image {SIDE}²": timed(lambda: encode(1), reps=reps),
            f"encode 4 images {SIDE}²": timed(lambda: encode(4), reps=reps),
            f"prefill {len(prompt)} tokens with the image + first token": timed(prefill, reps=reps)}

"""Peak memory of convert_weights.py on a generated ~1B-parameter checkpoint, each layout.

  python bench/convert_memory.py [--layers 20] [--dtype bfloat16]

Writes random bf16 checkpoints (HF sharded safetensors, Mistral-native consolidated.00.pth,
and HF with every projection in FP8 with 128 x 128 block scales, as transformers'
fine-grained FP8 stores them) to a temporary directory, converts each in a fresh process, and
reports that process's peak RSS against the output size. The fixed overhead is the peak RSS
of converting a tiny model the same way (interpreter, JAX, orbax, torch).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from mistral_jax.checkpoints.layouts import tensor_names, torch_view  # noqa: E402
from mistral_jax.model.config import MistralConfig  # noqa: E402
from mistral_jax.model.transformer import abstract_params  # noqa: E402
from mistral_jax.runtime.cli import directory_size, human_bytes  # noqa: E402


def fp8_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w in float8 e4m3 and its scale per block, each max |w| / 448 of its block."""
    rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
    padded = torch.zeros(rows * block, cols * block)
    padded[:w.shape[0], :w.shape[1]] = w.float()
    scale = padded.reshape(rows, block, cols, block).abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448
    expanded = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:w.shape[0], :w.shape[1]]
    return (w.float() / expanded).to(torch.float8_e4m3fn), scale


def write_checkpoint(out_dir: str, config: MistralConfig, layout: str) -> None:
    os.makedirs(out_dir)
    fp8 = layout == "hf-fp8"
    layout = "hf" if fp8 else layout
    generator = torch.Generator().manual_seed(0)
    shapes = {tuple(k.key for k in path): leaf.shape
              for path, leaf in jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params(config)))[0]}

    def torch_shape(path, index):  # one parameter's shape in PyTorch's layout (np.empty: never touched)
        return torch_view(path[-1], np.empty(shapes[path][len(index):], np.int8)).shape

    state = {tensor.name: (torch.randn(torch_shape(path, index), generator=generator) * 0.02).to(torch.bfloat16)
             for (path, index), tensor in tensor_names(layout, config).items()}
    if fp8:
        for name in [n for n in state if n.endswith("proj.weight")]:
            state[name], state[name + "_scale_inv"] = fp8_blocks(state[name])
    if layout == "hf":
        config.replace(param_dtype="bfloat16").save_hf(out_dir)
        names = list(state)
        half = len(names) // 2  # two shards with an index, as hub checkpoints come
        shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
        for file, keys in shards.items():
            save_file({k: state[k] for k in keys}, os.path.join(out_dir, file))
        weight_map = {k: file for file, keys in shards.items() for k in keys}
        import json

        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    else:
        config.save_params(out_dir)
        torch.save(state, os.path.join(out_dir, "consolidated.00.pth"))


def peak_rss_of_conversion(src: str, dst: str, dtype: str) -> tuple[int, float]:
    """(peak RSS in bytes, seconds) of convert_weights.py in a child process."""
    code = (f"import resource, subprocess, sys; subprocess.run([sys.executable, {REPO + '/convert_weights.py'!r}, "
            f"{src!r}, {dst!r}, '--dtype', {dtype!r}], check=True, stderr=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) * 1024, time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args()
    config = MistralConfig(dim=2048, n_layers=args.layers, head_dim=128, hidden_dim=5632, n_heads=16,
                           n_kv_heads=8, vocab_size=32000, sliding_window=4096)
    tiny = config.replace(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2, vocab_size=256)
    print(f"model: {config.num_params / 1e9:.2f}B parameters; output dtype {args.dtype}; "
          f"python {sys.version.split()[0]}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        write_checkpoint(os.path.join(tmp, "tiny"), tiny, "hf")
        overhead, _ = peak_rss_of_conversion(os.path.join(tmp, "tiny"), os.path.join(tmp, "tiny-out"), args.dtype)
        print(f"fixed overhead (peak RSS converting a {tiny.num_params / 1e3:.0f}k-parameter model): "
              f"{human_bytes(overhead)}")
        print(f"{'layout':<28} {'output':>10} {'peak RSS':>10} {'(RSS - overhead) / output':>26} {'time':>8}")
        for layout, label in (("hf", "HF sharded safetensors"), ("native", "native consolidated.00.pth"),
                              ("hf-fp8", "HF FP8, 128 x 128 blocks")):
            src, dst = os.path.join(tmp, layout), os.path.join(tmp, layout + "-out")
            write_checkpoint(src, config, layout)
            rss, seconds = peak_rss_of_conversion(src, dst, args.dtype)
            size = directory_size(dst)
            print(f"{label:<28} {human_bytes(size):>10} {human_bytes(rss):>10} "
                  f"{(rss - overhead) / size:>26.2f} {seconds:>7.1f}s")


if __name__ == "__main__":
    main()

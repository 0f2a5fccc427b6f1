"""Converts PyTorch Mistral checkpoints to mistral_jax checkpoints, and back with --to-hf.

  python convert_weights.py SRC DST [--dtype bfloat16|float32] [--verify] [--overwrite]
  python convert_weights.py CKPT OUT --to-hf [--dtype ...] [--overwrite]

SRC: an HF transformers directory (config.json + *.safetensors or pytorch_model*.bin) or a
Mistral-native one (params.json + consolidated.safetensors or consolidated.00.pth).
"""

import argparse
import sys
import time

from mistral_jax.runtime import cli


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="PyTorch checkpoint directory (or, with --to-hf, a mistral_jax checkpoint)")
    p.add_argument("dst", help="output directory; written under a temporary name, renamed at the end")
    p.add_argument("--dtype", choices=["bfloat16", "float32"],
                   help="dtype of the written weights (default: bfloat16; with --to-hf, as stored)")
    p.add_argument("--to-hf", action="store_true", help="mistral_jax checkpoint -> HF transformers directory")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists and is not empty")
    p.add_argument("--verify", action="store_true",
                   help="run the PyTorch model of SRC beside the converted one (needs torch and transformers)")
    p.add_argument("--verify-tokens", type=int, default=256, help="tokens per row for --verify (2 rows)")
    p.add_argument("--verify-tol", type=float, default=1e-4,
                   help="--verify fails above this max |logit diff| relative to the logits' scale")
    args = p.parse_args()
    if args.verify and args.to_hf:
        p.error("--verify checks a PyTorch -> JAX conversion; it does not apply to --to-hf")
    if args.verify_tokens < 1:
        p.error("--verify-tokens must be positive")
    return args


def main():
    args = parse_args()
    from tqdm import tqdm

    from mistral_jax.checkpoints.convert import convert_pytorch_checkpoint, export_hf_checkpoint
    from mistral_jax.checkpoints.store import load_checkpoint

    start = time.perf_counter()
    progress = tqdm(desc="tensors", unit=" tensors", file=sys.stderr, leave=False)

    def on_tensor(name):
        progress.set_postfix_str(name, refresh=False)
        progress.update()

    convert = export_hf_checkpoint if args.to_hf else convert_pytorch_checkpoint
    try:
        config = convert(args.src, args.dst, args.dtype or (None if args.to_hf else "bfloat16"), args.overwrite,
                         on_start=lambda n: progress.reset(total=n), on_tensor=on_tensor)
    finally:
        progress.close()
    print(f"wrote {args.dst}: {cli.human_count(config.num_params)} parameters, {config.param_dtype}, "
          f"{cli.human_bytes(cli.directory_size(args.dst))}, {time.perf_counter() - start:.1f} s")

    if args.verify:
        from mistral_jax.checkpoints.verify import compare_with_pytorch

        config, params = load_checkpoint(args.dst)
        result = compare_with_pytorch(args.src, config, params, args.verify_tokens)
        print(f"verify: max |logit diff| {result.max_abs_diff:.3g} (logits up to {result.logit_scale:.3g}), "
              f"top-1 agreement {100 * result.top1_agreement:.2f}% over {result.n_tokens} tokens"
              + (f", with images ({result.n_images})" if result.n_images else ""))
        if not result.ok(args.verify_tol):
            print(f"error: logits differ by more than {args.verify_tol:g} x their scale", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    cli.run(main)

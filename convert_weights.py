"""Converts PyTorch Mistral checkpoints and GGUF files to mistral_jax checkpoints, and back with --to-hf.

  python convert_weights.py SRC DST [--dtype bfloat16|float32] [--quantize int8|int4] [--verify] [--overwrite]
  python convert_weights.py model.gguf DST [--dtype ...] [--tokenizer FILE] [--overwrite]
  python convert_weights.py CKPT OUT --to-hf [--dtype ...] [--overwrite]

SRC: an HF transformers directory (config.json + *.safetensors or pytorch_model*.bin), a
Mistral-native one (params.json + consolidated.safetensors or consolidated.00.pth), or a GGUF
file of a Llama-architecture model (llama.cpp, Ollama: Mistral 7B, Nemo, Small, Codestral): its
Q8_0 layer projections stay int8, every other quantized type is dequantized to --dtype; a
sentencepiece vocabulary becomes DST/tokenizer.model, any other needs --tokenizer.
"""

import argparse
import sys
import time

from mistral_jax.runtime import cli


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="PyTorch checkpoint directory or GGUF file (with --to-hf, a mistral_jax checkpoint)")
    p.add_argument("dst", help="output directory; written under a temporary name, renamed at the end")
    p.add_argument("--dtype", choices=["bfloat16", "float32"],
                   help="dtype of the written weights (default: bfloat16; with --to-hf, as stored)")
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help="write the layers' projections quantized: int8 per output channel, int4 in groups of "
                        "--quant-group inputs (the rest stays --dtype)")
    p.add_argument("--quant-group", type=int,
                   help="inputs per quantization scale (default: int8 a whole channel, int4 128)")
    p.add_argument("--to-hf", action="store_true", help="mistral_jax checkpoint -> HF transformers directory")
    p.add_argument("--tokenizer", metavar="FILE",
                   help="a GGUF source's tokenizer file (tekken.json, tokenizer.model...) to put in DST")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists and is not empty")
    p.add_argument("--verify", action="store_true",
                   help="run the PyTorch model of SRC beside the converted one (needs torch and transformers)")
    p.add_argument("--verify-tokens", type=int, default=256, help="tokens per row for --verify (2 rows)")
    p.add_argument("--verify-tol", type=float, default=1e-4,
                   help="--verify fails above this max |logit diff| relative to the logits' scale")
    args = p.parse_args()
    if args.verify and args.to_hf:
        p.error("--verify checks a PyTorch -> JAX conversion; it does not apply to --to-hf")
    if args.verify and args.quantize:
        p.error("--verify holds the conversion to the PyTorch model's logits, which quantized weights only "
                "approach; verify a float conversion, then quantize it")
    if args.to_hf and args.quantize:
        p.error("--quantize applies to a conversion into mistral_jax; --to-hf writes float weights")
    if args.quant_group is not None and not args.quantize:
        p.error("--quant-group needs --quantize")
    if args.quant_group is not None and args.quant_group < 1:
        p.error("--quant-group must be positive")
    if args.verify_tokens < 1:
        p.error("--verify-tokens must be positive")
    return args


def main():
    args = parse_args()
    from tqdm import tqdm

    from mistral_jax.checkpoints.convert import convert_pytorch_checkpoint, export_hf_checkpoint
    from mistral_jax.checkpoints.gguf import convert_gguf, is_gguf
    from mistral_jax.checkpoints.store import load_checkpoint

    gguf = not args.to_hf and is_gguf(args.src)
    if gguf and args.verify:
        raise ValueError("--verify runs the PyTorch model of a checkpoint directory; a GGUF source has none")
    if args.tokenizer and not gguf:  # a checkpoint directory's own tokenizer file is copied from it
        raise ValueError("--tokenizer is for GGUF sources")
    if gguf and args.quantize:
        raise ValueError("--quantize is for PyTorch sources; a GGUF file's Q8_0 projections stay int8 as they are")

    start = time.perf_counter()
    progress = tqdm(desc="tensors", unit=" tensors", file=sys.stderr, leave=False)

    def on_tensor(name):
        progress.set_postfix_str(name, refresh=False)
        progress.update()

    quantize = {} if args.to_hf else {"quantize": args.quantize, "group": args.quant_group}
    convert = export_hf_checkpoint if args.to_hf else convert_pytorch_checkpoint
    said = None  # what tokenizer a GGUF source's output got
    try:
        if gguf:
            config, said = convert_gguf(args.src, args.dst, args.dtype or "bfloat16", args.overwrite, args.tokenizer,
                                        on_start=lambda n: progress.reset(total=n), on_tensor=on_tensor)
        else:
            config = convert(args.src, args.dst, args.dtype or (None if args.to_hf else "bfloat16"), args.overwrite,
                             on_start=lambda n: progress.reset(total=n), on_tensor=on_tensor, **quantize)
    finally:
        progress.close()
    print(f"wrote {args.dst}: {cli.human_count(config.num_params)} parameters, {config.param_dtype}"
          + (f" ({args.quantize} projections)" if args.quantize and not args.to_hf else "") + ", "
          f"{cli.human_bytes(cli.directory_size(args.dst))}, {time.perf_counter() - start:.1f} s")
    if said:
        print(said)

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

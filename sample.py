"""Samples completions from a mistral_jax checkpoint (convert_weights.py or train.py output).

  python sample.py --checkpoint DIR --prompt "The capital of France is" [--prompt ...]
                   [--max-new-tokens 64] [--temperature 0.7 --top-k 50 --top-p 0.9] [--seed 0]

Prompts are encoded with BOS first, as Mistral models were trained; only the completions
are printed. With one prompt the completion streams as it is generated. Timings go to stderr.
"""

import argparse
import os
import sys
import time

from mistral_jax import cli


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="directory written by convert_weights.py or train.py")
    p.add_argument("--tokenizer", help="sentencepiece model (default: the checkpoint's tokenizer.model)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for a batch")
    p.add_argument("--prompt-file", action="append", default=[], help="a file whose text is one prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], help="compute dtype (default: as stored)")
    p.add_argument("--steps-per-call", type=int, default=16, help="decode steps per compiled call when streaming")
    return p.parse_args()


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    for file in args.prompt_file:
        try:
            with open(file) as f:
                prompts.append(f.read().rstrip("\n"))
        except OSError as e:
            raise ValueError(f"cannot read prompt file {file}: {e.strerror}") from None
    if not prompts:
        raise ValueError("give at least one --prompt or --prompt-file")
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise ValueError(f"prompt {i + 1} is empty")
    return prompts


def main():
    args = parse_args()
    prompts = read_prompts(args)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.steps_per_call < 1:
        raise ValueError(f"--steps-per-call must be at least 1, got {args.steps_per_call}")
    clock = cli.CompileClock()

    import jax

    from mistral_jax.checkpoint import load_checkpoint
    from mistral_jax.convert import find_tokenizer
    from mistral_jax.model import unstack_layers
    from mistral_jax.sampling import generate_stream, until_eos
    from mistral_jax.tokenizer import StreamDecoder, Tokenizer

    tokenizer_path = args.tokenizer or find_tokenizer(args.checkpoint)
    if tokenizer_path is None and os.path.isdir(args.checkpoint):
        raise ValueError(f"{args.checkpoint} has no tokenizer.model; pass --tokenizer")
    config, params = load_checkpoint(args.checkpoint, args.dtype)
    if jax.default_backend() == "cpu":
        # XLA:CPU copies each layer's weights out of the scanned stack every decode step; with
        # an array per layer it does not (BENCHMARKS.md: small's step 39 -> 20 ms). Not on
        # accelerators: compiled for TPU v5e-16 (7B, 8 x 4096), the per-layer program took 3x
        # the compile time and twice the prefill temporaries (0.62 vs 0.30 GB), for a gain
        # no one has measured there.
        params = unstack_layers(params, free_stacked=True)
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                         f"{config.vocab_size}: they do not belong together")
    encoded = [tokenizer.encode(p, bos=True) for p in prompts]

    stream = len(prompts) == 1
    generated = [[] for _ in prompts]
    text = StreamDecoder(tokenizer)
    start = time.perf_counter()
    pieces = generate_stream(config, params, encoded, args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_id=tokenizer.eos_id,
                             steps_per_call=args.steps_per_call if stream else None)
    first_piece = None
    for piece in pieces:
        if first_piece is None:
            first_piece = time.perf_counter() - start, clock.seconds
        for row, tokens in zip(generated, piece.tolist()):
            row.extend(tokens)
        if stream:
            sys.stdout.write(text.push(until_eos(piece[0].tolist(), tokenizer.eos_id)))
            sys.stdout.flush()
    total = time.perf_counter() - start
    if stream:
        print(text.flush())
    else:
        for i, row in enumerate(generated):
            if i:
                print("---")
            print(tokenizer.decode(until_eos(row, tokenizer.eos_id)))

    prefill_time = first_piece[0] - first_piece[1]
    decode_time = total - first_piece[0] - (clock.seconds - first_piece[1])
    n_prompt = sum(len(e) for e in encoded)
    n_decoded = sum(max(0, len(until_eos(row, tokenizer.eos_id)) - 1) for row in generated)
    print(f"compile {clock.seconds:.2f} s; prefill {n_prompt} tokens, {n_prompt / max(prefill_time, 1e-9):.0f} tok/s; "
          f"decode {n_decoded} tokens, {n_decoded / max(decode_time, 1e-9):.1f} tok/s", file=sys.stderr)


if __name__ == "__main__":
    cli.reexec_with_huge_pages()
    cli.run(main)

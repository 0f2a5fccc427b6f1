"""Trains a Mistral-architecture model.

  python train.py                       # the 15M-parameter default on Python's own docs, ~5 min on a laptop
  python train.py --data 'corpus/*.txt' --config mistral-15m --steps 2000 --mesh data=2,fsdp=4
  python train.py --init-from out/mistral-7b --data notes.jsonl --dtype bfloat16 --remat dots
  python train.py --out runs/default --resume        # continue exactly where a run stopped

Writes to --out: model/ (the final params, loadable by sample.py and convert_weights.py
--to-hf), checkpoints/ (resumable train states), tokenizer.model, config.json,
metrics.jsonl, tensorboard/ and loss.png.
"""

import argparse
import sys

from mistral_jax import cli


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["builtin"],
                   help="text files, globs, directories or .jsonl (\"text\" field); default: Python's docs")
    p.add_argument("--out", default="runs/default")
    p.add_argument("--config", help="a preset name or a config.json/params.json file (default: mistral-15m, "
                                    "or the --init-from checkpoint's)")
    p.add_argument("--init-from", help="a mistral_jax checkpoint to fine-tune (its config and tokenizer)")
    p.add_argument("--tokenizer", help="a sentencepiece model (default: trained on the data at first run)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds a run")
    for flag, default in (("steps", 150), ("batch-size", 8), ("seq-len", 256), ("grad-accum", 1),
                          ("warmup", 15), ("seed", 0), ("log-every", 10), ("eval-every", 100),
                          ("eval-batches", 4), ("save-every", 100), ("keep", 3), ("samples", 3),
                          ("sample-tokens", 48), ("loss-chunk", 128)):
        p.add_argument(f"--{flag}", type=int, default=default)
    for flag, default in (("lr", 3e-3), ("weight-decay", 0.1), ("clip", 1.0), ("z-loss", 0.0)):
        p.add_argument(f"--{flag}", type=float, default=default)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype; parameters and optimizer state stay float32")
    p.add_argument("--remat", choices=["none", "full", "dots", "dots_no_batch"], default="none")
    p.add_argument("--mesh", default="", help='e.g. "data=2,fsdp=2,tensor=2"; -1 = the rest (default: all fsdp)')
    p.add_argument("--peak-flops", type=float, help="peak FLOP/s of a device, for MFU (on CPU: of a process, "
                                                    "whose devices share its cores; default: measured)")
    p.add_argument("--distributed", action="store_true",
                   help="a multi-process run: jax.distributed.initialize(), which detects TPU pods and SLURM; "
                        "elsewhere give --coordinator, --num-processes and --process-id")
    p.add_argument("--coordinator", help="host:port of process 0 (implies --distributed)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    return p.parse_args()


def main():
    args = parse_args()
    import jax

    from mistral_jax import data, trainer
    from mistral_jax.experiment import initialize_distributed, prepare_run, print_samples, save_final_model

    if args.distributed or args.coordinator:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)

    run = prepare_run(args)
    hp = trainer.Hyperparameters(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                                 grad_accum=args.grad_accum, lr=args.lr, warmup=args.warmup,
                                 weight_decay=args.weight_decay, clip=args.clip, z_loss=args.z_loss, seed=args.seed,
                                 loss_chunk=args.loss_chunk)
    batches = data.TokenBatches(run.tokens, hp.seq_len, hp.batch_size, seed=hp.seed)
    if jax.process_index() == 0:
        print(f"model {cli.human_count(run.config.num_params)} parameters, {len(run.tokens):,} tokens of data, "
              f"{hp.steps} steps of {hp.batch_size} x {hp.seq_len} tokens on {run.mesh.devices.size} device(s) "
              f"(mesh {dict(run.mesh.shape)})", flush=True)
    state, interrupted = trainer.fit(run.config, hp, batches, run.mesh, args.out, params=run.params,
                                     resume=args.resume, log_every=args.log_every, eval_every=args.eval_every,
                                     eval_batches=args.eval_batches, save_every=args.save_every, keep=args.keep,
                                     peak_flops=run.peak_flops)
    if interrupted:
        print(f"interrupted: saved a checkpoint at step {int(state.step)}; continue with --resume", file=sys.stderr)
        return 130
    save_final_model(args.out, run, state.params)
    if args.samples:
        print_samples(run, state.params, args.samples, args.sample_tokens, args.seed)
    return 0


if __name__ == "__main__":
    cli.reexec_with_huge_pages()
    cli.run(main)

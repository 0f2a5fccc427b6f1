"""Trains a Mistral-architecture model.

  python train.py                       # the 15M-parameter default on Python's own docs, ~5 min on a laptop
  python train.py --data 'corpus/*.txt' --config mistral-15m --steps 2000 --mesh data=2,fsdp=4
  python train.py --init-from out/mistral-7b --data notes.jsonl --dtype bfloat16 --remat dots
  python train.py --init-from out/mistral-7b --data notes.jsonl --lora-rank 16 --lr 2e-4 --dtype bfloat16
  python train.py --out runs/default --resume        # continue exactly where a run stopped
  python train.py --out runs/default --resume-from 300 --lr 1e-3   # back to step 300's checkpoint

Writes to --out: model/ (the final params, loadable by sample.py and convert_weights.py
--to-hf), checkpoints/ (resumable train states), tokenizer.model, config.json,
metrics.jsonl, tensorboard/ and loss.png; .lock while it runs (one run per --out at a time).
With --lora-rank only the adapters are trained (the base frozen, in --base-dtype): model/
holds the base with them merged in, adapter/ the adapters as HF PEFT saves them.
"""

import sys

from mistral_jax.runtime import cli, platforms


def main():
    # The library is imported here, after platforms.restart_with_huge_pages has run.
    from mistral_jax.runtime import distributed
    from mistral_jax.training import trainer
    from mistral_jax.training.experiment import RunOptions, print_samples, save_final_model, training_run

    p = cli.parser(__doc__)
    for options_class in (RunOptions, trainer.Hyperparameters, trainer.Schedule):
        cli.add_options(p, options_class)
    args = p.parse_args()
    options, hp, schedule = (cli.options(c, args) for c in (RunOptions, trainer.Hyperparameters, trainer.Schedule))

    with training_run(options, hp) as run:  # --out locked until the end
        if distributed.is_primary():
            print(f"model {cli.human_count(run.config.num_params)} parameters (vocabulary {run.config.vocab_size}), "
                  f"{run.data_summary}, "
                  f"{hp.steps} steps of {hp.batch_size} x {hp.seq_len} tokens on {run.mesh.devices.size} device(s) "
                  f"(mesh {dict(run.mesh.shape)})", flush=True)
        state, interrupted = trainer.fit(run.config, hp, run.batches, run.mesh, options.out, schedule,
                                         params=run.params, resume=options.resume, resume_from=options.resume_from,
                                         peak_flops=run.peak_flops)
        if interrupted:
            print(f"interrupted: saved a checkpoint at step {int(state.step)}; continue with --resume", file=sys.stderr)
            return 130
        params = save_final_model(options.out, run, state.params)
        if options.samples:
            print_samples(run, params, options.samples, options.sample_tokens, hp.seed)
    return 0


if __name__ == "__main__":
    platforms.restart_with_huge_pages()
    cli.run(main)

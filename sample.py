"""Samples completions from a mistral_jax checkpoint (convert_weights.py or train.py output).

  python sample.py --checkpoint DIR --prompt "The capital of France is" [--prompt ...]
                   [--max-new-tokens 64] [--temperature 0.7 --top-k 50 --top-p 0.9] [--seed 0]
  python sample.py --checkpoint DIR --chat --system "Answer briefly." --prompt "What is RoPE?"
  python sample.py --checkpoint DIR --chat --tools tools.json --reasoning-effort high --prompt "Weather in Paris?"
  python sample.py --checkpoint DIR --chat --image photo.jpg --prompt "What is in this picture?"
  python sample.py --checkpoint DIR --interactive         # a conversation: one reply per line entered
  python sample.py --checkpoint BASE --adapter RUN/adapter --prompt "..."   # a LoRA adapter on its base

Prompts are encoded with BOS first, as Mistral models were trained; with --chat (and
--interactive) each is a user turn in the chat format of the checkpoint's tokenizer, as its
instruct model was trained, with --tools offered and --reasoning-effort asked for where the
format has them, and --image files shown to a vision model (each --chat prompt sees them all;
in --interactive, a line "/image FILE" shows one with the next turn); a reply's thinking
prints between "--- thinking ---" and "--- answer ---"
lines, and each tool call it makes as a line "tool call: name({...})". Only the completions
are printed; with one prompt the completion streams as it is generated. Timings go to stderr.
"""

import dataclasses
import json
import os
import sys
import time

from mistral_jax.runtime import cli, platforms
from mistral_jax.runtime.options import OptionError, Quantization, option, require_positive


@dataclasses.dataclass(frozen=True)
class SampleOptions(Quantization):
    """What to sample from, and how much."""

    checkpoint: str = option(help="directory written by convert_weights.py or train.py")
    tokenizer: str | None = option(None, "tokenizer file (default: the checkpoint's tokenizer.model*, tekken.json)")
    adapter: str | None = option(None, "a LoRA adapter in HF PEFT's format (train.py's adapter/), merged into the "
                                       "checkpoint's weights as they are loaded")
    prompt: tuple[str, ...] = option((), "a prompt; repeat for a batch", repeat=True)
    prompt_file: tuple[str, ...] = option((), "a file whose text is one prompt; repeatable", repeat=True)
    chat: bool = option(False, "each prompt is a user turn of its own conversation, in the tokenizer's chat format")
    system: str | None = option(None, "a system prompt for --chat and --interactive")
    tools: str | None = option(None, "a JSON file of tool definitions (OpenAI's format) offered in --chat and "
                                     "--interactive")
    reasoning_effort: str | None = option(None, "how hard a reasoning model thinks (e.g. none, low, high) in --chat "
                                                "and --interactive, where its tokenizer's format takes it (v15)")
    image: tuple[str, ...] = option((), "an image file (or data URL) a vision model sees with --chat's prompts, "
                                        "or with --interactive's first turn; repeat for several", repeat=True)
    interactive: bool = option(False, "a conversation on stdin: a reply streamed per line entered, the history "
                                      "kept; a line \"/image FILE\" shows an image with the next turn")
    max_new_tokens: int = option(64, "the most tokens generated per prompt (per reply)")
    seed: int = option(0, "PRNG seed of sampling")
    dtype: str | None = option(None, "compute dtype (default: as stored)", choices=("bfloat16", "float32"))
    steps_per_call: int = option(16, "decode steps per compiled call when streaming")

    def __post_init__(self):
        super().__post_init__()
        require_positive(self, "max_new_tokens", "steps_per_call")
        for name in ("system", "tools", "reasoning_effort", "image"):
            if getattr(self, name) not in (None, ()) and not (self.chat or self.interactive):
                raise OptionError(name, "needs --chat or --interactive (images are laid out by the chat format)")
        if self.interactive and (self.prompt or self.prompt_file):
            raise OptionError("interactive", "reads the conversation from stdin: give no --prompt or --prompt-file")

    def read_prompts(self) -> list[str]:
        prompts = list(self.prompt)
        for file in self.prompt_file:
            try:
                with open(file, encoding="utf-8") as f:
                    prompts.append(f.read().rstrip("\n"))
            except OSError as e:
                raise ValueError(f"cannot read prompt file {file}: {e.strerror}") from None
            except UnicodeDecodeError as e:
                raise ValueError(f"prompt file {file} is not UTF-8 text (byte {e.object[e.start]:#04x} at "
                                 f"offset {e.start})") from None
        if not prompts and not self.interactive:
            raise ValueError("give at least one --prompt or --prompt-file (or --interactive)")
        for i, prompt in enumerate(prompts):
            if not prompt.strip():
                raise ValueError(f"prompt {i + 1} is empty")
        return prompts

    def read_tools(self) -> list[dict] | None:
        if self.tools is None:
            return None
        try:
            with open(self.tools, encoding="utf-8") as f:
                tools = json.load(f)
        except OSError as e:
            raise ValueError(f"cannot read tools file {self.tools}: {e.strerror}") from None
        except ValueError as e:
            raise ValueError(f"tools file {self.tools} is not JSON: {e}") from None
        if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
            raise ValueError(f"tools file {self.tools} must hold a JSON list of tool definitions")
        return tools

    def conversation(self, *turns: str, images: dict[int, list[str]] | None = None) -> list[dict]:
        """Messages of a conversation: the system prompt (if any), then user and assistant turns,
        turn i showing the image files images[i] after its text."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
        for i, files in (images or {}).items():
            messages[i]["content"] = [{"type": "text", "text": turns[i]}] + [
                {"type": "image_url", "image_url": {"url": file}} for file in files]
        return system + messages


def complete(config, params, tokenizer, prompts: list[list[int]], options: SampleOptions, sampler,
             clock: cli.CompileClock, chat: bool = False, images=None) -> list[list[int]]:
    """The completion of each prompt (token ids; images: a list per prompt of its images, or
    None), until eos or max_new_tokens; with one prompt it is also written to stdout as it comes
    (a chat reply's thinking and tool calls shown apart, text/streaming.PrintedReply). Timings go
    to stderr."""
    from mistral_jax.inference.sampling import generate_stream, until_eos

    stream = len(prompts) == 1
    generated = [[] for _ in prompts]
    text = _printer(tokenizer, chat)
    start, compiled_before = time.perf_counter(), clock.seconds
    pieces = generate_stream(config, params, prompts, options.max_new_tokens, sampler=sampler, seed=options.seed,
                             eos_id=tokenizer.eos_id, steps_per_call=options.steps_per_call if stream else None,
                             images=images)
    first_piece = None
    for piece in pieces:
        if first_piece is None:
            first_piece = time.perf_counter() - start, clock.seconds - compiled_before
        for row, tokens in zip(generated, piece.tolist()):
            row.extend(tokens)
        if stream:
            sys.stdout.write(text.push(until_eos(piece[0].tolist(), tokenizer.eos_id)))
            sys.stdout.flush()
    total, compile_time = time.perf_counter() - start, clock.seconds - compiled_before
    if stream:
        print(text.flush(), flush=True)

    prefill_time = first_piece[0] - first_piece[1]
    decode_time = total - first_piece[0] - (compile_time - first_piece[1])
    n_prompt = sum(len(p) for p in prompts)
    n_decoded = sum(max(0, len(until_eos(row, tokenizer.eos_id)) - 1) for row in generated)
    print(f"compile {compile_time:.2f} s; prefill {n_prompt} tokens{_rate(n_prompt, prefill_time)}; "
          f"decode {n_decoded} tokens{_rate(n_decoded, decode_time)}", file=sys.stderr)
    return [until_eos(row, tokenizer.eos_id) for row in generated]


def _answer(tokenizer, reply: list[int]) -> str:
    """What a conversation's history keeps of a reply: its answer; for a reply of thinking or
    tool calls only (no results to give here), its text, since an empty turn is refused."""
    try:
        answer = tokenizer.parse_reply(reply).content
    except ValueError:  # a malformed tool call
        answer = ""
    if answer.strip():
        return answer
    return tokenizer.decode(reply).strip() or "(no answer)"


def _printer(tokenizer, chat: bool):
    """What turns a completion's tokens into printed text: a chat reply, or plain text."""
    from mistral_jax.text.streaming import PrintedReply, StreamDecoder

    return PrintedReply(tokenizer) if chat else StreamDecoder(tokenizer)


def _printed(tokenizer, tokens: list[int], chat: bool) -> str:
    printer = _printer(tokenizer, chat)
    return printer.push(tokens) + printer.flush()


def _rate(tokens: int, seconds: float) -> str:
    """The rate for the timing line; none where the time left after subtracting compiling is
    under what the two clocks resolve (it printed "prefill 6 tokens, 6000000000 tok/s")."""
    return f", {tokens / seconds:,.1f} tok/s" if tokens and seconds >= 1e-3 else ""


def main():
    # The library is imported here, after platforms.restart_with_huge_pages has run.
    from mistral_jax.checkpoints.store import load_checkpoint
    from mistral_jax.inference.sampling import Sampler
    from mistral_jax.model.quantize import held_for, quantize_params
    from mistral_jax.text.chat import has_images
    from mistral_jax.text.tokenizer import Tokenizer, find_tokenizer
    from mistral_jax.training.lora import load_peft, merge

    p = cli.parser(__doc__)
    cli.add_options(p, SampleOptions)
    cli.add_options(p, Sampler)
    args = p.parse_args()
    options, sampler = cli.options(SampleOptions, args), cli.options(Sampler, args)
    prompts, tools = options.read_prompts(), options.read_tools()
    clock = cli.CompileClock()

    tokenizer_path = options.tokenizer or find_tokenizer(options.checkpoint)
    if tokenizer_path is None and os.path.isdir(options.checkpoint):
        raise ValueError(f"{options.checkpoint} has no tokenizer file; pass --tokenizer")
    config, params = load_checkpoint(options.checkpoint, options.dtype, group=options.quant_group,
                                     quantize=None if options.adapter else options.quantize)
    if options.adapter:  # merged into the float weights, then quantized
        spec, adapters = load_peft(options.adapter, config)
        params = merge(params, adapters, spec)
        if options.quantize:
            params = quantize_params(config, params, options.quantize, options.quant_group)
    params = held_for(params, platforms.decode_platform())  # int4 as int8 on CPU
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                         f"{config.vocab_size}: they do not belong together")

    def chat(messages) -> tuple[list[int], list]:  # (ids, images) of a conversation
        if has_images(messages):
            return tokenizer.encode_multimodal_chat(messages, tools, options.reasoning_effort)
        return tokenizer.encode_chat(messages, tools, options.reasoning_effort), []

    if options.image and config.vision is None:
        raise ValueError(f"{options.checkpoint} is a model without a vision encoder: it cannot take --image")
    if options.interactive:
        turns, shown = [], {0: list(options.image)} if options.image else {}
        chat(options.conversation("?", images=shown))  # no chat format, a bad tool, effort or image: said first
        for line in sys.stdin:
            if line.startswith("/image "):
                shown.setdefault(len(turns), []).append(line.removeprefix("/image ").strip())
                try:  # a file that is no image: said now, and the conversation goes on without it
                    chat(options.conversation(*turns, "?", images=shown))
                except ValueError as e:
                    print(f"error: {e}", file=sys.stderr)
                    shown[len(turns)].pop()
                    continue
                print(f"(the next turn shows {len(shown[len(turns)])} image(s))", file=sys.stderr)
            elif line.strip():
                turns.append(line.rstrip("\n"))
                ids, images = chat(options.conversation(*turns, images=shown))
                (reply,) = complete(config, params, tokenizer, [ids], options, sampler, clock, chat=True,
                                    images=[images] if images else None)
                turns.append(_answer(tokenizer, reply))
        return
    images = None
    if options.chat:
        encoded, images = zip(*(chat(options.conversation(p, images={0: list(options.image)} if options.image
                                                          else None)) for p in prompts))
        encoded, images = list(encoded), (list(images) if options.image else None)
    else:
        encoded = [tokenizer.encode(p, bos=True) for p in prompts]
    completions = complete(config, params, tokenizer, encoded, options, sampler, clock, chat=options.chat,
                           images=images)
    if len(prompts) > 1:
        print("\n---\n".join(_printed(tokenizer, tokens, options.chat) for tokens in completions))


if __name__ == "__main__":
    platforms.restart_with_huge_pages()
    cli.run(main)

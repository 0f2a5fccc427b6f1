"""sample.py end to end: random-weight models converted by convert_weights.py with Mistral's
real tokenizers (v1, v7 with chat control tokens, Tekken), against HF transformers' greedy
generate on the ids mistral-common encodes, decoded by mistral-common."""

import json
import os
import shutil
import subprocess
import sys

import jax
import pytest
import torch
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer

import sample
from conftest import BUNDLED, REAL_TOKENIZER, REPO, assert_one_line_error, build_reference, run_script

def convert_with_tokenizer(root, tokenizer_file: str, name: str, vocab_size: int, seed: int):
    """A random HF model of vocab_size with tokenizer_file beside it (as `name`), converted by the CLI."""
    ref = build_reference(root / "hf", seed=seed, window=8, seq_len=4, hidden_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                          vocab_size=vocab_size, rope_theta=1e4)
    shutil.copy(tokenizer_file, root / "hf" / name)
    subprocess.run([sys.executable, os.path.join(REPO, "convert_weights.py"), str(root / "hf"), str(root / "jax"),
                    "--dtype", "float32"], check=True, capture_output=True)
    return ref, root / "jax"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The real v1 tokenizer (32000 tokens) as a bare tokenizer.model, as Mistral 7B v0.1 ships it."""
    return convert_with_tokenizer(tmp_path_factory.mktemp("sample"), REAL_TOKENIZER, "tokenizer.model", 32000, 3)


V7 = os.path.join(BUNDLED, "mistral_instruct_tokenizer_241114.model.v7")
TEKKEN = os.path.join(BUNDLED, "tekken_240718.json")


@pytest.fixture(scope="module")
def converted_v7(tmp_path_factory):
    """An instruct tokenizer with [INST] and [SYSTEM_PROMPT] control tokens (32768 tokens)."""
    return convert_with_tokenizer(tmp_path_factory.mktemp("v7"), V7, "tokenizer.model.v7", 32768, 4)


def test_sample_py_prints_hf_greedy_completion(converted):
    ref, checkpoint = converted
    prompt, new = "The capital of France is", 30  # several windows of 8
    out = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), "--checkpoint", str(checkpoint),
                          "--prompt", prompt, "--max-new-tokens", str(new), "--steps-per-call=7"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout == hf_greedy_text(ref.model, prompt, new) + "\n"
    assert "compile" in out.stderr and "tok/s" in out.stderr


def run(capsys, *argv):
    return run_script(capsys, sample, *argv)


def hf_greedy_ids(model, ids: list[int], new: int, eos: int = 2) -> list[int]:
    """transformers' greedy continuation of ids, up to before eos."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, eos_token_id=eos,
                             pad_token_id=0)[0, len(ids):].tolist()
    return out[:out.index(eos)] if eos in out else out


def chat_ids(tokenizer_file: str, messages: list[tuple[str, str]]) -> list[int]:
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[role](content=content) for role, content in messages])
    return MistralTokenizer.from_file(tokenizer_file).encode_chat_completion(request).tokens


def test_chat_prompts_get_hf_greedy_replies(converted_v7, capsys):
    """--chat --system: each prompt a conversation of its own, in v7's chat format."""
    ref, checkpoint = converted_v7
    status, out, err = run(capsys, "--checkpoint", checkpoint, "--chat", "--system", "Answer in one word.",
                           "--prompt", "Name a prime.", "--prompt", "What is 東京?", "--max-new-tokens", 16)
    assert status == 0, err
    mistral = MistralTokenizer.from_file(V7)
    expected = [mistral.decode(hf_greedy_ids(ref.model, chat_ids(V7, [("system", "Answer in one word."),
                                                                       ("user", prompt)]), 16))
                for prompt in ("Name a prime.", "What is 東京?")]
    assert out == "\n---\n".join(expected) + "\n"


def test_interactive_conversation_keeps_the_history(converted_v7):
    """--interactive, stdin piped: a reply streamed per line entered (blank lines skipped), each
    turn encoding the whole conversation so far."""
    ref, checkpoint = converted_v7
    result = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), "--checkpoint", str(checkpoint),
                             "--interactive", "--system", "Be brief.", "--max-new-tokens", "12"],
                            input="Name a prime.\n\nAnd an even one?\n", capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    out, err = result.stdout, result.stderr
    mistral, history, replies = MistralTokenizer.from_file(V7), [("system", "Be brief.")], []
    for line in ("Name a prime.", "And an even one?"):
        history.append(("user", line))
        replies.append(mistral.decode(hf_greedy_ids(ref.model, chat_ids(V7, history), 12)))
        history.append(("assistant", replies[-1]))
    assert out == "".join(reply + "\n" for reply in replies)
    assert err.count("; decode ") == 2  # one timing line per reply


def test_tekken_checkpoint_samples_end_to_end(tmp_path_factory):
    """A checkpoint that ships tekken.json (Nemo, Small 3): converted, found and decoded."""
    ref, checkpoint = convert_with_tokenizer(tmp_path_factory.mktemp("tekken"), TEKKEN, "tekken.json", 131072, 5)
    assert (checkpoint / "tekken.json").read_bytes() == open(TEKKEN, "rb").read()
    out = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), "--checkpoint", str(checkpoint),
                          "--prompt", "Bonjour, je m'appelle", "--max-new-tokens", "20", "--steps-per-call", "3"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    tekken = MistralTokenizer.from_file(TEKKEN).instruct_tokenizer.tokenizer
    ids = tekken.encode("Bonjour, je m'appelle", bos=True, eos=False)
    assert out.stdout == tekken.decode(hf_greedy_ids(ref.model, ids, 20)) + "\n"


def hf_greedy_text(model, prompt, new):
    """transformers' greedy completion of prompt (BOS first, eos 2), decoded by mistral-common."""
    reference = SentencePieceTokenizer(REAL_TOKENIZER)
    return reference.decode(hf_greedy_ids(model, reference.encode(prompt, bos=True, eos=False), new))


def test_batch_of_prompts_in_process(converted, capsys, tmp_path):
    """Two prompts of different lengths, one from a file; top-k 1 must be HF's greedy."""
    ref, checkpoint = converted
    (tmp_path / "prompt.txt").write_text("Once upon a time there was\n")
    status, out, _ = run(capsys, "--checkpoint", checkpoint, "--prompt", "Hello", "--prompt-file",
                         tmp_path / "prompt.txt", "--max-new-tokens", 12, "--temperature", 0.8, "--top-k", 1)
    assert status == 0
    expected = [hf_greedy_text(ref.model, p, 12) for p in ("Hello", "Once upon a time there was")]
    assert out == "\n---\n".join(expected) + "\n"


@pytest.mark.parametrize("argv,message", [
    (["--prompt", ""], "prompt 1 is empty"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be a positive integer, got 0"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature must be a finite number >= 0, got -1.0"),
    (["--prompt", "x", "--temperature", "nan"], "--temperature must be a finite number >= 0, got nan"),
    (["--prompt", "x", "--max-new-tokens", "1000000000"], "more than the model's max_seq_len"),
    (["--prompt", "x\udcff"], "text is not valid Unicode: a lone surrogate"),
    (["--prompt-file", "{not_utf8}"], r"prompt file .*not_utf8.txt is not UTF-8 text \(byte 0xff at offset 2\)"),
    (["--prompt", "x", "--top-p", "1.5"], r"--top-p must be in \(0, 1\], got 1.5"),
    (["--prompt", "word " * 600], "more than the model's max_seq_len"),
    (["--prompt", "x", "--tokenizer", REAL_TOKENIZER.replace("tokenizer.model.v1",
                                                             "mistral_instruct_tokenizer_240323.model.v3")],
     "tokenizer has 32768 tokens but the model's vocabulary is 32000"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "cannot read prompt file"),
    ([], "at least one --prompt"),
    (["--prompt", "x", "--system", "Be brief."], "--system needs --chat or --interactive"),
    (["--interactive", "--prompt", "x"], "--interactive reads the conversation from stdin"),
])
def test_bad_input(converted, capsys, tmp_path, argv, message):
    _, checkpoint = converted
    (tmp_path / "not_utf8.txt").write_bytes(b"ab\xff")
    argv = [a.format(not_utf8=tmp_path / "not_utf8.txt") for a in argv]
    assert_one_line_error(*run(capsys, "--checkpoint", checkpoint, *argv)[::2], message)


def test_no_rate_from_a_time_too_short_to_measure():
    """What is left of the prefill's time after subtracting compiling can be ~0: no rate then
    (it printed "prefill 6 tokens, 6000000000 tok/s")."""
    assert sample._rate(6, 1e-9) == sample._rate(6, 0.0) == sample._rate(0, 1.0) == ""
    assert sample._rate(6, 0.5) == ", 12.0 tok/s"


def test_missing_checkpoint(capsys, tmp_path):
    assert_one_line_error(*run(capsys, "--checkpoint", tmp_path / "absent", "--prompt", "x")[::2],
                          "checkpoint .*absent not found")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc tunable")
@pytest.mark.parametrize("before,after", [(None, "glibc.malloc.hugetlb=1"),
                                          ("glibc.malloc.tcache_count=0",
                                           "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1"),
                                          ("glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=0")])
def test_scripts_restart_with_huge_pages(before, after):
    """platforms.restart_with_huge_pages: the same process (exec'd) restarts with glibc's malloc on transparent huge
    pages, keeping other tunables and an explicit choice."""
    code = "from mistral_jax.runtime import platforms; platforms.restart_with_huge_pages(); import os; " \
           "print(os.getpid(), os.environ['GLIBC_TUNABLES'])"
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if before:
        env["GLIBC_TUNABLES"] = before
    child = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
    out, _ = child.communicate(timeout=60)
    assert out.split() == [str(child.pid), after]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc tunable")
@pytest.mark.parametrize("argv", [["train.py"], ["sample.py"]])
def test_each_script_runs_on_huge_pages(argv, tmp_path):
    """The scripts themselves: a sitecustomize reports GLIBC_TUNABLES at exit, which only the
    final process image reaches (exec skips atexit), here after --help."""
    (tmp_path / "sitecustomize.py").write_text(
        "import atexit, os, sys\n"
        "atexit.register(lambda: sys.stderr.write('TUNABLES=%s\\n' % os.environ.get('GLIBC_TUNABLES')))\n")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), REPO])
    result = subprocess.run([sys.executable, *argv, "--help"], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [line for line in result.stderr.splitlines() if line.startswith("TUNABLES=")] == \
        ["TUNABLES=glibc.malloc.hugetlb=1"]


def scripted_checkpoint(directory, tokenizer_file: str, prompt_end: int, script: list[int], eos: int):
    """A checkpoint whose model writes `script` then eos after any prompt ending in prompt_end:
    every block adds nothing (wo = w2 = 0), so the last hidden state is the last token's
    embedding, normed; the output projection's column of each scripted token is the embedding
    (normed) of the token before it, so that token wins by far over random near-orthogonal ones."""
    import numpy as np

    from mistral_jax.checkpoints.store import save_checkpoint
    from mistral_jax.model.config import MistralConfig
    from mistral_jax.model.transformer import init_params

    config = MistralConfig(dim=256, n_layers=1, head_dim=32, hidden_dim=64, n_heads=2, n_kv_heads=1,
                           vocab_size=131072, max_seq_len=512)
    params = jax.tree_util.tree_map(np.array, init_params(config, jax.random.key(0)))
    params["layers"]["attention"]["wo"][:] = 0
    params["layers"]["feed_forward"]["w2"][:] = 0
    embedding = params["tok_embeddings"]
    output = np.zeros_like(params["output"])
    for before, token in zip([prompt_end] + script, script + [eos]):
        row = embedding[before]
        output[:, token] = 4 * row / np.sqrt(np.mean(row ** 2))
    params["output"] = output
    save_checkpoint(str(directory), config, params, extra_files={"tekken.json": tokenizer_file})
    return directory


def test_chat_reply_shows_thinking_and_tool_calls(tmp_path, capsys):
    """--chat with --tools and --reasoning-effort (a v15 tokenizer) on a model that writes a
    reply with thinking, an answer and a tool call: streamed with the thinking apart and the
    call parsed, and the same printed for a batch."""
    from test_chat import versioned_tekken

    from mistral_jax.text.tokenizer import Tokenizer

    tokenizer_file = versioned_tekken(tmp_path, "v15")
    tokenizer = Tokenizer(tokenizer_file)
    control = tokenizer.control_id
    thinking, answer, name, arguments = "Weather: look it up", "I will check.", "get_weather", '{"city":"Paris"}'
    script = ([control("[THINK]")] + tokenizer.encode(thinking, bos=False) + [control("[/THINK]")]
              + tokenizer.encode(answer, bos=False) + [control("[TOOL_CALLS]")] + tokenizer.encode(name, bos=False)
              + [control("[ARGS]")] + tokenizer.encode(arguments, bos=False))
    assert len(set(script)) == len(script)  # each token has one successor
    checkpoint = scripted_checkpoint(tmp_path / "ckpt", tokenizer_file, control("[/INST]"), script,
                                     tokenizer.eos_id)
    (tmp_path / "tools.json").write_text(json.dumps([{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]))
    expected = (f"--- thinking ---\n{thinking}\n--- answer ---\n{answer}\n"
                f'tool call: get_weather({{"city": "Paris"}})')
    flags = ["--checkpoint", checkpoint, "--chat", "--tools", tmp_path / "tools.json", "--reasoning-effort", "high",
             "--max-new-tokens", 40, "--steps-per-call", 3]
    status, out, err = run(capsys, *flags, "--prompt", "Weather in Paris?")
    assert status == 0, err
    assert out == expected + "\n"
    status, out, err = run(capsys, *flags, "--prompt", "Weather in Paris?", "--prompt", "And in Rome?")
    assert status == 0, err
    assert out == expected + "\n---\n" + expected + "\n"
    status, _, err = run(capsys, *flags[:-4], "--reasoning-effort", "maximal", "--prompt", "Hi")
    assert_one_line_error(status, err, "not a conversation the chat format accepts")


def test_interactive_goes_on_after_a_reply_of_tool_calls_only(tmp_path):
    """--interactive with a model that answers every turn with a tool call and no text: each
    call is printed, and the history keeps the reply's text, so the next turn is accepted."""
    from test_chat import versioned_tekken

    from mistral_jax.text.tokenizer import Tokenizer

    tokenizer_file = versioned_tekken(tmp_path, "v13")
    tokenizer = Tokenizer(tokenizer_file)
    script = ([tokenizer.control_id("[TOOL_CALLS]")] + tokenizer.encode("get_time", bos=False)
              + [tokenizer.control_id("[ARGS]")] + tokenizer.encode('{"tz":"CET"}', bos=False))
    assert len(set(script)) == len(script)
    checkpoint = scripted_checkpoint(tmp_path / "ckpt", tokenizer_file, tokenizer.control_id("[/INST]"), script,
                                     tokenizer.eos_id)
    result = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), "--checkpoint", str(checkpoint),
                             "--interactive", "--max-new-tokens", "20"], input="What time is it?\nAnd now?\n",
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == 'tool call: get_time({"tz": "CET"})\n' * 2

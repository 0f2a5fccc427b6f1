"""tokenizer.py against mistral-common, and sample.py end to end with the real Mistral
tokenizer on a random-weight model converted by convert_weights.py."""

import os
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece
import torch
from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer

import sample
from conftest import REAL_TOKENIZER, REPO, assert_one_line_error, build_reference, run_script
from mistral_jax.tokenizer import StreamDecoder, Tokenizer

TEXTS = ["Hello world", "The capital of France is", "  leading spaces\nand a newline",
         "naïve café, 東京 and emoji 🙂", "def f(x):\n    return x ** 2"]


def test_tokenizer_matches_mistral_common():
    ours, reference = Tokenizer(REAL_TOKENIZER), SentencePieceTokenizer(REAL_TOKENIZER)
    assert (ours.vocab_size, ours.bos_id, ours.eos_id) == (reference.n_words, reference.bos_id, reference.eos_id)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference.encode(text, bos=True, eos=False)
        assert ours.decode(ids) == reference.decode(ids) == text


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_stream_decoder_pieces_join_to_the_whole_decode(size):
    """Real text, a character spelled in byte-fallback tokens split across pieces, random ids,
    pushed `size` tokens at a time, against the real tokenizer's whole decode."""
    tokenizer = Tokenizer(REAL_TOKENIZER)
    real = tokenizer.encode(" ".join(TEXTS), bos=False)
    pieces = sentencepiece.SentencePieceProcessor(model_file=REAL_TOKENIZER)
    parrot = [pieces.piece_to_id(f"<0x{b:02X}>") for b in "🦜".encode()]
    assert tokenizer.decode(parrot) == "🦜"  # four byte-fallback tokens, one character
    random_ids = np.random.default_rng(size).integers(3, tokenizer.vocab_size, 300).tolist()
    for ids in (real, real[:5] + parrot + real[5:], random_ids, parrot[1:] + real):  # the last: dangling bytes
        stream = StreamDecoder(tokenizer)
        pieces = [stream.push(ids[i:i + size]) for i in range(0, len(ids), size)]
        assert "".join(pieces) + stream.flush() == tokenizer.decode(ids)
        assert "\ufffd" not in "".join(pieces[:-1]) or "\ufffd" in tokenizer.decode(ids)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A random model with the real tokenizer's 32000-token vocabulary, converted by the CLI."""
    root = tmp_path_factory.mktemp("sample")
    ref = build_reference(root / "hf", seed=3, window=8, seq_len=4, hidden_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                          vocab_size=32000, rope_theta=1e4)
    (root / "hf" / "tokenizer.model").write_bytes(open(REAL_TOKENIZER, "rb").read())
    subprocess.run([sys.executable, os.path.join(REPO, "convert_weights.py"), str(root / "hf"), str(root / "jax"),
                    "--dtype", "float32"], check=True, capture_output=True)
    return ref, root / "jax"


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


def hf_greedy_text(model, prompt, new):
    """transformers' greedy completion of prompt (BOS first, eos 2), decoded by mistral-common."""
    reference = SentencePieceTokenizer(REAL_TOKENIZER)
    ids = reference.encode(prompt, bos=True, eos=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, eos_token_id=2,
                             pad_token_id=0)[0, len(ids):].tolist()
    return reference.decode(out[:out.index(2)] if 2 in out else out)


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
    (["--prompt", "x", "--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
    (["--prompt", "x", "--top-p", "1.5"], r"--top-p must be in \(0, 1\], got 1.5"),
    (["--prompt", "word " * 600], "more than the model's max_seq_len"),
    (["--prompt", "x", "--tokenizer", REAL_TOKENIZER.replace("tokenizer.model.v1",
                                                             "mistral_instruct_tokenizer_240323.model.v3")],
     "tokenizer has 32768 tokens but the model's vocabulary is 32000"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "cannot read prompt file"),
    ([], "at least one --prompt"),
])
def test_bad_input(converted, capsys, argv, message):
    _, checkpoint = converted
    assert_one_line_error(*run(capsys, "--checkpoint", checkpoint, *argv)[::2], message)


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
    code = "from mistral_jax import platforms; platforms.restart_with_huge_pages(); import os; print(os.getpid(), " \
           "os.environ['GLIBC_TUNABLES'])"
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

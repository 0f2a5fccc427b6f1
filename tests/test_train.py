"""Training: data pipeline, tokenizer, optimizer step, resume, and train.py end to end."""

import ast
import json
import os
import re
import signal
import sys
import sysconfig

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import sample
import train
from conftest import REPO, assert_one_line_error, build_reference, forward, run_script
from mistral_jax.checkpoints import store
from mistral_jax.checkpoints.store import load_checkpoint
from mistral_jax.model.config import MistralConfig
from mistral_jax.model.transformer import init_params
from mistral_jax.runtime.sharding import make_mesh
from mistral_jax.text.tokenizer import Tokenizer
from mistral_jax.training import data, metrics, trainer

TINY = MistralConfig(dim=32, n_layers=2, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=512,
                     sliding_window=16, max_seq_len=64)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    data.train_tokenizer([data.BUILTIN], path, 512)
    return path


@pytest.fixture(scope="module")
def tokens(tokenizer_path, tmp_path_factory):
    return data.tokenize([data.BUILTIN], Tokenizer(tokenizer_path), str(tmp_path_factory.mktemp("cache")))


def test_builtin_corpus_and_tokenizer_offline(tokenizer_path, tokens, tmp_path):
    tokenizer = Tokenizer(tokenizer_path)
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (512, 1, 2)
    for document in [*data.builtin_documents()[:10], "naïve ünïcode → 東京"]:
        assert tokenizer.decode(tokenizer.encode(document)) == document  # byte fallback: lossless
    documents = data.builtin_documents()
    assert len(tokens) == sum(len(tokenizer.encode(d, bos=True, eos=True)) for d in documents)
    assert tokens.dtype == np.uint16 and tokens[0] == 1
    # Cached: the same key gives the same file; a different tokenizer, another.
    again = data.tokenize([data.BUILTIN], Tokenizer(tokenizer_path), os.path.dirname(tokens.filename))
    assert again.filename == tokens.filename


def test_builtin_corpus_is_the_docs_and_the_standard_librarys_docstrings():
    """Python's topic docs, then docstrings read from the standard library's sources (as ast
    reads them, never importing the modules), no duplicates, the same every time."""
    import pydoc_data.topics

    documents = data.builtin_documents()
    topics = list(dict.fromkeys(pydoc_data.topics.topics.values()))
    assert list(documents[:len(topics)]) == topics
    turtle = os.path.join(sysconfig.get_paths()["stdlib"], "turtle.py")
    with open(turtle, encoding="utf-8") as f:
        assert ast.get_docstring(ast.parse(f.read())) in documents
    assert "turtle" not in sys.modules  # read, not imported
    assert len(set(documents)) == len(documents) and sum(map(len, documents)) > 4 * sum(map(len, topics))
    assert data.builtin_documents.__wrapped__() == documents


def test_text_files_globs_and_jsonl(tmp_path, tokenizer_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("second")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "third"}) + "\n\n" + json.dumps({"text": "fourth"}) + "\n")
    assert list(data.documents([str(tmp_path)])) == ["first document", "third", "fourth", "second"]
    assert list(data.documents([str(tmp_path / "*.txt")])) == ["first document"]
    with pytest.raises(ValueError, match="no data files matched"):
        data.find_files([str(tmp_path / "*.csv")])
    (tmp_path / "bad.jsonl").write_text('{"title": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1 is not a JSON object with a \"text\" field"):
        list(data.documents([str(tmp_path / "bad.jsonl")]))


def test_batches_deterministic_and_partitioned_by_host(tokens):
    batches = data.TokenBatches(tokens, seq_len=32, global_batch=8, seed=3)
    whole = batches.batch(5)
    assert whole.shape == (8, 33)
    np.testing.assert_array_equal(np.concatenate([batches.batch(5, p, 4) for p in range(4)]), whole)
    np.testing.assert_array_equal(data.TokenBatches(tokens, 32, 8, seed=3).batch(5), whole)
    assert not np.array_equal(data.TokenBatches(tokens, 32, 8, seed=4).batch(5), whole)
    # An epoch visits every train window exactly once (distinct tokens make windows identifiable).
    counting = data.TokenBatches(np.arange(20_000, dtype=np.uint16), seq_len=32, global_batch=8)
    epoch = counting.n_windows // 8 * 8
    firsts = [int(row[0]) for step in range(epoch // 8) for row in counting.batch(step)]
    assert len(set(firsts)) == epoch and all(f % 32 == 0 for f in firsts)
    with pytest.raises(ValueError, match="too short for a batch"):
        data.TokenBatches(tokens[:300], seq_len=32, global_batch=16)


def hp(**changes):
    return trainer.Hyperparameters(**{**dict(steps=12, batch_size=8, seq_len=32, lr=3e-3, warmup=2), **changes})


def test_grad_accumulation_equals_one_big_batch(tokens):
    mesh = make_mesh("")
    batch = jnp.asarray(data.TokenBatches(tokens, 32, 8).batch(0))
    results = []
    for accum in (1, 4):
        h = hp(grad_accum=accum)
        tx = trainer.make_optimizer(h)
        state = trainer.init_state(TINY, tx, mesh, seed=0)
        step = trainer.make_train_step(TINY, tx, h, mesh, trainer.state_shardings(state))
        state, metrics = step(state, batch)
        results.append((jax.device_get(state.params), jax.device_get(metrics)))
    (p1, m1), (p4, m4) = results
    assert abs(m1["loss"] - m4["loss"]) < 1e-5 and abs(m1["grad_norm"] - m4["grad_norm"]) < 1e-4 * m1["grad_norm"]
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p4)):
        np.testing.assert_allclose(a, b, atol=2e-6)


class StopAt:
    """Batches that send this process SIGTERM when asked for the batch of a given step."""

    def __init__(self, batches, step):
        self.batches, self.step = batches, step

    def batch(self, step, *args):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.batches.batch(step, *args)

    def validation(self, *args):
        return self.batches.validation(*args)


def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_loss_goes_down_and_resume_is_exact(tokens, tmp_path):
    batches = data.TokenBatches(tokens, 32, 8)
    mesh = make_mesh("")
    kwargs = dict(schedule=trainer.Schedule(log_every=1, eval_every=100, save_every=4), peak_flops=None)
    trainer.fit(TINY, hp(steps=40), batches, mesh, str(tmp_path / "long"), **kwargs)
    curve = losses(tmp_path / "long")
    assert np.mean([curve[s] for s in range(36, 41)]) < np.mean([curve[s] for s in range(1, 6)]) - 1.0

    trainer.fit(TINY, hp(), batches, mesh, str(tmp_path / "a"), **kwargs)
    state, interrupted = trainer.fit(TINY, hp(), StopAt(batches, 6), mesh, str(tmp_path / "b"), **kwargs)
    assert interrupted and int(state.step) == 7  # the step in flight finished and was saved
    trainer.fit(TINY, hp(), batches, mesh, str(tmp_path / "b"), resume=True, **kwargs)
    uninterrupted, resumed = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(resumed) == list(range(1, 13))
    for step in range(8, 13):
        assert resumed[step] == uninterrupted[step], step  # bit-identical


@pytest.mark.parametrize("log_every", [1, 5])
def test_divergence_stops_with_a_finite_last_good_checkpoint(tokens, tmp_path, log_every):
    """A step whose gradients are non-finite while its loss is not (the fault campaign's
    --lr 1e4 --save-every 1) is caught before any state after it is saved, even between
    log steps: the checkpoint named "last good" holds only finite weights."""
    batches = data.TokenBatches(tokens, 32, 8)
    diverged = r"(loss|gradient norm) became (nan|inf) at step (\d+); the last good checkpoint is step (\d+)"
    with pytest.raises(trainer.TrainingDiverged, match=diverged) as e:
        trainer.fit(TINY, hp(steps=30, lr=1e4), batches, make_mesh(""), str(tmp_path),
                    trainer.Schedule(log_every=log_every, save_every=1))
    bad, good = map(int, re.search(diverged, str(e.value)).groups()[2:])
    assert good < bad
    manager = store.train_state_manager(str(tmp_path / "checkpoints"), 3)
    assert manager.latest_step() == good
    state = store.restore_train_state(manager, trainer.abstract_state(
        TINY, trainer.make_optimizer(hp(steps=30, lr=1e4)), make_mesh("")))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state.params))


def dot_flops(jaxpr) -> int:
    """2 x the multiply-adds of every dot_general a program runs: scan bodies (the layers,
    lax.map's blocks) counted once per iteration."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[i] for i in lhs_contract]))
        repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += repeat * dot_flops(sub)
    return total


@pytest.mark.parametrize("window,tied", [(16, False), (None, False), (None, True)])
def test_flops_count_equals_the_program_with_one_query_blocks(window, tied):
    """flops_per_token counts attention as the mask lets it be: with one-query blocks, the
    xla kernel computes exactly those products, so its jaxpr's dot FLOPs are the count (a tied
    embedding's output product included)."""
    config = TINY.replace(sliding_window=window, attention="xla", attention_block=1, tied_embeddings=tied)
    B, T = 2, 32
    params = init_params(config, jax.random.key(0))
    jaxpr = jax.make_jaxpr(lambda p, t: forward(config, p, t))(params, jnp.zeros((B, T), jnp.int32)).jaxpr
    assert dot_flops(jaxpr) == pytest.approx(B * T * metrics.flops_per_token(config, T, training=False), rel=1e-9)
    assert metrics.flops_per_token(config, T) == 3 * metrics.flops_per_token(config, T, training=False)


def run_train(capsys, *argv):
    return run_script(capsys, train, *argv)


@pytest.fixture(scope="module")
def tiny_config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    TINY.save_hf(path.parent)
    return path


def test_train_py_end_to_end(tiny_config_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MISTRAL_JAX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    status, stdout, stderr = run_train(capsys, "--config", tiny_config_file, "--out", out, "--steps", 20,
                                       "--batch-size", 8, "--seq-len", 32, "--log-every", 5, "--eval-every", 10,
                                       "--save-every", 10, "--samples", 2, "--sample-tokens", 8)
    assert status == 0, stderr
    assert "eval" in stdout and "--- The" in stdout and "tok/s" in stdout and "MFU" in stdout
    for name in ("model/params", "model/config.json", "model/tokenizer.model", "tokenizer.model", "metrics.jsonl",
                 "loss.png", "checkpoints/20", "tensorboard"):
        assert (out / name).exists(), name
    assert_exported_model_equals_hf(out / "model", tmp_path / "hf", transformers.MistralForCausalLM)

    status, _, stderr = run_train(capsys, "--config", tiny_config_file, "--out", out, "--steps", 20)
    assert_one_line_error(status, stderr, "holds a run: pass --resume")
    status, _, stderr = run_script(capsys, sample, "--checkpoint", out / "model", "--chat", "--prompt", "Hi")
    assert_one_line_error(status, stderr, "has no chat format")  # train.py's tokenizer has no [INST] tokens
    status, _, stderr = run_train(capsys, "--config", tiny_config_file, "--out", out, "--steps", 2, "--batch-size", 8,
                                  "--seq-len", 32, "--log-every", 1, "--samples", 0, "--overwrite")
    assert status == 0, stderr
    assert sorted(losses(out)) == [1, 2]  # a fresh run: the old metrics are gone


def write_small_corpus(path, n_words=300, size=200_000, seed=0) -> str:
    """~size characters of sentences over n_words made-up words: notes or lyrics, as far as the
    tokenizer is concerned."""
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), int(rng.integers(2, 9)))) for _ in range(n_words)]
    sentences = []
    while sum(map(len, sentences)) < size:
        sentences.append(" ".join(rng.choice(words, int(rng.integers(4, 12)))).capitalize() + ".")
    path.write_text("\n".join(sentences))
    return path.read_text()


def test_train_py_on_a_small_corpus(tiny_config_file, tmp_path, capsys, monkeypatch):
    """Your own ~200 kB of text: the tokenizer is fitted to the most pieces the data supports
    (said, and the model's vocabulary follows), the loss falls, sample.py reads the model."""
    monkeypatch.setenv("MISTRAL_JAX_CACHE", str(tmp_path / "cache"))
    text = write_small_corpus(tmp_path / "notes.txt")
    out = tmp_path / "run"
    status, stdout, stderr = run_train(capsys, "--data", tmp_path / "notes.txt", "--config", tiny_config_file,
                                       "--vocab-size", 8192, "--out", out, "--steps", 40, "--batch-size", 8,
                                       "--seq-len", 32, "--log-every", 1, "--eval-every", 40, "--samples", 1,
                                       "--sample-tokens", 8)
    assert status == 0, stderr
    fitted = int(re.search(r"the data supports at most (\d+) pieces", stdout)[1])
    assert 256 < fitted < 8192
    assert Tokenizer(str(out / "tokenizer.model")).vocab_size == fitted
    assert MistralConfig.from_dir(str(out / "model")).vocab_size == fitted
    curve = losses(out)
    assert np.mean([curve[s] for s in range(36, 41)]) < np.mean([curve[s] for s in range(1, 6)]) - 1.0
    status, completion, stderr = run_script(capsys, sample, "--checkpoint", out / "model", "--prompt",
                                            text.split()[0], "--max-new-tokens", 16)
    assert status == 0, stderr
    assert completion.strip() and set(completion.strip()) <= set(text)  # the corpus's characters


def assert_exported_model_equals_hf(model_dir, hf_dir, hf_class):
    """A final model/, exported by convert_weights.py --to-hf, computes the same logits in
    transformers' hf_class as here."""
    config, params = load_checkpoint(str(model_dir))
    assert run_cli_convert(model_dir, hf_dir) == 0
    hf = hf_class.from_pretrained(hf_dir, attn_implementation="eager")
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 40))
    with torch.no_grad():
        expected = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward(config, params, tokens)), expected, atol=1e-4)
    return config


def run_cli_convert(src, dst):
    import subprocess

    return subprocess.run([sys.executable, os.path.join(REPO, "convert_weights.py"), str(src), str(dst), "--to-hf"],
                          capture_output=True).returncode


@pytest.mark.parametrize("argv,message", [
    (["--data", "/nonexistent/*.txt"], "no data files matched"),
    (["--seq-len", "65"], "--seq-len 65 is longer than the model's max_seq_len 64"),
    (["--mesh", "data=3"], "mesh 'data=3' has 3 devices but there are 1"),
    (["--batch-size", "6", "--grad-accum", "4"], "--batch-size 6 must divide into grad_accum 4 micro-batches"),
    (["--loss-chunk", "0"], "--loss-chunk must be a positive integer, got 0"),
    (["--keep", "0"], "--keep must be a positive integer, got 0"),
    (["--router-z-loss", "-1"], "--router-z-loss must be non-negative, got -1.0"),
    (["--router-aux-loss", "nan"], "--router-aux-loss must be non-negative, got nan"),
    (["--init-from", "/nonexistent"], "checkpoint /nonexistent not found"),
    (["--data", "{short_text}", "--tokenizer", "{tokenizer}"], "too short for a batch"),
    (["--data", "{short_text}", "--vocab-size", "100"],
     "--vocab-size 100 cannot hold the data's characters and the byte pieces: it needs at least"),
    (["--vocab-size", "300", "--tokenizer", "{tokenizer}"], "--vocab-size applies to a tokenizer trained on the data"),
    (["--tokenizer", "{short_text}"], "neither a sentencepiece model nor a Tekken tokenizer"),
])
def test_bad_input(tiny_config_file, tokenizer_path, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setenv("MISTRAL_JAX_CACHE", str(tmp_path / "cache"))
    (tmp_path / "short.txt").write_text("Too short to train on. " * 20)
    argv = [a.format(short_text=tmp_path / "short.txt", tokenizer=tokenizer_path) for a in argv]
    status, _, stderr = run_train(capsys, "--config", tiny_config_file, "--out", tmp_path / "run", "--steps", 2,
                                  "--batch-size", 8, "--seq-len", 32, *argv)
    assert_one_line_error(status, stderr, message)


def test_checkpoints_that_is_a_file_is_refused_before_training(tiny_config_file, tmp_path, capsys, monkeypatch):
    """It used to fail at the first save, after training, and then hang (issue 15, item 1)."""
    monkeypatch.setenv("MISTRAL_JAX_CACHE", str(tmp_path / "cache"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("")
    status, stdout, stderr = run_train(capsys, "--config", tiny_config_file, "--out", tmp_path / "run", "--steps", 2,
                                       "--batch-size", 8, "--seq-len", 32)
    assert_one_line_error(status, stderr, r"run/checkpoints is not a directory")
    assert "step 1/" not in stdout  # nothing trained


def test_a_failed_run_exits_though_a_library_thread_still_waits(tmp_path):
    """What a failed orbax save leaves behind: a non-daemon thread waiting for a signal that
    never comes. The script still says its one-line error and exits 1 (it used to wait for
    the thread forever). The timeout makes a hang fail rather than block the suite."""
    code = ("import threading\n"
            "from mistral_jax.runtime import cli\n"
            "def main():\n"
            "    threading.Thread(target=threading.Event().wait, name='save-waiter').start()\n"
            "    raise OSError(28, 'No space left on device')\n"
            "cli.run(main)\n")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO})
    assert_one_line_error(out.returncode, out.stderr, "No space left on device")
    assert out.returncode == 1


def test_init_from_converted_weights(tokenizer_path, tmp_path, capsys, monkeypatch):
    """Fine-tuning starts from the converted weights: the first loss is the HF model's loss."""
    monkeypatch.setenv("MISTRAL_JAX_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "hf"
    reference = build_reference(src, seed=5, window=16, seq_len=4, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64,
                                vocab_size=512, rope_theta=1e4)  # the vocabulary of the tokenizer fixture
    (src / "tokenizer.model").write_bytes(open(tokenizer_path, "rb").read())
    assert run_cli_convert_to_jax(src, tmp_path / "jax") == 0
    out = tmp_path / "run"
    status, stdout, stderr = run_train(capsys, "--init-from", tmp_path / "jax", "--out", out, "--steps", 1,
                                       "--batch-size", 2, "--seq-len", 40, "--lr", 0, "--samples", 0,
                                       "--eval-every", 1000)
    assert status == 0, stderr
    batch = data.TokenBatches(data.tokenize([data.BUILTIN], Tokenizer(str(out / "tokenizer.model")), str(tmp_path / "cache")),
                              40, 2).batch(0)
    with torch.no_grad():
        logits = reference.model(torch.tensor(batch[:, :-1]).long()).logits
        hf_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                    torch.tensor(batch[:, 1:]).long().reshape(-1))
    assert losses(out)[1] == pytest.approx(float(hf_loss), abs=1e-4)

    status, _, stderr = run_train(capsys, "--init-from", tmp_path / "jax", "--config", "mistral-15m",
                                  "--out", tmp_path / "run2", "--steps", 1)
    assert_one_line_error(status, stderr, "has a different shape than --config mistral-15m")


def run_cli_convert_to_jax(src, dst):
    import subprocess

    return subprocess.run([sys.executable, os.path.join(REPO, "convert_weights.py"), str(src), str(dst),
                           "--dtype", "float32"], capture_output=True).returncode

"""The fault campaign's faults (issue 15), each kept as a test: one run per --out, early
failures that leave --out usable, damaged checkpoints found and named, resume from an older
or the newest intact step, non-finite steps skipped. docs/RELIABILITY.md is the table."""

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import convert_weights
import sample
import train
from conftest import REAL_TOKENIZER, REPO, assert_one_line_error, run_script
from mistral_jax.checkpoints import store
from mistral_jax.checkpoints.integrity import DamagedCheckpoint
from mistral_jax.checkpoints.store import load_checkpoint, save_checkpoint
from mistral_jax.checkpoints.tensor_files import SafetensorsFile, TensorFileError
from mistral_jax.model.transformer import init_params
from mistral_jax.runtime import locks
from mistral_jax.runtime.sharding import make_mesh
from mistral_jax.training import data, trainer
from test_train import TINY, StopAt, hp, losses, tiny_config_file, tokenizer_path, tokens  # noqa: F401, F811

TRAIN = ("--batch-size", 8, "--seq-len", 32, "--samples", 0)


@pytest.fixture
def run_train(tiny_config_file, capsys, tmp_path, monkeypatch):  # noqa: F811 - the imported fixture
    """train.py in this process on the tiny config: (status, stdout, stderr) of run_train(out, *flags)."""
    monkeypatch.setenv("MISTRAL_JAX_CACHE", str(tmp_path / "cache"))

    def run(out, *argv):
        return run_script(capsys, train, "--config", tiny_config_file, "--out", out, *TRAIN, *argv)

    run.config = tiny_config_file
    return run


def wait_for(condition, what, timeout=300):
    """Polls until condition() holds; a hang fails after timeout instead of blocking the suite."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def logged_steps(out) -> list[int]:
    """The steps of metrics.jsonl's complete lines (a live or killed writer may leave half of one)."""
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line)["step"] for line in f if line.endswith("\n")]


# ---- one run per --out -------------------------------------------------------------------

def test_a_live_run_holds_its_out_until_it_dies(tmp_path, run_train):
    """While train.py runs, a second run, a --resume and an --overwrite on its --out are
    refused at once (they used to run twice, join it, or delete its files); kill -9 frees
    --out, and the resume's metrics hold each step once (the killed run's records past its
    last checkpoint were written twice)."""
    out, log = tmp_path / "run", tmp_path / "live.stderr"
    with open(log, "w") as stderr_file:  # a file, not a pipe nobody reads while it runs
        live = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), "--config", run_train.config,
                                 "--out", out, *map(str, TRAIN), "--steps", "100000", "--save-every", "5",
                                 "--log-every", "1"], stdout=subprocess.DEVNULL, stderr=stderr_file,
                                env={**os.environ, "JAX_PLATFORMS": "cpu"})
    saved = lambda: store.saved_steps(str(out / "checkpoints"))  # noqa: E731
    try:
        wait_for(lambda: saved() or live.poll() is not None, "a checkpoint")
        assert live.poll() is None, log.read_text()
        for flags in ((), ("--resume",), ("--overwrite",), ("--resume-from", 5)):
            status, stdout, stderr = run_train(out, "--steps", 2, *flags)
            assert_one_line_error(status, stderr, rf"{out} is in use by another process \(pid {live.pid} on ")
            assert "step" not in stdout
        assert saved()  # --overwrite deleted nothing
        wait_for(lambda: max(logged_steps(out), default=0) > max(saved()) + 1, "steps logged past the last checkpoint")
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait(timeout=60)
    last, logged = max(saved()), max(logged_steps(out))
    status, stdout, stderr = run_train(out, "--resume", "--steps", last + 3, "--log-every", 1)
    assert status == 0, stderr
    assert f"resuming from step {last}" in stdout
    with open(out / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == list(range(1, last + 4)), (last, logged)


def test_a_checkpoint_being_written_is_not_taken_over(tmp_path, caplog):
    """Another process's .DST.partial is refused (it used to be deleted without a word); one
    left by a killed writer, which holds no lock, is cleared, saying so."""
    params = init_params(TINY, jax.random.key(0))
    partial = tmp_path / ".model.partial"
    partial.mkdir()
    (partial / "theirs").write_text("being written")
    with locks.exclusive(str(partial), "theirs"):
        with pytest.raises(locks.InUseError, match=r"model \(being written: .*\.model\.partial\) is in use"):
            save_checkpoint(str(tmp_path / "model"), TINY, params)
    assert (partial / "theirs").exists()
    save_checkpoint(str(tmp_path / "model"), TINY, params)
    assert "left by an interrupted write" in caplog.text
    assert not partial.exists() and not (tmp_path / "model" / "theirs").exists()
    load_checkpoint(str(tmp_path / "model"))


def test_a_filesystem_without_locks_is_said_not_fatal(tmp_path, monkeypatch, caplog):
    """GCS FUSE has no flock: the run goes on, warned that nothing guards its --out."""
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with locks.exclusive(str(tmp_path / ".lock"), str(tmp_path)):
        pass
    assert f"nothing keeps another process from writing {tmp_path}" in caplog.text


def test_a_failed_writes_stragglers_do_not_leave_a_partial(tmp_path, monkeypatch):
    """TensorStore writes still in flight when a save failed recreated their directories
    after the .partial was removed (a loaded CI run): the removal outlasts them."""
    remove = shutil.rmtree

    def remove_then_a_straggler_writes(path, **kwargs):
        remove(path, **kwargs)
        if not stragglers:
            stragglers.append(path)
            os.makedirs(os.path.join(path, "params.orbax-checkpoint-tmp", "ocdbt.process_0", "d"))

    stragglers = []
    monkeypatch.setattr(shutil, "rmtree", remove_then_a_straggler_writes)
    with pytest.raises(OSError, match="No space left"):
        with store.atomic_directory(str(tmp_path / "out")):
            raise OSError(28, "No space left on device")
    assert stragglers and os.listdir(tmp_path) == []


# ---- early failures ----------------------------------------------------------------------

def test_a_run_that_failed_before_its_first_checkpoint_leaves_out_usable(tmp_path, run_train):
    """NaN before the first save left an empty checkpoints/ that refused a plain rerun, and
    --resume restarted at step 1 appending to the old metrics."""
    out = tmp_path / "run"
    status, _, stderr = run_train(out, "--steps", 30, "--lr", 1e4, "--log-every", 1)
    assert_one_line_error(status, stderr, r"became (nan|inf) at step \d+; no checkpoint had been saved")
    assert losses(out)  # it logged steps before it stopped
    status, stdout, stderr = run_train(out, "--resume", "--steps", 2, "--log-every", 1)
    assert status == 0, stderr
    assert "has no checkpoint to resume from: starting at step 0" in stdout
    assert re.search(r"removing what an earlier run .* left without a complete checkpoint: .*metrics.jsonl", stdout)
    assert sorted(losses(out)) == [1, 2]
    status, _, stderr = run_train(out, "--steps", 2)
    assert_one_line_error(status, stderr, "holds a run")  # now it does


# ---- damaged checkpoints -----------------------------------------------------------------

def _largest_data_file(path):
    files = [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]
    return max(files, key=os.path.getsize)


DAMAGE = {
    "random bytes of the same size": lambda f: open(f, "r+b").write(
        np.random.default_rng(0).bytes(os.path.getsize(f))),
    "truncated": lambda f: os.truncate(f, os.path.getsize(f) // 2),
    "deleted": os.remove,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_path):  # noqa: F811 - the imported fixture
    path = tmp_path_factory.mktemp("model") / "model"
    save_checkpoint(str(path), TINY, init_params(TINY, jax.random.key(0)),
                    extra_files={"tokenizer.model": tokenizer_path})
    return path


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("target", ["a data file", "params/_METADATA", "params/manifest.ocdbt"])
def test_a_damaged_checkpoint_is_named_not_loaded(model_dir, tmp_path, capsys, damage, target):
    """Random bytes in a data file loaded silently (sample.py printed text, --to-hf wrote
    non-finite weights); a truncated or missing file spoke TensorStore."""
    damaged = tmp_path / "model"
    shutil.copytree(model_dir, damaged)
    file = _largest_data_file(damaged / "params") if target == "a data file" else str(damaged / target)
    DAMAGE[damage](file)
    with pytest.raises(DamagedCheckpoint, match=str(file) if damage != "deleted" else f"{file} is missing"):
        load_checkpoint(str(damaged))
    status, stdout, stderr = run_script(capsys, sample, "--checkpoint", damaged, "--prompt", "The")
    assert_one_line_error(status, stderr, f"{file} (has|is missing)")
    assert not stdout.strip()


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_a_damaged_checkpoint_without_checksums_is_one_line_too(model_dir, tmp_path, capsys, damage):
    """A checkpoint from before the checksums: what orbax raises becomes one line naming it."""
    damaged = tmp_path / "model"
    shutil.copytree(model_dir, damaged)
    os.remove(damaged / "checksums.json")
    DAMAGE[damage](_largest_data_file(damaged / "params"))
    status, _, stderr = run_script(capsys, sample, "--checkpoint", damaged, "--prompt", "The")
    assert_one_line_error(status, stderr, f"checkpoint {damaged} cannot be read")


# ---- resuming ----------------------------------------------------------------------------

SCHEDULE = trainer.Schedule(log_every=1, eval_every=100, save_every=4, keep=3)


@pytest.fixture(scope="module")
def uninterrupted(tokens, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("uninterrupted")
    trainer.fit(TINY, hp(steps=16), data.TokenBatches(tokens, 32, 8), make_mesh(""), str(out), SCHEDULE)
    return losses(out)


def test_resume_falls_back_past_a_damaged_checkpoint(tokens, tmp_path, uninterrupted, caplog):  # noqa: F811
    """The newest state is damaged: resume says so, moves it aside and continues from the one
    before, to the same losses as a run never interrupted (it used to resume from it, or fail
    in orbax's words)."""
    batches = data.TokenBatches(tokens, 32, 8)
    trainer.fit(TINY, hp(steps=16), StopAt(batches, 11), make_mesh(""), str(tmp_path), SCHEDULE)
    assert store.saved_steps(str(tmp_path / "checkpoints")) == [4, 8, 12]
    DAMAGE["random bytes of the same size"](_largest_data_file(tmp_path / "checkpoints" / "12"))
    state, _ = trainer.fit(TINY, hp(steps=16), batches, make_mesh(""), str(tmp_path), SCHEDULE, resume=True)
    assert "checkpoint step 12 is damaged" in caplog.text and "checksum mismatch" in caplog.text
    assert (tmp_path / "damaged_checkpoints" / "12").is_dir()
    assert int(state.step) == 16
    assert losses(tmp_path) == uninterrupted  # steps 9-16 re-run from step 8, bit-identical


def test_resume_from_an_older_step(tokens, tmp_path, uninterrupted, capsys):  # noqa: F811
    batches = data.TokenBatches(tokens, 32, 8)
    trainer.fit(TINY, hp(steps=16), batches, make_mesh(""), str(tmp_path), SCHEDULE)
    with pytest.raises(ValueError, match=r"no checkpoint of step 5 in .* \(there are: 8, 12, 16\)"):
        trainer.fit(TINY, hp(steps=16), batches, make_mesh(""), str(tmp_path), SCHEDULE, resume_from=5)
    trainer.fit(TINY, hp(steps=16), batches, make_mesh(""), str(tmp_path), SCHEDULE, resume_from=8)
    assert "resuming from step 8, discarding the checkpoints of steps 12, 16" in capsys.readouterr().out
    assert losses(tmp_path) == uninterrupted
    assert store.saved_steps(str(tmp_path / "checkpoints")) == [8, 12, 16]


def test_a_resume_with_no_steps_left_still_plots(tokens, tmp_path):  # noqa: F811
    batches = data.TokenBatches(tokens, 32, 8)
    trainer.fit(TINY, hp(steps=4), batches, make_mesh(""), str(tmp_path), SCHEDULE)
    os.remove(tmp_path / "loss.png")
    trainer.fit(TINY, hp(steps=4), batches, make_mesh(""), str(tmp_path), SCHEDULE, resume=True)
    assert (tmp_path / "loss.png").exists() and sorted(losses(tmp_path)) == [1, 2, 3, 4]


# ---- non-finite steps --------------------------------------------------------------------

class Corrupted:
    """Batches with an out-of-vocabulary token at the given steps: its embedding lookup is NaN,
    so are that step's loss and gradients (as a corrupt shard or an overflow would make them)."""

    def __init__(self, batches, steps):
        self.batches, self.steps = batches, steps

    def batch(self, step, *args):
        batch = self.batches.batch(step, *args).copy()
        if step in self.steps:
            batch[0, 0] = TINY.vocab_size
        return batch

    def validation(self, *args):
        return self.batches.validation(*args)


def test_skip_nonfinite_leaves_the_state_as_it_was(tokens, tmp_path):  # noqa: F811
    batches = Corrupted(data.TokenBatches(tokens, 32, 8), steps={2, 5})  # the 3rd and 6th steps
    schedule = trainer.Schedule(log_every=1, eval_every=100, save_every=1, keep=10)
    state, _ = trainer.fit(TINY, hp(steps=8, skip_nonfinite=2), batches, make_mesh(""), str(tmp_path), schedule)
    with open(tmp_path / "metrics.jsonl") as f:
        records = {r["step"]: r for r in map(json.loads, f)}
    assert [records[s]["skipped_steps"] for s in range(1, 9)] == [0, 0, 1, 1, 1, 2, 2, 2]
    assert not np.isfinite(records[3]["loss"]) and np.isfinite(records[8]["loss"])
    manager = store.train_state_manager(str(tmp_path / "checkpoints"), 10)
    abstract = trainer.abstract_state(TINY, trainer.make_optimizer(hp(steps=8)), make_mesh(""))
    saved = {s: jax.device_get(store.restore_train_state(manager, abstract, s)) for s in (2, 3, 4)}
    manager.close()
    for before, after in zip(jax.tree_util.tree_leaves((saved[2].params, saved[2].opt_state)),
                             jax.tree_util.tree_leaves((saved[3].params, saved[3].opt_state))):
        np.testing.assert_array_equal(before, after)  # step 3 (corrupt) changed nothing
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(saved[3].params),
                                                         jax.tree_util.tree_leaves(saved[4].params)))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state.params))

    batches.steps = {1, 3, 4}
    with pytest.raises(trainer.TrainingDiverged, match=r"loss became nan at step 5 \(after skipping 2\); the last "
                                                       r"good checkpoint is step 4 .*\(--resume-from 4\)"):
        trainer.fit(TINY, hp(steps=8, skip_nonfinite=2), batches, make_mesh(""), str(tmp_path / "b"), schedule)


# ---- bad flags ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--lr", "-1"], "--lr must be non-negative, got -1.0"),
    (["--lr", "nan"], "--lr must be non-negative, got nan"),
    (["--clip", "0"], "--clip must be a positive number, got 0.0"),
    (["--z-loss", "-1"], "--z-loss must be non-negative, got -1.0"),
    (["--b2", "1"], r"--b2 must be in \[0, 1\), got 1.0"),
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--save-every", "-5"], "--save-every must be a positive integer, got -5"),
    (["--log-every", "0"], "--log-every must be a positive integer, got 0"),
    (["--eval-every", "0"], "--eval-every must be a positive integer, got 0"),
    (["--eval-batches", "0"], "--eval-batches must be a positive integer, got 0"),
    (["--samples", "-1"], "--samples must be >= 0, got -1"),
    (["--sample-tokens", "0"], "--sample-tokens must be a positive integer, got 0"),
    (["--samples", "1", "--sample-tokens", "64"], r"--sample-tokens 64 after a \d+-token prompt is more than the "
                                                   "model's max_seq_len 64"),
    (["--skip-nonfinite", "-1"], "--skip-nonfinite must be >= 0, got -1"),
    (["--seed", str(2**64)], r"--seed must be in \[0, 2\*\*63\)"),
    (["--resume-from", "0"], "--resume-from must be a checkpoint's step"),
    (["--resume-from", "3"], "--resume-from 3: .* has no checkpoint"),
    (["--resume", "--overwrite"], "--overwrite starts afresh: give it without --resume"),
])
def test_bad_flags_are_refused_before_anything_runs(tmp_path, run_train, argv, message):
    status, stdout, stderr = run_train(tmp_path / "run", "--steps", 2, *argv)
    assert_one_line_error(status, stderr, message)
    assert "step 1/" not in stdout


# ---- paths and tensor files --------------------------------------------------------------

def convert(capsys, src, dst, *argv):
    return run_script(capsys, convert_weights, src, dst, *argv)


def hf_copy(ref, directory):
    """A copy of the reference's HF directory, its files real (not links)."""
    shutil.copytree(ref.dir, directory)
    return directory


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/hostname", "sub/model.safetensors", ".."])
def test_a_shard_index_names_only_files_beside_it(ref_windowed, tmp_path, capsys, shard):
    """model.safetensors.index.json entries pointing outside SRC were read."""
    src = hf_copy(ref_windowed, tmp_path / "src")
    names = [k for k in load_file(src / "model.safetensors")]
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))
    status, _, stderr = convert(capsys, src, tmp_path / "out")
    assert_one_line_error(status, stderr, r"names a shard that is not a file beside it")
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_link_must_point_to_a_tokenizer(ref_windowed, tmp_path, capsys):
    """A symlinked tokenizer.model was copied, its target's contents (any file) into the
    output; a link to a real tokenizer (an HF cache's files are all links) still converts."""
    src = hf_copy(ref_windowed, tmp_path / "src")
    (tmp_path / "secret.txt").write_text("not for sharing\n" * 100)
    os.symlink(tmp_path / "secret.txt", src / "tokenizer.model")
    status, _, stderr = convert(capsys, src, tmp_path / "out")
    assert_one_line_error(status, stderr, r"tokenizer.model is no tokenizer")
    assert not (tmp_path / "out").exists()
    os.remove(src / "tokenizer.model")
    os.symlink(REAL_TOKENIZER, src / "tokenizer.model")
    status, _, stderr = convert(capsys, src, tmp_path / "out")
    assert status == 0, stderr
    copied = tmp_path / "out" / "tokenizer.model"
    assert not copied.is_symlink() and copied.read_bytes() == open(REAL_TOKENIZER, "rb").read()


def test_safetensors_offsets_must_span_the_shape(tmp_path):
    """A header whose data_offsets disagree with the tensor's shape converted with rc 0."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}}).encode()
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    with pytest.raises(TensorFileError, match=r"tensor w's data_offsets \[0, 16\] do not span its shape \[4, 4\]"):
        SafetensorsFile(str(tmp_path / "bad.safetensors"))


def test_complex_weights_are_refused(ref_windowed, tmp_path, capsys):
    """A complex64 tensor in a .bin converted, with a warning, to its real part."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(os.path.join(ref_windowed.dir, "config.json"), src)
    state = {k: v.clone() for k, v in ref_windowed.model.state_dict().items()}
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.complex64)
    torch.save(state, src / "pytorch_model.bin")
    status, _, stderr = convert(capsys, src, tmp_path / "out")
    assert_one_line_error(status, stderr, r"tensor model.norm.weight has dtype complex64: weights are real")
    assert not (tmp_path / "out").exists()


def test_a_malicious_pickle_runs_no_code(ref_windowed, tmp_path, capsys):
    """A .bin whose unpickling would run a command: refused by torch's weights_only loader."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(os.path.join(ref_windowed.dir, "config.json"), src)
    torch.save({"model.norm.weight": Payload()}, src / "pytorch_model.bin")
    status, _, stderr = convert(capsys, src, tmp_path / "out")
    assert_one_line_error(status, stderr, r"cannot read .*pytorch_model.bin")
    assert not marker.exists() and not (tmp_path / "out").exists()

"""Continuous batching (inference/engine.py): requests coming and going through fewer slots than
there are requests, each getting exactly what generate() gives it alone, greedy equal to HF's."""

import jax
import numpy as np
import pytest
import torch

from conftest import build_reference
from mistral_jax import load_pytorch
from mistral_jax.inference import engine as engine_module
from mistral_jax.inference.engine import Engine, Request
from mistral_jax.inference.sampling import Sampler, generate

WINDOW = 8
compiled = []  # the names of the programs XLA compiles


def _record_compile(event, seconds, fun_name="", **_):
    if event == "/jax/core/compile/backend_compile_duration":
        compiled.append(fun_name)


jax.monitoring.register_event_duration_secs_listener(_record_compile)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A sliding-window model (window 8, GQA 4/2) as HF writes it, and ours of it."""
    ref = build_reference(tmp_path_factory.mktemp("engine"), seed=11, window=WINDOW, seq_len=4, hidden_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          intermediate_size=128, vocab_size=256, rope_theta=1e4)
    config, params = load_pytorch(ref.dir, dtype="float32")
    return ref, config, params


class Collected:
    """A request's emitted tokens and finish reasons, as the engine hands them over."""

    def __init__(self, prompt, max_tokens, sampler=Sampler(), seed=0, stop_after=None):
        self.tokens, self.finishes, self.calls = [], [], 0
        self.stop_after = stop_after
        self.request = Request(prompt, max_tokens, self.emit, sampler, seed)

    def emit(self, tokens, finish):
        self.tokens += tokens
        self.finishes.append(finish)
        self.calls += 1
        return self.stop_after is None or len(self.tokens) < self.stop_after


def hf_greedy_recompute(model, prompt, new, eos):
    """HF's greedy continuation by a full forward per token (its generate's sliding-window
    cache answers otherwise once a prompt is longer than the window)."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            token = int(model(torch.tensor([tokens])).logits[0, -1].argmax())
            if token == eos:
                break
            tokens.append(token)
    return tokens[len(prompt):]


def test_requests_through_few_slots_get_their_solo_results(model):
    """16 requests of mixed prompt and answer lengths (prompts several windows long, some
    ending at eos), greedy and sampled with top-k / top-p and their own seeds, through 4 slots:
    each equals generate() of it alone, and the greedy ones HF's greedy choice."""
    ref, config, params = model
    rng = np.random.default_rng(0)
    samplers = [Sampler(), Sampler(0.8), Sampler(1.0, top_k=20), Sampler(0.7, top_p=0.9), Sampler(1.3, 40, 0.8)]
    prompts = [rng.integers(0, config.vocab_size, int(rng.integers(1, 30))).tolist() for _ in range(16)]
    # An eos the model does emit: its commonest greedy token after these prompts.
    eos = int(np.bincount(np.ravel(generate(config, params, prompts, 12, eos_id=None))).argmax())
    runs = [Collected(p, int(rng.integers(1, 24)), samplers[i % 5], seed=100 + i) for i, p in enumerate(prompts)]
    engine = Engine(config, params, slots=4, max_len=64, steps_per_call=3, eos_id=eos)
    engine.compile()
    compiled.clear()
    for run in runs:
        engine.submit(run.request)
    busy = []
    while engine.step():
        busy.append(engine.active)
    assert max(busy) == 4 and engine.active == 0
    stopped = 0
    for run in runs:
        s, r = run.request.sampler, run.request
        alone = generate(config, params, [r.prompt], r.max_tokens, temperature=s.temperature, top_k=s.top_k,
                         top_p=s.top_p, seed=r.seed, eos_id=eos)[0]
        assert run.tokens == alone, (r.prompt, s)
        assert run.finishes[-1] == ("stop" if len(alone) < r.max_tokens else "length")
        assert run.finishes[:-1] == [None] * (run.calls - 1)
        stopped += run.finishes[-1] == "stop"
        if s.temperature == 0:
            assert run.tokens == hf_greedy_recompute(ref.model, r.prompt, r.max_tokens, eos)
    assert stopped >= 2  # eos did end some requests early
    # No decode program compiled as requests came and went (prefills did, per bucket of batch and length).
    assert "jit(advance)" not in compiled and "jit(admit)" in compiled, compiled


def test_cancel_and_stop_free_the_slot_for_the_next_request(model):
    """A request whose emit returns False (a stop string seen) or that is cancelled leaves its
    slot at once; the request waiting for it then gets it and its solo result."""
    _, config, params = model
    engine = Engine(config, params, slots=1, max_len=64, steps_per_call=2, eos_id=None)
    stopping = Collected([5, 6, 7], 40, stop_after=3)
    cancelled = Collected([8, 9], 40)
    waiting = Collected([10, 11, 12], 5)
    for run in (stopping, cancelled, waiting):
        engine.submit(run.request)
    engine.step()  # admits `stopping`: one token, then two more: it says stop
    assert len(stopping.tokens) == 3 and engine.active == 0
    engine.step()  # `cancelled` gets the slot
    assert engine.active == 1 and cancelled.calls == 2
    cancelled.request.cancelled = True
    engine.step()  # ... and gives it up unasked: `waiting` gets it
    assert cancelled.calls == 2 and engine.active == 1 and waiting.calls == 2
    while engine.step():
        pass
    assert waiting.tokens == generate(config, params, [[10, 11, 12]], 5, eos_id=None)[0]
    assert waiting.finishes[-1] == "length"


def test_the_prefill_budget_spreads_a_burst_over_steps(model):
    """Three 10-token prompts (padded to 16) with room for 16 prefill tokens per step: one is
    admitted per step, the others decoding meanwhile; each still gets its solo result."""
    _, config, params = model
    engine = Engine(config, params, slots=4, max_len=64, steps_per_call=2, eos_id=None, prefill_budget=16)
    runs = [Collected(list(range(3 + i, 13 + i)), 12) for i in range(3)]
    for run in runs:
        engine.submit(run.request)
    admitted = []
    while engine.step():
        admitted.append(engine.active)
    assert admitted[:3] == [1, 2, 3]
    for run in runs:
        assert run.tokens == generate(config, params, [run.request.prompt], 12, eos_id=None)[0]


def test_choose_is_sample_logits_per_row():
    """Per-row settings draw exactly what sampling.sample_logits draws for each row alone."""
    from mistral_jax.inference.sampling import sample_logits

    logits = jax.random.normal(jax.random.key(0), (5, 300)) * 3
    samplers = [Sampler(), Sampler(0.5), Sampler(1.0, top_k=7), Sampler(0.9, top_p=0.6), Sampler(2.0, 30, 0.95)]
    keys = jax.random.split(jax.random.key(1), 5)
    got = engine_module.choose(logits, keys, np.array([s.temperature for s in samplers], np.float32),
                               np.array([s.top_k or 0 for s in samplers], np.int32),
                               np.array([s.top_p or 0 for s in samplers], np.float32))
    for _ in range(3):
        want = [int(sample_logits(logits[i:i + 1], keys[i], s)[0]) for i, s in enumerate(samplers)]
        assert got.tolist() == want
        keys = jax.vmap(jax.random.fold_in, (0, None))(keys, 1)
        got = engine_module.choose(logits, keys, np.array([s.temperature for s in samplers], np.float32),
                                   np.array([s.top_k or 0 for s in samplers], np.int32),
                                   np.array([s.top_p or 0 for s in samplers], np.float32))


def test_requests_the_engine_cannot_run_are_refused(model):
    _, config, params = model
    engine = Engine(config, params, slots=2, max_len=32)
    for prompt, max_tokens, sampler, problem in [
            ([], 4, Sampler(), "non-empty"), ([1, 999], 4, Sampler(), "outside"), ([1] * 30, 3, Sampler(), "more than"),
            ([1], 0, Sampler(), "at least 1"), ([1], 4, Sampler(1.0, top_k=1000), "top_k")]:
        with pytest.raises(ValueError, match=problem):
            engine.submit(Request(prompt, max_tokens, lambda t, f: True, sampler))
    assert engine.pending == 0

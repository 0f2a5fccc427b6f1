"""Instruct fine-tuning: chat examples encoded as mistral-common encodes each message, packed
examples against HF transformers run on each one alone, DPO against PyTorch's own computation
of its formula, and train.py end to end on conversations and preference pairs."""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import BUNDLED, assert_one_line_error, run_script
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral_jax.checkpoints.convert import load_pytorch
from mistral_jax.runtime.sharding import make_mesh
from mistral_jax.text.tokenizer import Tokenizer
from mistral_jax.training import examples, lora, trainer

V3, V7, TEKKEN = (os.path.join(BUNDLED, name) for name in (
    "mistral_instruct_tokenizer_240323.model.v3", "mistral_instruct_tokenizer_241114.model.v7", "tekken_240911.json"))

ADD = {"type": "function", "function": {"name": "add", "description": "Adds two numbers.", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}}
CONVERSATIONS = {
    "turns": ([{"role": "system", "content": "Answer briefly."},
               {"role": "user", "content": "Hi there"},
               {"role": "assistant", "content": "Hello! How can I help?", "weight": 0},
               {"role": "user", "content": "What is 2 + 2?"},
               {"role": "assistant", "content": "4."},
               {"role": "user", "content": "And 3 + 3?"},
               {"role": "assistant", "content": "6."}], None, {0}),
    "tools": ([{"role": "user", "content": "Add 2 and 3."},
               {"role": "assistant", "tool_calls": [{"id": "call12345", "type": "function",
                                                     "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
               {"role": "tool", "tool_call_id": "call12345", "name": "add", "content": "5"},
               {"role": "assistant", "content": "2 + 3 = 5."}], [ADD], set()),
}


def per_message(tokenizer_file: str, messages: list, tools, weightless: set) -> tuple[list[int], list[int]]:
    """mistral-common's encoding message by message (mistral-finetune's way): the instruct
    tokenizer's start, then each normalised message's own encoder, the assistant's in the
    mask unless it is one of the `weightless` (indices among the assistant turns)."""
    mistral = MistralTokenizer.from_file(tokenizer_file, mode=ValidationMode.finetuning)
    plain = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    request = mistral._instruct_request_normalizer.from_chat_completion_request(
        ChatCompletionRequest.from_openai(plain, tools=tools))
    instruct = mistral.instruct_tokenizer
    users = [i for i, m in enumerate(request.messages) if isinstance(m, UserMessage)]
    ids = instruct.start()
    mask, turn = [0] * len(ids), 0
    for i, message in enumerate(request.messages):
        trained = 0
        if isinstance(message, UserMessage):
            tokens = instruct.encode_user_message(message, request.available_tools, i == users[-1], i == users[0],
                                                  system_prompt=request.system_prompt)[0]
        elif isinstance(message, AssistantMessage):
            tokens = instruct.encode_assistant_message(message, i < users[-1])
            trained, turn = int(turn not in weightless), turn + 1
        elif isinstance(message, ToolMessage):
            tokens = instruct.encode_tool_message(message, i < users[-1])[0]
        else:
            assert isinstance(message, SystemMessage)
            tokens = instruct.encode_system_message(message)[0]
        ids += tokens
        mask += [trained] * len(tokens)
    return ids, mask


@pytest.mark.parametrize("file", [V3, V7, TEKKEN], ids=["v3", "v7", "tekken"])
def test_chat_examples_are_mistral_commons_messages(file):
    tokenizer = Tokenizer(file)
    mistral = MistralTokenizer.from_file(file, mode=ValidationMode.finetuning)
    for name, (messages, tools, weightless) in CONVERSATIONS.items():
        ids, mask = tokenizer.encode_chat_for_training(messages, tools)
        expected_ids, expected_mask = per_message(file, messages, tools, weightless)
        assert ids == expected_ids and mask == expected_mask, name
        plain = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
        assert ids == mistral.encode_chat_completion(ChatCompletionRequest.from_openai(plain, tools=tools)).tokens
        # Each trained turn is the assistant's answer and its eos, as generation would end it.
        assert ids[-1] == tokenizer.eos_id and mask[-1] == 1 and mask[0] == 0
        if not (file == V3 and messages[0]["role"] == "system"):  # v3 moves the system prompt to the last turn
            prompt = tokenizer.encode_chat(messages[:-1], tools)
            assert ids[:len(prompt)] == prompt and all(mask[len(prompt):])  # the answer, all of it
    # "weight": 0 changes the mask, not the ids.
    messages = CONVERSATIONS["turns"][0]
    unweighted = tokenizer.encode_chat_for_training([{k: v for k, v in m.items() if k != "weight"} for m in messages])
    weighted = tokenizer.encode_chat_for_training(messages)
    assert unweighted[0] == weighted[0] and sum(unweighted[1]) > sum(weighted[1])


def test_bad_conversations_are_said():
    tokenizer = Tokenizer(V7)
    for messages, why in [
        ([{"role": "user", "content": "Hi"}], "Expected last role Assistant"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "weight": 0.5}], "weight"),
        ([{"role": "bot", "content": "Hi"}], "role"),
    ]:
        with pytest.raises(ValueError, match=why):
            tokenizer.encode_chat_for_training(messages)


def test_packing_keeps_examples_whole():
    rng = np.random.default_rng(0)
    items = [examples.Example(np.arange(n, dtype=np.int32), rng.random(n) < 0.5) for n in (9, 5, 7, 3, 11, 2)]
    rows = examples.pack(items, 16)
    # First fit: 8 + 4 in row 0, 6 does not fit (a row 1), 2 back in row 0, 10 in row 1, 1 in row 0.
    assert [[len(e) for e in row] for row in rows] == [[9, 5, 3, 2], [7, 11]]
    assert sorted(map(id, sum(rows, []))) == sorted(map(id, items))
    assert all(sum(len(e) - 1 for e in row) <= 16 for row in rows)
    assert [[len(e) for e in row] for row in examples.pack(items, 16, open_rows=1)] == [[9, 5], [7, 3], [11, 2]]
    for row in rows:
        arrays = examples.row_arrays(row, 16)
        start = 0
        for segment, example in enumerate(row):
            n = len(example) - 1
            np.testing.assert_array_equal(arrays["inputs"][start:start + n], example.ids[:-1])
            np.testing.assert_array_equal(arrays["targets"][start:start + n], example.ids[1:])
            np.testing.assert_array_equal(arrays["mask"][start:start + n], example.trained[1:])
            np.testing.assert_array_equal(arrays["positions"][start:start + n], np.arange(n))
            assert (arrays["segments"][start:start + n] == segment).all()
            start += n
        assert not arrays["mask"][start:].any() and (arrays["segments"][start:] == -1).all()


def hf_loss_and_gradients(model, items, tmp_path):
    """HF's autograd on each example alone: sum over examples of the masked token losses, over
    the count of trained targets; the gradients as our params (a checkpoint read back)."""
    model = copy.deepcopy(model)
    total = sum(int(e.trained[1:].sum()) for e in items)
    loss = 0.0
    for e in items:
        logits = model(torch.from_numpy(e.ids[None, :-1]).long()).logits.float()[0]
        token_losses = torch.nn.functional.cross_entropy(logits, torch.from_numpy(e.ids[1:]).long(), reduction="none")
        loss = loss + (token_losses * torch.from_numpy(e.trained[1:]).float()).sum() / total
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.grad)
    model.save_pretrained(tmp_path)
    return loss.item(), load_pytorch(str(tmp_path))[1]


# Ministral 3's gradients are held to test_mistral3's 1e-4: there our own packed and one-by-one
# gradients already differ by 8e-6 of their largest (float32 sums in another order).
@pytest.mark.parametrize("reference,kernels,tol", [("ref_windowed", ("xla", "dot_product", "splash"), 1e-5),
                                                   ("ref_ministral3", ("xla",), 1e-4)])
def test_packed_loss_and_gradients_equal_examples_run_alone(reference, kernels, tol, request, tmp_path):
    """Two rows of packed examples (some longer than the window, with masks) against HF on each
    example alone: Mistral through every attention kernel, and Ministral 3 (YaRN, the query
    scale by absolute position). Planted: no segment mask; positions not restarted, which only
    the query scale sees (RoPE is blind to a shift of a whole document's positions)."""
    ref = request.getfixturevalue(reference)
    vocab = ref.model.config.vocab_size
    rng = np.random.default_rng(1)
    items = []
    for n in (30, 21, 13, 40, 25):
        trained = rng.random(n) < 0.6
        trained[:3] = False  # a prompt
        ids = rng.integers(12, vocab, n).astype(np.int32)  # not Ministral3Config's pad token (11): see test_mistral3
        items.append(examples.Example(ids, trained))
    seq_len = 68
    rows = examples.pack(items, seq_len)
    assert [len(row) for row in rows] == [3, 2]
    batch = examples.stack([examples.row_arrays(row, seq_len) for row in rows])
    hf_loss, hf_grads = hf_loss_and_gradients(ref.model, items, tmp_path)
    config, params = load_pytorch(ref.dir)
    for kernel in kernels:
        c = config.replace(attention=kernel, attention_block=16)
        (loss, _), grads = jax.jit(jax.value_and_grad(trainer.loss_fn, has_aux=True), static_argnums=(1, 3, 4))(
            params, c, batch, 0.0, 16)
        assert abs(float(loss) - hf_loss) < 1e-5 * hf_loss, kernel
        flat, hf_flat = (dict(jax.tree_util.tree_flatten_with_path(tree)[0]) for tree in (grads, hf_grads))
        assert flat.keys() == hf_flat.keys()
        for path, g in flat.items():
            assert np.abs(np.asarray(g) - hf_flat[path]).max() < tol * np.abs(hf_flat[path]).max(), (kernel, path)
    loss_of = jax.jit(lambda b: trainer.loss_fn(params, config, b, 0.0, 16)[0])
    planted = [{"segments": np.zeros_like(batch["segments"])}]
    if config.llama_4_scaling is not None:
        planted.append({"positions": np.broadcast_to(np.arange(seq_len), batch["positions"].shape)})
    for bug in planted:
        assert abs(float(loss_of({**batch, **bug})) - hf_loss) > 1e-3 * hf_loss, list(bug)


def test_grad_accum_weighs_micro_batches_by_their_trained_tokens(ref_windowed):
    """Micro-batches with unequal counts of trained targets: --grad-accum 2's step has the
    loss and gradient norm of the whole batch in one (averaging the two means would not)."""
    rng = np.random.default_rng(3)
    items = [examples.Example(rng.integers(0, 320, n).astype(np.int32), rng.random(n) < p)
             for n, p in ((60, 0.9), (50, 0.1), (40, 0.9), (30, 0.1))]
    batch = examples.stack([examples.row_arrays([e], 64) for e in items])  # rows 0, 2 dense; 1, 3 sparse
    config, params = load_pytorch(ref_windowed.dir)
    mesh = make_mesh("", jax.devices()[:1])
    found = {}
    for accum in (1, 2):
        hp = trainer.Hyperparameters(steps=2, batch_size=4, seq_len=64, grad_accum=accum)
        tx = trainer.make_optimizer(hp)
        state = trainer.init_state(config, tx, mesh, params=jax.tree_util.tree_map(np.array, params))  # donated
        found[accum] = jax.device_get(trainer.make_train_step(config, tx, hp, mesh, trainer.state_shardings(state))(
            state, batch)[1])
    # Row r goes to micro-batch r % 2: the dense rows in one, the sparse in the other.
    assert abs(found[2]["loss"] - found[1]["loss"]) < 1e-5 * found[1]["loss"]
    assert abs(found[2]["grad_norm"] - found[1]["grad_norm"]) < 1e-5 * found[1]["grad_norm"]
    assert found[1]["trained_tokens"] == found[2]["trained_tokens"] == batch["mask"].sum()


def test_dpo_loss_gradients_and_rewards_equal_pytorch(ref_full, tmp_path):
    """DPO against the formula computed in PyTorch on HF's log-probabilities: a policy (the
    reference model moved by noise) against the reference; and with LoRA, the reference is the
    base without the adapters, the policy the merged model."""
    beta = 0.3
    rng = np.random.default_rng(2)
    pairs = []
    for n_prompt in (6, 9, 4):
        prompt = rng.integers(0, 352, n_prompt)
        answers = []
        for n in (rng.integers(3, 12), rng.integers(3, 12)):
            ids = np.concatenate([prompt, rng.integers(0, 352, n)]).astype(np.int32)
            answers.append(examples.Example(ids, np.arange(len(ids)) >= n_prompt))
        pairs.append(tuple(answers))
    batch = examples.stack([examples.pair_arrays(pair, 24) for pair in pairs])

    reference = ref_full.model
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p) * p.abs().mean())
    policy.save_pretrained(tmp_path / "policy")

    def logprob(model, example):
        logits = model(torch.from_numpy(example.ids[None, :-1]).long()).logits.float()[0]
        token = torch.log_softmax(logits, -1).gather(-1, torch.from_numpy(example.ids[1:, None]).long())[:, 0]
        return (token * torch.from_numpy(example.trained[1:]).float()).sum()

    with torch.no_grad():
        ref_logps = [[logprob(reference, e) for e in pair] for pair in pairs]
    margins = torch.stack([beta * ((logprob(policy, c) - rc) - (logprob(policy, r) - rr))
                           for (c, r), (rc, rr) in zip(pairs, ref_logps)])
    loss = -torch.nn.functional.logsigmoid(margins).mean()
    loss.backward()
    with torch.no_grad():
        for p in policy.parameters():
            p.copy_(p.grad)
    policy.save_pretrained(tmp_path / "grads")
    _, hf_grads = load_pytorch(str(tmp_path / "grads"))

    config, ref_params = load_pytorch(ref_full.dir)
    _, policy_params = load_pytorch(str(tmp_path / "policy"))
    (ours, metrics), grads = jax.value_and_grad(trainer.dpo_loss_fn, has_aux=True)(
        policy_params, config, batch, beta, ref_params, 8)
    assert abs(float(ours) - loss.item()) < 1e-5 * loss.item()
    assert abs(float(metrics["reward_margin"]) - margins.mean().item()) < 1e-4 * margins.abs().max().item()
    assert float(metrics["reward_accuracy"]) == (margins > 0).float().mean().item()
    flat, hf_flat = (dict(jax.tree_util.tree_flatten_with_path(tree)[0]) for tree in (grads, hf_grads))
    for path, g in flat.items():
        assert np.abs(np.asarray(g) - hf_flat[path]).max() < 1e-4 * np.abs(hf_flat[path]).max(), path

    # LoRA: the base is the reference; adapters (B nonzero) make the policy, as merged weights do.
    spec = lora.LoRA(4, 8.0, ("wq", "wv"))
    adapters = jax.tree_util.tree_map(lambda x: x + 0.05 * jnp.sign(jnp.cos(jnp.arange(x.size).reshape(x.shape))),
                                      lora.init_adapters(config, spec, jax.random.key(0)))
    with_adapters = trainer.dpo_loss_fn(ref_params, config, batch, beta, None, 8, adapters, spec)
    merged = trainer.dpo_loss_fn(lora.merge(ref_params, adapters, spec), config, batch, beta, ref_params, 8)
    assert abs(float(with_adapters[0]) - float(merged[0])) < 1e-5 and abs(float(merged[0]) - np.log(2)) > 1e-3
    assert abs(float(with_adapters[1]["reward_margin"]) - float(merged[1]["reward_margin"])) < 1e-4


# --- train.py end to end ---------------------------------------------------------------------


def write_chats(path, n=40, seed=0, bad_line=None):
    """Arithmetic conversations (some with a system prompt, a weightless turn and a second
    question) and a few text lines; bad_line: a line to put third."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(1, 50, 2))
        messages = [{"role": "user", "content": f"What is {a} plus {b}?"},
                    {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
        if i % 3 == 0:
            messages = [{"role": "system", "content": "Answer briefly."}, *messages,
                        {"role": "user", "content": "Thanks!"},
                        {"role": "assistant", "content": "You are welcome.", "weight": 0},
                        {"role": "user", "content": "Once more?"}, {"role": "assistant", "content": f"{a + b}."}]
        lines.append(json.dumps({"messages": messages}))
        if i % 10 == 0:
            lines.append(json.dumps({"text": "Addition is commutative: a plus b is b plus a."}))
    if bad_line is not None:
        lines.insert(2, bad_line)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_pairs(path, n=24, seed=0):
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(1, 50, 2))
        prompt = [{"role": "user", "content": f"What is {a} plus {b}?"}]
        wrong = f"{a + b + int(rng.integers(1, 9))}."
        # Both forms: messages, and the flat strings of a prompt and its answers.
        lines.append(json.dumps({"prompt": prompt, "chosen": {"role": "assistant", "content": f"{a + b}."},
                                 "rejected": [{"role": "assistant", "content": wrong}]} if i % 2 else
                                {"prompt": f"What is {a} plus {b}?", "chosen": f"{a + b}.", "rejected": wrong}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def instruct_checkpoint(tmp_path_factory):
    from test_sample_cli import convert_with_tokenizer
    return convert_with_tokenizer(tmp_path_factory.mktemp("instruct"), V7, "tokenizer.model.v7", 32768, 5)[1]


def test_train_py_on_conversations_then_sample_py_chat(instruct_checkpoint, tmp_path, capsys):
    """LoRA on conversations: the logged trained tokens are the batches' masks; sample.py --chat
    on model/ replies as HF transformers does on it; a run resumed at step 3 ends bit for bit
    where the unbroken one did."""
    import sample
    import transformers
    from test_sample_cli import chat_ids, hf_greedy_ids
    from test_train import run_train

    from mistral_jax.checkpoints.convert import export_hf_checkpoint
    from mistral_jax.checkpoints.store import load_checkpoint

    chats = write_chats(tmp_path / "chats.jsonl")
    flags = ["--init-from", instruct_checkpoint, "--data", chats, "--batch-size", 4, "--seq-len", 96,
             "--lora-rank", 4, "--lr", 1e-2, "--warmup", 1, "--log-every", 1, "--eval-every", 3, "--save-every", 3,
             "--samples", 0, "--steps", 6]
    status, stdout, stderr = run_train(capsys, *flags, "--out", tmp_path / "whole")
    assert status == 0, stderr
    assert "44 conversations and text lines (42 for training, padding" in stdout
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    batches = examples.Batches(
        [examples.conversation_example(Tokenizer(V7), json.loads(line)) for line in chats.read_text().splitlines()],
        96, 4)
    assert [r["trained_tokens"] for r in records] == [int(batches.batch(s)["mask"].sum()) for s in range(6)]
    assert all(r["trained_tokens"] < 4 * 96 for r in records) and "eval_loss" in records[2]

    whole = load_checkpoint(str(tmp_path / "whole" / "model"))[1]
    status, _, stderr = run_train(capsys, *flags, "--out", tmp_path / "whole", "--resume-from", 3)
    assert status == 0, stderr
    for a, b in zip(jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(
            load_checkpoint(str(tmp_path / "whole" / "model"))[1])):
        np.testing.assert_array_equal(a, b)

    status, out, stderr = run_script(capsys, sample, "--checkpoint", tmp_path / "whole" / "model", "--chat",
                                     "--prompt", "What is 7 plus 8?", "--max-new-tokens", 12)
    assert status == 0, stderr
    export_hf_checkpoint(str(tmp_path / "whole" / "model"), str(tmp_path / "hf"))
    hf = transformers.MistralForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    reply = hf_greedy_ids(hf, chat_ids(V7, [("user", "What is 7 plus 8?")]), 12)
    assert out.strip() == Tokenizer(V7).decode(reply).strip()


def test_train_py_dpo_raises_the_margin(instruct_checkpoint, tmp_path, capsys):
    from test_train import run_train

    pairs = write_pairs(tmp_path / "prefs.jsonl")
    status, stdout, stderr = run_train(capsys, "--init-from", instruct_checkpoint, "--data", pairs,
                                       "--objective", "dpo", "--lora-rank", 8, "--batch-size", 4, "--seq-len", 48,
                                       "--steps", 16,
                                       "--lr", 1e-2, "--warmup", 1, "--log-every", 1, "--eval-every", 16,
                                       "--samples", 0, "--dpo-beta", 0.5, "--out", tmp_path / "dpo")
    assert status == 0, stderr
    assert "24 preference pairs" in stdout and "margin" in stdout
    records = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert abs(records[0]["loss"] - np.log(2)) < 1e-6  # the first step's policy is its reference
    assert np.mean([r["reward_margin"] for r in records[-4:]]) > 0.05 and records[-1]["reward_accuracy"] == 1.0


def test_train_py_says_what_is_wrong_with_the_data(instruct_checkpoint, tmp_path, capsys):
    from test_train import run_train

    base = ["--init-from", instruct_checkpoint, "--batch-size", 2, "--seq-len", 64, "--steps", 1, "--samples", 0]
    chats = write_chats(tmp_path / "bad.jsonl", n=10, bad_line='{"messages": [{"role": "user", "content": "Hi"}]}')
    status, _, stderr = run_train(capsys, *base, "--data", chats, "--out", tmp_path / "a")
    assert_one_line_error(status, stderr, r"bad.jsonl:3 not a conversation the chat format accepts: Expected last "
                                          r"role Assistant .* \(--bad-lines skip leaves such lines out\)")
    assert not (tmp_path / "a" / "checkpoints").exists()
    status, stdout, stderr = run_train(capsys, *base, "--data", chats, "--out", tmp_path / "b", "--bad-lines", "skip",
                                       "--long-examples", "drop", "--seq-len", 24)
    assert status == 0, stderr
    assert "1 bad line(s) skipped" in stdout and "longer than --seq-len dropped" in stdout
    pairs = write_pairs(tmp_path / "p.jsonl")
    for flags, pattern in [
        (["--data", chats, "--objective", "dpo"], r"bad.jsonl:1 is no preference pair: it has no 'prompt'"),
        (["--data", pairs], r"p.jsonl:1 is not a JSON object with a \"text\" field .* --objective dpo\)"),
        (["--data", pairs, "--objective", "dpo", "--init-from", ""], "--objective dpo needs --init-from"),
        (["--data", chats, "--dpo-beta", 0], "--dpo-beta must be a positive number"),
    ]:
        status, _, stderr = run_train(capsys, *base, *flags, "--out", tmp_path / "c", "--overwrite")
        assert_one_line_error(status, stderr, pattern)

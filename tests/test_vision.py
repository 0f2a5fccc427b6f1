"""Images in: the Pixtral encoder and the Mistral 3 projector against transformers 5.24's
Mistral3ForConditionalGeneration (strong random weights, a dense and a rope-scaled text model),
prompts and pixels against mistral-common 1.13.1's own image encoding (a Tekken file with an
image section, as vision releases ship it)."""

import base64
import io
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image
from safetensors.torch import load_file, save_file

import convert_weights
import sample
from conftest import BUNDLED, MINISTRAL3_ROPE, REPO, assert_one_line_error, run_script, strengthen
from mistral_jax import Mistral, Tokenizer, load_checkpoint, load_pytorch
from mistral_jax.inference.sampling import generate_stream, until_eos
from mistral_jax.model import rope, vision

TOL = 1e-4
PATCH, LONGEST = 4, 32  # pixels per patch; the longest side an image is resized to
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=PATCH,
              image_size=LONGEST, hidden_act="silu")
TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, vocab_size=131072, max_position_embeddings=512, rms_norm_eps=1e-5)
TEXT_KINDS = {"mistral": dict(rope_theta=1e6, sliding_window=None),
              "ministral3": dict(rope_parameters=MINISTRAL3_ROPE, sliding_window=None)}


def tekken_with_images(path) -> str:
    """mistral-common's Tekken file with the image section of a Mistral 3 release, scaled down:
    PATCH-pixel patches merged 2 x 2, images resized to at most LONGEST pixels."""
    d = json.load(open(os.path.join(BUNDLED, "tekken_240911.json")))
    d["image"] = {"image_patch_size": PATCH, "max_image_size": LONGEST, "spatial_merge_size": 2}
    with open(path, "w") as f:
        json.dump(d, f)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    return tekken_with_images(tmp_path_factory.mktemp("tekken") / "tekken.json")


@pytest.fixture(scope="module", params=list(TEXT_KINDS))
def multimodal(request, tmp_path_factory, tokenizer_file):
    """(HF model, its directory with the tokenizer beside it, config, params as load_pytorch reads them)."""
    torch.manual_seed(11)
    text = getattr(transformers, f"{request.param.title()}Config")(**TEXT, **TEXT_KINDS[request.param])
    config = transformers.Mistral3Config(vision_config=VISION, text_config=text, tie_word_embeddings=False,
                                         attn_implementation="eager")
    model = transformers.Mistral3ForConditionalGeneration(config).eval()
    strengthen(model)
    directory = tmp_path_factory.mktemp(f"mistral3_{request.param}")
    model.save_pretrained(directory)
    shutil.copy(tokenizer_file, directory / "tekken.json")
    return (model, directory, *load_pytorch(str(directory)))


def picture(height: int, width: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A random image with smooth structure (a gradient plus noise), so resizing matters."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width]
    base = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)), (x + y) % 256], axis=-1)
    pixels = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    return image if mode == "RGB" else image.convert(mode)


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def mistral_common_encoding(tokenizer_file, text, images):
    """mistral-common's own (ids, images) of a user turn with text then images (PIL)."""
    request = ChatCompletionRequest(messages=[UserMessage(content=[TextChunk(text=text)] + [
        ImageChunk(image=image) for image in images])])
    encoded = MistralTokenizer.from_file(tokenizer_file).encode_chat_completion(request)
    return encoded.tokens, encoded.images


def hf_inputs(tokens, images) -> dict:
    """transformers' inputs: ids [1, T], the images padded to the largest and their sizes."""
    inputs = {"input_ids": torch.tensor([tokens])}
    if images:
        H, W = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
        pixels = torch.zeros(len(images), 3, H, W)
        for n, image in enumerate(images):
            pixels[n, :, :image.shape[1], :image.shape[2]] = torch.from_numpy(image)
        inputs.update(pixel_values=pixels, image_sizes=torch.tensor([i.shape[1:] for i in images]))
    return inputs


def test_image_encoding_equals_mistral_common(tokenizer_file, tmp_path):
    """Tokens and pixels equal mistral-common's for images of several sizes, aspect ratios and
    modes, given as a file, a data URL (a JPEG larger than LONGEST: resized), a PIL image and an
    array; bad images and web URLs are one clear ValueError each."""
    tall, wide, tiny, large = picture(37, 13, 0), picture(20, 30, 1, "RGBA"), picture(5, 3, 2, "L"), picture(90, 200, 3)
    tall.save(tmp_path / "tall.png")
    ids, images = Tokenizer(tokenizer_file).encode_multimodal_chat([{"role": "user", "content": [
        {"type": "text", "text": "Compare these."},
        {"type": "image_url", "image_url": {"url": str(tmp_path / "tall.png")}},
        {"type": "image", "image": np.asarray(wide)},
        {"type": "image", "image": tiny},
        {"type": "image_url", "image_url": {"url": data_url(large, "JPEG")}}]}])
    decoded_large = Image.open(io.BytesIO(base64.b64decode(data_url(large, "JPEG").split(",")[1])))
    expected_ids, expected_images = mistral_common_encoding(tokenizer_file, "Compare these.",
                                                            [tall, wide, tiny, decoded_large])
    assert ids == expected_ids
    assert [i.shape for i in images] == [(3, 32, 16), (3, 24, 32), (3, 8, 8), (3, 16, 32)]  # the last resized
    for got, want in zip(images, expected_images):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)
    tokenizer = Tokenizer(tokenizer_file)
    for part, message in [
            ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, "not downloaded"),
            ({"type": "image_url", "image_url": {"url": str(tmp_path / "missing.png")}}, "not found"),
            ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "not a decodable image"),
            ({"type": "image", "image": np.zeros((4, 4, 3), np.float32)}, "must be uint8")]:
        with pytest.raises(ValueError, match=message):
            tokenizer.encode_multimodal_chat([{"role": "user", "content": [{"type": "text", "text": "?"}, part]}])
    with pytest.raises(ValueError, match="encode_multimodal_chat"):
        tokenizer.encode_chat([{"role": "user", "content": [{"type": "image", "image": tiny}]}])
    with pytest.raises(ValueError, match="no image settings"):
        Tokenizer(os.path.join(BUNDLED, "tekken_240718.json")).encode_multimodal_chat(
            [{"role": "user", "content": "hi"}])


def prompt_with(tokenizer_file, text, *images):
    return Tokenizer(tokenizer_file).encode_multimodal_chat([{"role": "user", "content": [
        {"type": "text", "text": text}] + [{"type": "image", "image": image} for image in images]}])


def our_logits(config, params, tokens, images):
    return np.asarray(jax.jit(lambda p, t, i: Mistral(config).apply({"params": p}, t, images=i))(
        params, np.array([tokens]), images))


def test_logits_equal_hf(multimodal, tokenizer_file):
    """float32 logits within 1e-4 of HF's on a prompt with one image and one with two images of
    different sizes; the text model dense (mistral) and rope-scaled (ministral3)."""
    model, _, config, params = multimodal
    assert config.vision.patch_size == PATCH and config.vision.act == "silu"
    for tokens, images in [prompt_with(tokenizer_file, "What is this?", picture(27, 19, 4)),
                           prompt_with(tokenizer_file, "Which is larger?", picture(30, 14, 5), picture(12, 20, 6))]:
        with torch.no_grad():
            expected = model(**hf_inputs(tokens, images)).logits.numpy()
        assert np.abs(expected).max() > 3  # strong weights: the logits are far from flat
        np.testing.assert_allclose(our_logits(config, params, tokens, images), expected, atol=TOL)


def _rope_1d(x, rows, columns, theta):
    """The planted bug: 1-D RoPE over each patch's place in its image's sequence."""
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), rows.shape)
    return rope.apply_rope(x, positions, rope.frequencies(x.shape[-1], theta)[0])


def _blocks_end_to_end(x, h, w, s):
    """The planted bug: each s x s block's patch vectors end to end, not channel-major."""
    return x.reshape(h // s, s, w // s, s, -1).transpose(0, 2, 1, 3, 4).reshape(h // s * (w // s), -1)


def _layout_unmasked(grids, P):
    """The planted bug: every patch reads every key of the batch row, the padding too."""
    rows, columns, mask = _real_layout(grids, P)
    return rows, columns, np.ones_like(mask)


_real_layout = vision._layout


@pytest.mark.parametrize("bug", [(rope, "apply_rope_2d", _rope_1d), (vision, "merge_blocks", _blocks_end_to_end),
                                 (vision, "_layout", _layout_unmasked)], ids=["1d_rope", "merger_order", "unmasked"])
def test_planted_bugs_fail_by_far(multimodal, tokenizer_file, monkeypatch, bug):
    """Each planted bug moves the logits of two images of different sizes far past the tolerance."""
    model, _, config, params = multimodal
    if config.yarn is not None:
        pytest.skip("one text model is enough")
    tokens, images = prompt_with(tokenizer_file, "Which?", picture(30, 14, 5), picture(12, 20, 6))
    with torch.no_grad():
        expected = model(**hf_inputs(tokens, images)).logits.numpy()
    monkeypatch.setattr(*bug)
    assert np.abs(our_logits(config, params, tokens, images) - expected).max() > 100 * TOL


def hf_greedy(model, tokens, images, new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(**hf_inputs(tokens, images), max_new_tokens=new, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(tokens):].tolist()


def test_generate_with_images_equals_hf_greedy(multimodal, tokenizer_file):
    """A ragged batch (one image, none, two images) prefilled 8 tokens at a time, so that images
    start, end and span chunks: each row's greedy tokens are HF's for that prompt alone."""
    model, _, config, params = multimodal
    prompts = [prompt_with(tokenizer_file, "Describe it.", picture(21, 29, 7)),
               (Tokenizer(tokenizer_file).encode_multimodal_chat([{"role": "user", "content": "No image."}])),
               prompt_with(tokenizer_file, "And these two?", picture(16, 8, 8), picture(9, 31, 9))]
    tokens = [ids for ids, _ in prompts]
    pieces = list(generate_stream(config, params, tokens, 12, eos_id=None, prefill_chunk=8,
                                  images=[images for _, images in prompts]))
    got = np.concatenate(pieces, axis=1)[:, :12].tolist()
    for row, (ids, images) in enumerate(prompts):
        assert got[row] == hf_greedy(model, ids, images, 12), row


def test_hf_jax_hf_round_trip_and_native_layout(multimodal, tmp_path, capsys):
    """HF -> JAX -> HF is bit for bit, the vision weights included, and transformers loads the
    export; the same weights in Mistral-native layout (vision_encoder.*, wq/wk rows interleaved)
    load to the same params."""
    model, directory, config, params = multimodal
    status, out, _ = run_script(capsys, convert_weights, directory, tmp_path / "jax", "--dtype", "float32",
                                "--verify")
    assert status == 0 and "top-1 agreement 100.00%" in out and "with images (2)" in out
    assert run_script(capsys, convert_weights, tmp_path / "jax", tmp_path / "back", "--to-hf")[0] == 0
    before, after = load_file(directory / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys() and any(name.startswith("vision_tower.") for name in after)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == [
        "Mistral3ForConditionalGeneration"]
    assert os.path.isfile(tmp_path / "back" / "tekken.json")
    reloaded = transformers.Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "back")
    assert reloaded.config.vision_config.hidden_act == "silu"
    _, from_checkpoint = load_checkpoint(str(tmp_path / "jax"))
    for a, b in zip(jax.tree_util.tree_leaves(from_checkpoint), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)
    if config.yarn is None:  # params.json says this text model; the rope-scaled one is covered elsewhere
        write_native(before, config, tmp_path / "native")
        native_config, native = load_pytorch(str(tmp_path / "native"))
        assert native_config.vision == config.vision
        for a, b in zip(jax.tree_util.tree_leaves(native), jax.tree_util.tree_leaves(params)):
            np.testing.assert_array_equal(a, b)


def write_native(hf: dict, config, out) -> None:
    """HF's tensors under mistral-inference's names (vLLM's Pixtral loader), wq/wk rows of the
    text and vision attention back to interleaved pairs, and params.json with a vision_encoder."""
    def interleaved(w, heads):
        rows, columns = w.shape
        return w.view(heads, 2, rows // heads // 2, columns).transpose(1, 2).reshape(rows, columns)

    names = {"vision_tower.": "vision_encoder.", "multi_modal_projector.norm": "pre_mm_projector_norm",
             "multi_modal_projector.patch_merger": "patch_merger",
             "multi_modal_projector.linear_1": "vision_language_adapter.w_in",
             "multi_modal_projector.linear_2": "vision_language_adapter.w_out",
             "language_model.model.embed_tokens": "tok_embeddings", "language_model.model.norm": "norm",
             "language_model.lm_head": "output", "language_model.model.layers.": "layers.",
             "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
             "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
             "attention.q_proj": "attention.wq", "attention.k_proj": "attention.wk", "attention.v_proj": "attention.wv",
             "attention.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
             "mlp.down_proj": "feed_forward.w2", "feed_forward.gate_proj": "feed_forward.w1",
             "feed_forward.up_proj": "feed_forward.w3", "feed_forward.down_proj": "feed_forward.w2",
             "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    state = {}
    for name, w in hf.items():
        for old, new in names.items():
            name = name.replace(old, new)
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            vision_layer = name.startswith("vision_encoder.")
            heads = VISION["num_attention_heads"] if vision_layer else (
                TEXT["num_attention_heads"] if ".wq." in name else TEXT["num_key_value_heads"])
            w = interleaved(w, heads)
        state[name] = w.contiguous()
    os.makedirs(out)
    save_file(state, os.path.join(out, "consolidated.safetensors"))
    params = config.to_params_dict()
    assert params["vision_encoder"]["patch_size"] == PATCH
    json.dump(params, open(os.path.join(out, "params.json"), "w"))


def test_sample_py_shows_the_image(multimodal, tokenizer_file, tmp_path, capsys):
    """sample.py --chat --image prints HF's greedy reply to the same conversation; images need
    a vision model and the chat format, said in one line."""
    model, directory, _, _ = multimodal
    if model.config.text_config.model_type != "mistral":
        pytest.skip("one text model is enough")
    assert run_script(capsys, convert_weights, directory, tmp_path / "jax", "--dtype", "float32")[0] == 0
    picture(26, 40, 10).save(tmp_path / "photo.png")
    status, out, err = run_script(capsys, sample, "--checkpoint", tmp_path / "jax", "--chat", "--prompt",
                                  "What is shown?", "--image", tmp_path / "photo.png", "--max-new-tokens", 10)
    assert status == 0, err
    tokens, images = mistral_common_encoding(tokenizer_file, "What is shown?", [Image.open(tmp_path / "photo.png")])
    reply = until_eos(hf_greedy(model, tokens, images, 10), 2)
    assert out.strip() == Tokenizer(tokenizer_file).decode(reply).strip()
    # --interactive: "/image FILE" shows the image with the next turn; the history keeps it.
    result = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), "--checkpoint", str(tmp_path / "jax"),
                             "--interactive", "--max-new-tokens", "6"], capture_output=True, text=True,
                            input=f"/image {tmp_path / 'nope.png'}\n/image {tmp_path / 'photo.png'}\nWhat is shown?\n"
                                  "And the colour?\n")
    assert result.returncode == 0, result.stderr
    mistral, history, replies = MistralTokenizer.from_file(tokenizer_file), [], []
    for turn in ([TextChunk(text="What is shown?"), ImageChunk(image=Image.open(tmp_path / "photo.png"))],
                 "And the colour?"):
        history.append(UserMessage(content=turn))
        encoded = mistral.encode_chat_completion(ChatCompletionRequest(messages=history))
        replies.append(mistral.decode(until_eos(hf_greedy(model, encoded.tokens, encoded.images, 6), 2)))
        history.append(AssistantMessage(content=replies[-1]))
    assert result.stdout == "".join(reply + "\n" for reply in replies)
    assert "error: " in result.stderr and "nope.png not found" in result.stderr  # said; the conversation went on
    assert_one_line_error(*run_script(capsys, sample, "--checkpoint", tmp_path / "jax", "--prompt", "x", "--image",
                                      tmp_path / "photo.png")[::2], "needs --chat")
    assert_one_line_error(*run_script(capsys, sample, "--checkpoint", tmp_path / "jax", "--chat", "--prompt", "x",
                                      "--image", tmp_path / "nope.png")[::2], "not found")


def test_training_keeps_the_vision_tower_frozen(multimodal, tokenizer_file, tmp_path, capsys, monkeypatch):
    """train.py on text from the converted multimodal checkpoint, full and LoRA: the text model
    trains, the vision encoder and projector come out bit for bit as they went in; HF PEFT loads
    the LoRA run's adapter/ onto the HF model (its language model's layers only) and computes
    the merged model/'s logits on a prompt with an image."""
    import copy

    import peft

    import train

    model, directory, config, params = multimodal
    if config.yarn is not None:
        pytest.skip("one text model is enough")
    monkeypatch.setenv("MISTRAL_JAX_CACHE", str(tmp_path / "cache"))
    assert run_script(capsys, convert_weights, directory, tmp_path / "jax", "--dtype", "float32")[0] == 0
    for run, extra in (("full", ()), ("lora", ("--lora-rank", 4, "--base-dtype", "float32"))):
        status, _, err = run_script(capsys, train, "--init-from", tmp_path / "jax", "--out", tmp_path / run,
                                    "--steps", 2, "--batch-size", 2, "--seq-len", 32, "--lr", 1e-2, "--samples", 0,
                                    "--eval-every", 1000, *extra)
        assert status == 0, err
        trained_config, trained = load_checkpoint(str(tmp_path / run / "model"))
        assert trained_config.vision == config.vision
        for a, b in zip(jax.tree_util.tree_leaves(trained["vision"]), jax.tree_util.tree_leaves(params["vision"])):
            np.testing.assert_array_equal(a, b)
        assert np.abs(np.asarray(trained["layers"]["attention"]["wq"]) - params["layers"]["attention"]["wq"]).max() > 0
    tokens, images = prompt_with(tokenizer_file, "What is this?", picture(27, 19, 4))
    with torch.no_grad():
        adapted = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "lora" / "adapter").eval()
        assert not [n for n, _ in adapted.named_modules() if "vision_tower" in n and "lora" in n]
        expected = adapted(**hf_inputs(tokens, images)).logits.numpy()
        assert np.abs(expected - model(**hf_inputs(tokens, images)).logits.numpy()).max() > 10 * TOL  # it trained
    np.testing.assert_allclose(our_logits(trained_config, trained, tokens, images), expected, atol=TOL)


def test_pixtral_preset_counts_as_transformers():
    """Ministral 3 8B with the released Pixtral tower (presets.PIXTRAL): the parameter count of
    transformers' Mistral3ForConditionalGeneration of its config.json (built on the meta
    device), the cards' 0.4B vision encoder, and both config files read back."""
    from mistral_jax.checkpoints.verify import hf_model_class
    from mistral_jax.model.config import MistralConfig
    from mistral_jax.model.presets import PIXTRAL

    config = MistralConfig.preset("ministral-3-8b", vision=PIXTRAL)
    hf_config, model_class = hf_model_class(config)
    with torch.device("meta"):
        model = model_class(hf_config)
    counts = {name: p.numel() for name, p in model.named_parameters()}
    assert config.num_params == sum(counts.values())
    vision = sum(n for name, n in counts.items() if "vision_tower" in name or "multi_modal_projector" in name)
    assert round(vision / 1e9, 1) == 0.4
    assert config.active_params == config.num_params - vision  # a token of text runs no encoder
    assert MistralConfig.from_hf_dict(config.to_hf_dict()) == config
    assert MistralConfig.from_params_dict(config.to_params_dict()) == config


def test_engine_and_server_take_images(multimodal, tokenizer_file, tmp_path, capsys):
    """Continuous batching with images: requests with one image, none and two through 2 slots of
    the engine, prefilled 8 tokens at a time, each equal to HF's greedy tokens for it alone; and
    serve.py answering OpenAI's client a chat with an image as a data URL with HF's greedy reply
    (and a text model's server refusing one in a 400)."""
    from mistral_jax.inference.engine import Engine, Request
    from test_serve import client, start_server

    model, directory, config, params = multimodal
    if config.yarn is not None:
        pytest.skip("one text model is enough")
    prompts = [prompt_with(tokenizer_file, "Describe it.", picture(21, 29, 7)),
               (Tokenizer(tokenizer_file).encode_multimodal_chat([{"role": "user", "content": "No image."}])),
               prompt_with(tokenizer_file, "And these two?", picture(16, 8, 8), picture(9, 31, 9))]
    engine = Engine(config, params, slots=2, max_len=128, eos_id=None, prefill_chunk=8)
    out = [[] for _ in prompts]
    for (ids, images), tokens in zip(prompts, out):
        engine.submit(Request(ids, 10, lambda new, finish, tokens=tokens: tokens.extend(new) or True, images=images))
    while engine.step():
        pass
    for got, (ids, images) in zip(out, prompts):
        assert got == hf_greedy(model, ids, images, 10)
    with pytest.raises(ValueError, match="image tokens"):  # images that do not fill the prompt's image tokens
        engine.submit(Request(prompts[0][0], 4, lambda new, finish: True))

    assert run_script(capsys, convert_weights, directory, tmp_path / "jax", "--dtype", "float32")[0] == 0
    process, url = start_server(str(tmp_path / "jax"), "--slots", 2, "--max-len", 128, "--model-name", "pixtral")
    try:
        photo = picture(26, 40, 10)
        reply = client(url).chat.completions.create(model="pixtral", max_tokens=8, temperature=0, messages=[
            {"role": "user", "content": [{"type": "text", "text": "What is shown?"},
                                         {"type": "image_url", "image_url": {"url": data_url(photo)}}]}])
        tokens, images = mistral_common_encoding(tokenizer_file, "What is shown?", [photo])
        want = Tokenizer(tokenizer_file).decode(until_eos(hf_greedy(model, tokens, images, 8), 2))
        assert reply.choices[0].message.content == want
        assert reply.usage.prompt_tokens == len(tokens)
    finally:
        process.terminate()
        process.wait(120)

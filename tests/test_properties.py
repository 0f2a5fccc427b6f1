"""Property tests (hypothesis): config parsing, generate's arguments and the tokenizer round
trip, each on inputs a fuzzer makes up. Derandomized, so every CI run tries the same inputs;
the counts are docs/RELIABILITY.md's. No deadline: a loaded machine is slow, not wrong."""

import json
import os

import jax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from conftest import BUNDLED
from test_tokenizer import FILES
from mistral_jax.inference.sampling import generate
from mistral_jax.model.config import ConfigError, MistralConfig, MoE
from mistral_jax.model.transformer import init_params
from mistral_jax.text.tokenizer import Tokenizer



def examples(n: int):
    """Hypothesis settings of a property test here: n inputs, the same ones every run, no deadline."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# ---- config parsing ----------------------------------------------------------------------

HF = MistralConfig(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2,
                   vocab_size=256, sliding_window=(None, 8)).to_hf_dict()
NATIVE = MistralConfig(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2,
                       vocab_size=256, moe=MoE(4, 2)).to_params_dict()
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=8)


def near(value):
    """Anything JSON holds, or for a number values around it and the awkward ones."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return JSON
    return st.sampled_from([0, -1, 1, value - 1, value + 1, value * 3, 0.5, float("nan"), float("inf")]) | JSON


@st.composite
def mutated(draw, valid: dict):
    """valid with some fields dropped and up to four set to near(their value)."""
    keys = sorted(valid)
    dropped, changed = draw(st.sets(st.sampled_from(keys))), draw(st.sets(st.sampled_from(keys), max_size=4))
    d = {k: v for k, v in valid.items() if k not in dropped}
    d.update({k: draw(near(valid[k]), label=k) for k in sorted(changed)})
    return d


def parses_or_says_why(parse, write, d):
    """parse(d) is a config that write() gives back as it is, or a one-line ConfigError."""
    try:
        config = parse(d)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert parse(write(config)) == config


@examples(400)
@given(mutated(HF))
def test_hf_config_json_parses_or_is_a_config_error(d):
    parses_or_says_why(MistralConfig.from_hf_dict, MistralConfig.to_hf_dict, d)


@examples(400)
@given(mutated(NATIVE))
def test_params_json_parses_or_is_a_config_error(d):
    parses_or_says_why(MistralConfig.from_params_dict, MistralConfig.to_params_dict, d)


@examples(150)
@given(st.binary(max_size=64) | JSON.map(lambda v: json.dumps(v).encode()) | mutated(HF).map(
    lambda d: json.dumps(d).encode()))
def test_a_config_file_parses_or_names_itself(tmp_path_factory, contents):
    """Bytes that are no JSON, JSON that is no object, objects that are no config: a one-line
    ConfigError naming the file (invalid JSON and UTF-8 named none)."""
    directory = tmp_path_factory.mktemp("cfg")
    (directory / "config.json").write_bytes(contents)
    try:
        MistralConfig.from_dir(str(directory))
    except ConfigError as e:
        assert str(directory / "config.json") in str(e) and "\n" not in str(e), e


# ---- generate's arguments ----------------------------------------------------------------

TINY = MistralConfig(dim=32, n_layers=1, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=64,
                     sliding_window=8, max_seq_len=32)


@pytest.fixture(scope="module")
def tiny_params():
    return init_params(TINY, jax.random.key(0))


ANY = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=3)
PROMPTS = st.lists(st.lists(st.integers(0, TINY.vocab_size - 1), min_size=1, max_size=5), min_size=1, max_size=2)
VALID = dict(prompts=PROMPTS, max_new_tokens=st.integers(1, 4), temperature=st.sampled_from([0.0, 0.7]),
             top_k=st.sampled_from([None, 1, 5]), top_p=st.sampled_from([None, 0.9]), seed=st.integers(0, 3))
INVALID = dict(  # anything, and values near the valid ones
    prompts=st.lists(st.lists(st.integers(-3, 70) | st.floats(0, 10) | st.text(max_size=1), max_size=4), max_size=2)
    | ANY, max_new_tokens=st.integers(-2, 40) | ANY, temperature=ANY, top_k=st.integers(-2, 100) | ANY,
    top_p=ANY, seed=ANY)


@examples(80)
@given(st.data())
def test_generate_returns_tokens_or_refuses_its_arguments(tiny_params, data):
    """Each argument valid or anything (up to two at once): either tokens in the vocabulary,
    max_new_tokens per prompt, or a ValueError / TypeError naming the argument (it printed
    token 0 forever at temperature NaN, allocated 8.7 GB for max_new_tokens 1e9, ran past
    max_seq_len, raised OverflowError on a huge seed)."""
    broken = data.draw(st.sets(st.sampled_from(sorted(VALID)), max_size=2), label="broken")
    args = {name: data.draw((INVALID if name in broken else VALID)[name], label=name) for name in sorted(VALID)}
    prompts, max_new_tokens = args.pop("prompts"), args.pop("max_new_tokens")
    try:
        out = generate(TINY, tiny_params, prompts, max_new_tokens, eos_id=None, **args)
    except (ValueError, TypeError) as e:
        assert broken and str(e).strip() and "\n" not in str(e).strip()
        return
    assert len(out) == len(prompts)
    for prompt, tokens in zip(prompts, out):
        assert len(tokens) == max_new_tokens and len(prompt) + max_new_tokens <= TINY.max_seq_len
        assert all(isinstance(t, int) and 0 <= t < TINY.vocab_size for t in tokens)
    if args["temperature"] == 0:  # greedy: the same whatever the seed
        assert generate(TINY, tiny_params, prompts, max_new_tokens, eos_id=None, seed=args["seed"] ^ 1) == out


# ---- the tokenizer round trip ------------------------------------------------------------

TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=60)  # Cs: lone surrogates, not text


@pytest.fixture(scope="module", params=list(FILES))
def tokenizers(request):
    path = os.path.join(BUNDLED, FILES[request.param])
    return Tokenizer(path), MistralTokenizer.from_file(path).instruct_tokenizer.tokenizer


@examples(200)
@given(text=TEXT)
def test_tokenizer_ids_and_round_trip(tokenizers, text):
    """Our ids are mistral-common's, and decoding them gives the text back, as mistral-common's
    own decoder does."""
    ours, theirs = tokenizers
    ids = ours.encode(text, bos=False)
    assert ids == theirs.encode(text, bos=False, eos=False)
    assert ours.decode(ids) == theirs.decode(ids) == text
    assert all(0 <= i < ours.vocab_size for i in ids)


def test_text_that_cannot_be_utf8_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"text is not valid Unicode: a lone surrogate '\\udcff' at character 3"):
        Tokenizer(os.path.join(BUNDLED, FILES["v3"])).encode("abc\udcffdef")

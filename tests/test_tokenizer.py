"""mistral_jax.Tokenizer against mistral-common's own encoders and chat format, on the tokenizer
files mistral-common bundles (v1, v3, v7 sentencepiece and Tekken), and the stream decoder."""

import os
import shutil

import numpy as np
import pytest
import sentencepiece
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from conftest import BUNDLED, REAL_TOKENIZER
from mistral_jax.text.streaming import StreamDecoder
from mistral_jax.text.tokenizer import Tokenizer, checkpoint_name, find_tokenizer

FILES = {"v1": "tokenizer.model.v1", "v3": "mistral_instruct_tokenizer_240323.model.v3",
         "v7": "mistral_instruct_tokenizer_241114.model.v7", "tekken": "tekken_240718.json"}
TEXTS = ["Hello world", "The capital of France is", "  leading spaces\nand a newline",
         "naïve café, 東京 and emoji 🙂", "def f(x):\n    return x ** 2", "[INST] not a control token [/INST]"]
ALPHABET = ("abcdefghijklmnopqrstuvwxyz ABCXYZ 0123456789 .,;:!?'\"()[]{}<>/\\-_=+*&^%$#@~`|\n\t"
            "éèàüößçñøåæœ ΑαΒβΓγ Жж Дд שלום مرحبا 日本語中文한국어 ﬁ ﬀ Å Ω ½ ① ™ 🙂🦜👩‍💻🇫🇷 \u0301\u200b\u00a0")


def fuzzed_texts(n=40, seed=0):
    rng = np.random.default_rng(seed)
    letters = list(ALPHABET)
    return [("".join(rng.choice(letters, size=int(rng.integers(1, 80))))) for _ in range(n)]


@pytest.fixture(scope="module", params=list(FILES))
def pair(request):
    """(our Tokenizer, mistral-common's MistralTokenizer) of one bundled file."""
    path = os.path.join(BUNDLED, FILES[request.param])
    return request.param, Tokenizer(path), MistralTokenizer.from_file(path)


def test_ids_equal_mistral_commons_on_fuzzed_unicode(pair):
    _, ours, theirs = pair
    raw = theirs.instruct_tokenizer.tokenizer
    assert (ours.vocab_size, ours.bos_id, ours.eos_id) == (raw.n_words, raw.bos_id, raw.eos_id)
    for text in TEXTS + fuzzed_texts():
        ids = ours.encode(text, bos=True, eos=True)
        assert ids == raw.encode(text, bos=True, eos=True), text
        assert ours.decode(ids) == raw.decode(ids), text
    for text in TEXTS:
        assert ours.decode(ours.encode(text)) == text


CONVERSATIONS = [
    [{"role": "user", "content": "What is a rotary embedding?"}],
    [{"role": "system", "content": "You answer in one sentence."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."},
     {"role": "assistant", "content": "Seven."}, {"role": "user", "content": "And an even one? 東京 🙂"}],
]


def test_chat_equals_mistral_commons_encoding(pair):
    version, ours, theirs = pair
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    for conversation in CONVERSATIONS + [[{"role": "user", "content": t}] for t in fuzzed_texts(8, seed=1)]:
        request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in conversation])
        assert ours.encode_chat(conversation) == theirs.encode_chat_completion(request).tokens
    assert ours.chat_version == ("v3" if version == "tekken" else version)


def test_chat_format_of_a_bare_tokenizer_model(tmp_path):
    """A release's file renamed tokenizer.model keeps its chat format (known by its bytes);
    a tokenizer train.py trained has none, and says so."""
    shutil.copy(os.path.join(BUNDLED, FILES["v7"]), tmp_path / "tokenizer.model")
    assert Tokenizer(str(tmp_path / "tokenizer.model")).chat_version == "v7"
    own = tmp_path / "own" / "tokenizer.model"
    own.parent.mkdir()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS * 50), model_prefix=str(own)[:-6],
                                             vocab_size=400, byte_fallback=True, model_type="bpe", minloglevel=2)
    tokenizer = Tokenizer(str(own))
    assert tokenizer.chat_version is None
    with pytest.raises(ValueError, match="has no chat format"):
        tokenizer.encode_chat(CONVERSATIONS[0])


def test_bad_files_and_messages(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="neither a sentencepiece model nor a Tekken tokenizer"):
        Tokenizer(str(tmp_path / "tokenizer.model"))
    (tmp_path / "tekken.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a Tekken tokenizer"):
        Tokenizer(str(tmp_path / "tekken.json"))
    with pytest.raises(FileNotFoundError, match="not found"):
        Tokenizer(str(tmp_path / "absent.model"))
    v3 = Tokenizer(os.path.join(BUNDLED, FILES["v3"]))
    with pytest.raises(ValueError, match="need a role"):
        v3.encode_chat([{"role": "narrator", "content": "Once"}])
    with pytest.raises(ValueError, match="not a conversation the chat format accepts"):
        v3.encode_chat([{"role": "assistant", "content": "I speak first"}])


def test_checkpoint_names_keep_the_version(tmp_path):
    for name, expected in [(FILES["v3"], "tokenizer.model.v3"), (FILES["v7"], "tokenizer.model.v7"),
                           (FILES["tekken"], "tekken.json"), ("tokenizer.model.v1", "tokenizer.model.v1"),
                           ("mistral_instruct_tokenizer_241114.model.v7m1", "tokenizer.model")]:
        assert checkpoint_name(os.path.join(BUNDLED, name)) == expected, name
    for name in ("tokenizer.model", "tokenizer.model.v3", "tekken.json"):
        (tmp_path / name).write_bytes(b"")
    assert find_tokenizer(str(tmp_path)) == str(tmp_path / "tekken.json")  # the most specific first
    os.remove(tmp_path / "tekken.json")
    assert find_tokenizer(str(tmp_path)) == str(tmp_path / "tokenizer.model.v3")


def byte_token_ids(tokenizer_file: str, text: str) -> list[int]:
    """The ids that spell text's UTF-8 one byte each (sentencepiece byte fallback, Tekken byte tokens)."""
    if tokenizer_file.endswith(".json"):
        tekken = MistralTokenizer.from_file(tokenizer_file).instruct_tokenizer.tokenizer
        return [tekken.num_special_tokens + b for b in text.encode()]
    pieces = sentencepiece.SentencePieceProcessor(model_file=tokenizer_file)
    return [pieces.piece_to_id(f"<0x{b:02X}>") for b in text.encode()]


@pytest.mark.parametrize("file", [REAL_TOKENIZER, os.path.join(BUNDLED, FILES["tekken"])])
@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_stream_decoder_pieces_join_to_the_whole_decode(file, size):
    """Real text, a character spelled in byte tokens split across pieces, random ids, pushed
    `size` tokens at a time, against the tokenizer's whole decode."""
    tokenizer = Tokenizer(file)
    real = tokenizer.encode(" ".join(TEXTS), bos=False)
    parrot = byte_token_ids(file, "🦜")
    assert tokenizer.decode(parrot) == "🦜"  # four byte tokens, one character
    random_ids = np.random.default_rng(size).integers(3, tokenizer.vocab_size, 300).tolist()
    for ids in (real, real[:5] + parrot + real[5:], random_ids, parrot[1:] + real):  # the last: dangling bytes
        stream = StreamDecoder(tokenizer)
        pieces = [stream.push(ids[i:i + size]) for i in range(0, len(ids), size)]
        assert "".join(pieces) + stream.flush() == tokenizer.decode(ids)
        assert "\ufffd" not in "".join(pieces[:-1]) or "\ufffd" in tokenizer.decode(ids)

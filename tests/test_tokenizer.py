import random

import pytest

from kit.tokenizer import IncrementalDetokenizer

TEXTS = ["Hello, world!", "Héllo 日本語のテキスト 🙂👍🏽 and ümlauts", "  leading spaces\n\ttabs\nnew lines  ",
         "def f(x):\n    return x ** 2  # comment", "emoji at the end 🎉"]


def test_encode_decode_round_trip(smollm2):
    tok = smollm2.tokenizer
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert tok.eos_token_id == 2 and tok.vocab_size == 49152


def test_chat_template(smollm2):
    tok = smollm2.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in text
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert isinstance(ids, list) and ids[0] == tok.encode("<|im_start|>", add_special_tokens=False)[0]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_pieces_join_to_the_full_decode(smollm2, text):
    tok = smollm2.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def test_incremental_on_random_token_streams(smollm2):
    """Random ids split UTF-8 characters and mix special tokens; the join must still be exact."""
    tok = smollm2.tokenizer
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        detok = tok.detokenizer()
        joined = "".join(detok.add(t) for t in ids) + detok.flush()
        assert joined == tok.decode(ids)


def test_repr_html(smollm2):
    assert "Tokenizer" in smollm2.tokenizer._repr_html_()


def test_encode_refuses_non_str_and_lone_surrogates(smollm2):
    tok = smollm2.tokenizer
    with pytest.raises(TypeError, match="prompt must be a str to encode, got bytes"):
        tok.encode(b"hello")
    with pytest.raises(ValueError, match=r"prompt 'ok \\udc80' holds a lone surrogate '\\udc80' at index 3"):
        tok.encode("ok \udc80")
    assert tok.encode("ok 🙂", add_special_tokens=False)  # a real astral character is fine

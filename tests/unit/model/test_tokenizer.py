import pytest

from mbt_core.errors import TokenizerError
from mbt_core.model.tokenizer import EOS, Tokenizer
from tests.conftest import SAMPLE_TEXT


def test_training_is_deterministic(tiny_tokenizer: Tokenizer) -> None:
    again = Tokenizer.train([SAMPLE_TEXT], vocab_size=300)
    assert again.to_json() == tiny_tokenizer.to_json()


def test_save_load_gives_identical_encodings(tiny_tokenizer: Tokenizer) -> None:
    restored = Tokenizer.from_json(tiny_tokenizer.to_json())
    text = "Rough winds do shake the darling buds of May, café ☃\n"
    assert restored.encode(text) == tiny_tokenizer.encode(text)
    assert restored.to_json() == tiny_tokenizer.to_json()


def test_byte_level_round_trip_of_unseen_characters(tiny_tokenizer: Tokenizer) -> None:
    text = "Zebra! 123 ümlaut — 漢字"
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


def test_eos_is_token_zero(tiny_tokenizer: Tokenizer) -> None:
    assert tiny_tokenizer.eos_id == 0
    assert tiny_tokenizer.decode([tiny_tokenizer.eos_id]) == ""
    assert tiny_tokenizer.encode(EOS) == [0]


def test_bad_json_is_a_tokenizer_error() -> None:
    with pytest.raises(TokenizerError, match="cannot read tokenizer"):
        Tokenizer.from_json("{not json")


def test_too_small_vocabulary_is_refused() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["abc"], vocab_size=100)

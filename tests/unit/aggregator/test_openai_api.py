"""The HTTP API's pure parts: stop strings over streamed pieces, chat templates, the address
flag. The routes themselves are tested with real clients (tests/integration/test_openai_api.py).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mbt_aggregator.chat import ChatTemplate, Message
from mbt_aggregator.config import split_host_port
from mbt_aggregator.openai_api import StopCut


def _cut_at_first_stop(pieces: list[str], stops: tuple[str, ...]) -> str:
    """The text up to where a stop string first appeared, checked after every piece (a token:
    the generation stops there), cut at the earliest stop in it."""
    text = ""
    for piece in pieces:
        text += piece
        found = [i for s in stops if (i := text.find(s)) >= 0]
        if found:
            return text[: min(found)]
    return text


@given(
    pieces=st.lists(st.text(alphabet="abc\n", max_size=4), max_size=12),
    stops=st.lists(st.text(alphabet="abc\n", min_size=1, max_size=4), max_size=3),
)
def test_streamed_pieces_are_cut_at_the_first_stop_to_appear(
    pieces: list[str], stops: list[str]
) -> None:
    cut = StopCut(tuple(stops))
    sent = ""
    for piece in pieces:
        sent += cut.feed(piece)
        assert not any(s in sent for s in stops)  # a stop string never goes out
        if cut.hit:
            break
    sent += cut.flush()
    assert sent == cut.result == _cut_at_first_stop(pieces, tuple(stops))
    assert cut.hit == any(s in "".join(pieces) for s in stops)


def test_a_possible_stop_is_held_back_until_it_is_not_one() -> None:
    cut = StopCut(("\nUser:",))
    assert cut.feed("Good night.\nUs") == "Good night."
    assert cut.feed("ually") == "\nUsually"
    assert cut.feed("\nUser: hi") == "" and cut.hit
    assert cut.result == "Good night.\nUsually"


def test_the_default_template_and_one_stored_with_a_model() -> None:
    chat = [Message("system", "Be brief."), Message("user", "Who's there?")]
    default = ChatTemplate.from_info({})
    assert default.render(chat) == "System: Be brief.\nUser: Who's there?\nAssistant:"
    stored = ChatTemplate(user="<u>", end="</s>", generation="<a>", stop=("<u>",))
    again = ChatTemplate.from_info({"chat_template": stored.to_info(), "origin": "test"})
    assert again == stored
    assert again.render(chat[1:]) == "<u>Who's there?</s><a>"


@pytest.mark.parametrize(
    "raw",
    ['["not", "an object"]', '{"user": 3}', '{"speaker": "X: "}', '{"stop": [""]}', "{nope"],
)
def test_a_malformed_stored_template_is_refused_with_one_line(raw: str) -> None:
    with pytest.raises(ValueError, match="chat_template is malformed"):
        ChatTemplate.from_info({"chat_template": raw})


def test_http_listen_addresses() -> None:
    assert split_host_port("127.0.0.1:0", "--http-listen") == ("127.0.0.1", 0)
    assert split_host_port("[::1]:8000", "--http-listen") == ("::1", 8000)
    for bad in ("8000", ":8000", "localhost:http", "127.0.0.1:70000", "[::1:80"):
        with pytest.raises(ValueError, match="--http-listen must be HOST:PORT"):
            split_host_port(bad, "--http-listen")

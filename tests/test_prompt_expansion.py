"""Prompt expansion: an OpenAI-compatible endpoint (against a loopback stub), the offline
moving_shapes expander, falling back to the original prompts, and the --expand_prompt spec."""

import http.server
import itertools
import json
import logging
import socket
import threading
import time

import pytest

from sora_jax.data.moving_shapes import (BACKGROUND_PHRASES, BACKGROUND_WORDS, BACKGROUNDS,
                                         COLOUR_WORDS, COLOURS, DIRECTION_WORDS, DIRECTIONS,
                                         SHAPE_WORDS, SHAPES, SIZE_WORDS, STILL_PHRASES,
                                         TEMPLATES, TRAIN_COMBOS, VERBS)
from sora_jax.prompt_expansion import (DEFAULT_SYSTEM_PROMPT, ChatEndpointExpander,
                                       MovingShapesExpander, PromptExpansionError,
                                       expand_prompts, get_prompt_expander, parse_prompt)


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """Loopback requests must not go through a proxy configured in the environment."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def completion(content) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content},
         "finish_reason": "stop"}]}).encode()


class ChatStub(http.server.BaseHTTPRequestHandler):
    """Records each request and answers with the server's `reply` (status, body bytes)."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests.append({"path": self.path, "headers": self.headers,
                                     "body": json.loads(body)})
        status, payload = self.server.reply
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ChatStub)
    server.requests = []
    server.reply = (200, completion("  a crimson disc drifting to the left  \n"))
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01},
                     daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_chat_expander_sends_model_messages_and_bearer_key_and_returns_stripped_content(
        chat_server, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-test")
    expander = ChatEndpointExpander(chat_server.url + "/", "tiny-llm", api_key_env="MY_KEY")
    assert expander.expand(["red ball left"]) == ["a crimson disc drifting to the left"]
    (request,) = chat_server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-test"
    assert request["body"]["model"] == "tiny-llm"
    assert request["body"]["messages"] == [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": "red ball left"}]
    assert "temperature" in request["body"]


def test_chat_expander_accepts_a_full_chat_completions_url_and_sends_no_auth_without_key(
        chat_server, monkeypatch):
    monkeypatch.delenv("MY_KEY", raising=False)
    expander = ChatEndpointExpander(chat_server.url + "/chat/completions", "m",
                                    api_key_env="MY_KEY", system_prompt="be brief")
    assert expander.expand(["a", "b"]) == ["a crimson disc drifting to the left"] * 2
    assert [r["path"] for r in chat_server.requests] == ["/v1/chat/completions"] * 2
    assert all("Authorization" not in r["headers"] for r in chat_server.requests)
    assert chat_server.requests[0]["body"]["messages"][0]["content"] == "be brief"


@pytest.mark.parametrize("reply, what", [
    ((500, b'{"error": "model crashed"}'), "HTTP 500"),
    ((401, b'{"error": "bad key"}'), "$OPENAI_API_KEY"),
    ((200, b"<html>not json</html>"), "not a chat completion"),
    ((200, b'{"choices": []}'), "not a chat completion"),
    ((200, completion("   ")), "empty"),
])
def test_bad_answers_raise_expansion_error_naming_url_and_prompt(chat_server, reply, what):
    chat_server.reply = reply
    expander = ChatEndpointExpander(chat_server.url, "m")
    with pytest.raises(PromptExpansionError, match="/v1/chat/completions") as raised:
        expander.expand(["a red ball"])
    assert what in str(raised.value)
    assert raised.value.prompts == ("a red ball",)


def test_unreachable_endpoint_fails_fast_and_expand_prompts_keeps_the_originals(caplog):
    url = closed_port_url()
    expander = ChatEndpointExpander(url, "m", timeout=2)
    began = time.monotonic()
    with pytest.raises(PromptExpansionError, match="connection refused") as raised:
        expander.expand(["a red ball"])
    assert time.monotonic() - began < 2
    assert url in str(raised.value) and "--expand_prompt" in str(raised.value)
    with caplog.at_level(logging.INFO):
        assert expand_prompts(["a red ball", "a box"], expander) == ["a red ball", "a box"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and url in errors[0].getMessage()


def test_silent_endpoint_times_out_with_expansion_error():
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        expander = ChatEndpointExpander(f"http://127.0.0.1:{silent.getsockname()[1]}/v1", "m",
                                        timeout=0.2)
        with pytest.raises(PromptExpansionError, match=r"no answer within 0.2s"):
            expander.expand(["a red ball"])


def test_expand_prompts_logs_each_original_and_its_expansion(chat_server, caplog):
    with caplog.at_level(logging.INFO):
        out = expand_prompts(["red ball left"], ChatEndpointExpander(chat_server.url, "m"))
    assert out == ["a crimson disc drifting to the left"]
    assert any("'red ball left' -> 'a crimson disc drifting to the left'" in r.getMessage()
               for r in caplog.records if r.levelno == logging.INFO)


def training_captions(colour, shape, direction, size, background) -> set[str]:
    """Every caption in training phrasing (training templates and words) for these attributes,
    with a size word only if `size` is given and the background always named."""
    sizes = SIZE_WORDS[size].train if size else ("",)
    if direction == "still":
        motions = STILL_PHRASES.train
    else:
        motions = [(f"{v} {w}", f"{p} {w}") for (v, p), w in
                   itertools.product(VERBS.train, DIRECTION_WORDS[direction].train)]
    bgs = [phrase.format(word) for word in BACKGROUND_WORDS[background]
           for phrase in BACKGROUND_PHRASES.train]
    captions = set()
    for size_word, colour_word, shape_word, (moves, moving), bg, template in itertools.product(
            sizes, COLOUR_WORDS[colour].train, SHAPE_WORDS[shape].train, motions, bgs,
            TEMPLATES.train):
        desc = " ".join(w for w in (size_word, colour_word, shape_word) if w)
        captions.add(template.format(a="an" if desc[0] in "aeiou" else "a", desc=desc,
                                     moves=moves, moving=moving, bg=bg))
    return captions


def reads_as(caption, colour=None, shape=None, direction=None, size=None, background=None):
    """Whether `caption` is a training-phrased caption of these attributes; None is any value
    (for size: no size word)."""
    return any(caption in training_captions(c, s, d, size, b) for c, s, d, b in itertools.product(
        [colour] if colour else COLOURS, [shape] if shape else SHAPES,
        [direction] if direction else DIRECTIONS, [background] if background else BACKGROUNDS))


@pytest.mark.parametrize("prompt, attributes", [
    ("scarlet ball heading to the top-left", ("red", "circle", "up_left")),
    ("a box, stationary", (None, "square", "still")),
    ("aqua wedge drifting west", ("cyan", "triangle", "left")),
    ("Lemon cube that doesn't move", ("yellow", "square", "still")),
    ("a fuchsia ring rolling from left to right", ("magenta", "circle", "right")),
    ("jade pyramid falling", ("green", "triangle", "down")),
    ("sapphire dot, north-west", ("blue", "circle", "up_left")),
    ("a teal tile that remains in the upper left corner", ("cyan", "square", "still")),
    ("crimson block climbing up and to the right", ("red", "square", "up_right")),
    ("a ball at the bottom heading east", (None, "circle", "right")),
])
def test_unusual_phrasings_become_training_captions_of_the_same_attributes(prompt, attributes):
    (caption,) = MovingShapesExpander().expand([prompt])
    assert reads_as(caption, *attributes), caption


def test_size_and_background_are_kept_and_background_words_never_colour_the_shape():
    (caption,) = MovingShapesExpander().expand(["a tiny vermilion ball on a navy background"])
    assert reads_as(caption, "red", "circle", size="small", background="navy"), caption
    (caption,) = MovingShapesExpander().expand(["huge dark blue square gliding east on black"])
    assert reads_as(caption, "blue", "square", "right", "large", "black"), caption
    assert "colour" not in parse_prompt("a ball on a pink background")


@pytest.mark.parametrize("phrase, direction", [
    ("top-left", "up_left"), ("upper right", "up_right"), ("lower left", "down_left"),
    ("bottom right", "down_right"), ("to the north-east", "up_right"), ("southwest", "down_left"),
    ("up and to the left", "up_left"), ("left and up", "up_left"),
    ("down and towards the right", "down_right"), ("leftwards", "left"),
    ("rising up and to the right", "up_right"), ("falling to the left", "down_left"),
    ("towards the left edge", "left"), ("rests", "still"), ("motionless", "still"),
    ("not moving", "still"), ("from the top", "down"),
])
def test_multiword_and_hyphenated_diagonals_match_before_single_words(phrase, direction):
    assert parse_prompt(f"a red ball going {phrase}")["direction"] == direction


def test_first_mention_wins_when_a_prompt_names_two():
    assert parse_prompt("a red and blue square or circle moving left then right") == {
        "colour": "red", "shape": "square", "direction": "left"}


def test_unmentioned_attributes_are_invented_from_training_combinations_and_logged(caplog):
    with caplog.at_level(logging.INFO):
        captions = MovingShapesExpander().expand(["a ball"] + [f"a ball, take {i}" for i in
                                                               range(15)])
    for caption in captions:
        found = parse_prompt(caption)
        assert (found["colour"], "circle", found["direction"]) in TRAIN_COMBOS
        assert reads_as(caption, found["colour"], "circle", found["direction"]), caption
    assert len({parse_prompt(c)["colour"] for c in captions}) > 1
    assert any("invented" in r.getMessage() and "colour" in r.getMessage()
               for r in caplog.records)


def test_a_fully_specified_heldout_combination_is_kept():
    (caption,) = MovingShapesExpander().expand(["a red box sinking"])  # ("red", "square", "down")
    assert reads_as(caption, "red", "square", "down"), caption


def test_expansion_is_a_function_of_seed_and_prompt():
    prompts = ["a ball", "green wedge", "stationary"]
    assert MovingShapesExpander(seed=3).expand(prompts) == MovingShapesExpander(seed=3).expand(
        prompts)
    assert MovingShapesExpander(seed=3).expand(prompts[1:2]) == MovingShapesExpander(
        seed=3).expand(prompts)[1:2]
    assert len({MovingShapesExpander(seed=s).expand(["a ball"])[0] for s in range(5)}) > 1


def test_unrecognised_prompt_raises_and_expand_prompts_keeps_the_originals(caplog):
    with pytest.raises(PromptExpansionError, match="xyzzy plugh") as raised:
        MovingShapesExpander().expand(["xyzzy plugh"])
    assert raised.value.prompts == ("xyzzy plugh",)
    with caplog.at_level(logging.INFO):
        kept = expand_prompts(["a red ball", "xyzzy plugh"], MovingShapesExpander())
    assert kept == ["a red ball", "xyzzy plugh"]
    assert any(r.levelno == logging.ERROR and "xyzzy plugh" in r.getMessage()
               for r in caplog.records)


def test_get_prompt_expander_parses_specs():
    assert isinstance(get_prompt_expander("moving_shapes"), MovingShapesExpander)
    chat = get_prompt_expander("https://api.example.com/v1", model="m", api_key_env="K")
    assert isinstance(chat, ChatEndpointExpander)
    assert (chat.url, chat.model, chat.api_key_env) == (
        "https://api.example.com/v1/chat/completions", "m", "K")
    with pytest.raises(ValueError, match="moving_shapes.*http://localhost:8000/v1"):
        get_prompt_expander("gpt-4o-mini")

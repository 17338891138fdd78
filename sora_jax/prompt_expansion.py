"""Prompt expansion: short user prompts rewritten as the detailed captions the model trained on.

Sora has a language model rewrite a user's short prompt into a detailed caption like its training
captions, because a model follows text best in the distribution it learned from. Here:

    expander = get_prompt_expander("moving_shapes")             # offline, this dataset's words
    expander = get_prompt_expander("http://localhost:8000/v1")  # any OpenAI-compatible server
    captions = expand_prompts(["scarlet ball heading to the top-left"], expander)
    # ['crimson circle moving up and to the left on a black background']

`expand_prompts` never fails: if expansion does (server down, nothing recognised) it logs an
error and returns the original prompts.

`MovingShapesExpander` stands in for a language model on moving_shapes. Besides the dataset's
canonical names and training words, it knows a general English vocabulary of its own (the tables
below: "scarlet", "ball", "north-west", "stationary", ...); it never reads the dataset's held-out
word lists, and writes with training templates and training words only. Its general words include
some that the test split holds out, so test prompts sampled through it measure the expanded
pipeline, not how the text encoder generalises to unseen phrasings.
"""

import abc
import json
import os
import re
import socket
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from absl import logging

from sora_jax.data.moving_shapes import (BACKGROUND_PHRASES, BACKGROUND_WORDS, BACKGROUNDS,
                                         COLOUR_WORDS, COLOURS, DIRECTION_WORDS, SHAPE_WORDS,
                                         SHAPES, SIZE_WORDS, STILL_PHRASES, TEMPLATES,
                                         TRAIN_COMBOS, VERBS)


class PromptExpansionError(Exception):
    """Expansion failed; `prompts` are the original prompts it was given."""

    def __init__(self, message: str, prompts: Sequence[str]):
        super().__init__(message)
        self.prompts = tuple(prompts)


class PromptExpander(abc.ABC):
    """Rewrites short prompts as detailed captions."""

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """A short description, for logs."""

    @abc.abstractmethod
    def expand(self, prompts: Sequence[str]) -> list[str]:
        """One detailed caption per prompt; raises PromptExpansionError if it cannot."""


def expand_prompts(prompts: Sequence[str], expander: PromptExpander) -> list[str]:
    """The expanded prompts, or on PromptExpansionError the original prompts (and an error log)."""
    try:
        expanded = expander.expand(prompts)
    except PromptExpansionError as e:
        logging.error("Prompt expansion with %s failed; keeping the original prompts. %s",
                      expander.name, e)
        return list(prompts)
    for original, caption in zip(prompts, expanded):
        logging.info("Expanded prompt %r -> %r", original, caption)
    return expanded


DEFAULT_SYSTEM_PROMPT = (
    "You rewrite short prompts for a text-to-video model as the detailed captions it was trained "
    "on. Answer with one detailed sentence that describes the subject, its colour and shape, how "
    "it moves (its direction, or that it stays still) and the background. Keep everything the "
    "prompt asks for and invent only what it leaves out. Reply with the caption alone, as plain "
    "text: no quotes, lists, markdown or commentary.")


class ChatEndpointExpander(PromptExpander):
    """Expands with a language model behind an OpenAI-compatible chat completions endpoint.

    url: a base such as http://localhost:8000/v1 (requests go to {url}/chat/completions) or the
    full .../chat/completions URL. The API key, if any, is read from `api_key_env` at each call.
    """

    def __init__(self, url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 60.0, temperature: float = 0.0,
                 system_prompt: str = DEFAULT_SYSTEM_PROMPT):
        base = url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else f"{base}/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.temperature = temperature
        self.system_prompt = system_prompt

    @property
    def name(self) -> str:
        return f"{self.model} at {self.url}"

    def expand(self, prompts: Sequence[str]) -> list[str]:
        return [self._expand_one(prompt) for prompt in prompts]

    def _expand_one(self, prompt: str) -> str:
        body = {"model": self.model, "temperature": self.temperature,
                "messages": [{"role": "system", "content": self.system_prompt},
                             {"role": "user", "content": prompt}]}
        headers = {"Content-Type": "application/json"}
        if api_key := os.environ.get(self.api_key_env):
            headers["Authorization"] = f"Bearer {api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers,
                                         method="POST")

        def error(what: str, fix: str) -> PromptExpansionError:
            return PromptExpansionError(
                f"Expanding {prompt!r} via {self.url} failed: {what}. {fix}", [prompt])

        unreachable = ("Start the server, or pass a reachable OpenAI-compatible URL to "
                       "--expand_prompt (e.g. http://localhost:8000/v1).")
        too_slow = (f"Check that the server is up and not overloaded, or allow more than "
                    f"{self.timeout:g}s.")
        # HTTPError < URLError < OSError and TimeoutError < OSError: most specific first.
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = e.read(300).decode(errors="replace").strip()
            fix = {401: f"Set ${self.api_key_env} to a valid API key.",
                   403: f"Set ${self.api_key_env} to a key allowed to use {self.model!r}.",
                   404: f"Check the URL (a base URL usually ends in /v1) and that the server "
                        f"serves model {self.model!r}."
                   }.get(e.code, "Check the server's log.")
            raise error(f"HTTP {e.code} {e.reason} ({detail})", fix) from e
        except urllib.error.URLError as e:
            if isinstance(e.reason, ConnectionRefusedError):
                what = "connection refused (nothing listens there)"
            elif isinstance(e.reason, socket.gaierror):
                what = f"cannot resolve the host ({e.reason})"
            elif isinstance(e.reason, TimeoutError):
                raise error(f"no connection within {self.timeout:g}s", too_slow) from e
            else:
                what = f"cannot connect ({e.reason})"
            raise error(what, unreachable) from e
        except TimeoutError as e:
            raise error(f"no answer within {self.timeout:g}s", too_slow) from e
        except OSError as e:
            raise error(f"connection failed ({e})", unreachable) from e
        not_chat = "Point --expand_prompt at an OpenAI-compatible endpoint."
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, LookupError, TypeError) as e:  # bad JSON or not a chat completion
            raise error(f"the answer is not a chat completion with choices[0].message.content "
                        f"({raw[:200]!r})", not_chat) from e
        if not isinstance(content, str) or not content.strip():
            raise error(f"the completion's content is empty ({content!r})",
                        f"Check that {self.model!r} is a chat model that answers.")
        return content.strip()


# General English words of MovingShapesExpander's own, on top of the dataset's canonical names and
# training words. A phrase of several words takes precedence over any single word inside it.
_COLOUR_SYNONYMS = {
    "red": ("scarlet", "ruby", "vermilion", "vermillion", "cherry", "carmine", "maroon"),
    "green": ("lime", "jade", "olive", "forest green", "chartreuse", "mint"),
    "blue": ("azure", "sapphire", "cerulean", "indigo", "ultramarine", "royal blue"),
    "yellow": ("gold", "lemon", "amber", "mustard", "canary", "saffron"),
    "magenta": ("fuchsia", "pink", "violet", "lilac", "mauve", "lavender"),
    "cyan": ("aqua", "teal", "aquamarine", "turquoise"),
}
# Named as backgrounds only in context ("on black", "a navy background"), so "a dark blue ball"
# is blue. "navy" is a background, not the object's blue.
_BACKGROUND_SYNONYMS = {
    "black": ("black", "dark", "jet black", "ebony"),
    "grey": ("grey", "gray", "dark grey", "dark gray", "charcoal", "slate"),
    "navy": ("navy", "navy blue", "dark blue", "midnight blue"),
    "brown": ("brown", "dark brown", "chocolate", "umber"),
}
_SHAPE_SYNONYMS = {
    "square": ("box", "cube", "rectangle", "rectangular", "tile", "brick", "quadrilateral"),
    "circle": ("ball", "dot", "disk", "ring", "round", "sphere", "orb", "bubble", "coin"),
    "triangle": ("wedge", "pyramid", "triangular", "triangular tile", "cone", "arrowhead"),
}
_SIZE_SYNONYMS = {
    "small": ("small", "little", "tiny", "mini", "miniature", "wee"),
    "large": ("large", "big", "huge", "giant", "enormous", "massive", "gigantic", "oversized"),
}
# Neighbouring direction words, or ones with only _DIAGONAL_JOINERS between, make one direction:
# "top-left", "north west", "up and to the left", "falling to the left" are diagonals.
_DIRECTION_SYNONYMS = {
    "left": ("left", "leftward", "leftwards", "west", "westward", "westwards"),
    "right": ("right", "rightward", "rightwards", "east", "eastward", "eastwards"),
    "up": ("up", "upward", "upwards", "top", "upper", "north", "northward", "northwards",
           "rises", "rising", "ascends", "ascending", "climbs", "climbing", "skywards"),
    "down": ("down", "downward", "downwards", "bottom", "lower", "south", "southward",
             "southwards", "falls", "falling", "sinks", "sinking", "descends", "descending",
             "drops", "dropping"),
    "up_left": ("northwest",),
    "up_right": ("northeast",),
    "down_left": ("southwest",),
    "down_right": ("southeast",),
    "still": ("still", "stationary", "motionless", "static", "unmoving", "immobile", "frozen",
              "idle", "not moving", "does not move", "doesnt move", "stays put", "in place",
              "at rest", "rests", "resting", "remains", "remaining", "stays", "staying",
              "no motion", "no movement"),
}
_DIAGONAL_JOINERS = frozenset({"and", "to", "the", "towards", "toward"})
_BACKGROUND_NOUNS = frozenset({"background", "backgrounds", "backdrop", "bg"})
_BACKGROUND_PREPOSITIONS = frozenset({"on", "against", "over"})
_POSITION_PREPOSITIONS = frozenset({"at", "in", "on"})  # "at the top": where it is, not whither
_ARTICLES = frozenset({"a", "an", "the"})
_OPPOSITE = {"still": "still", "left": "right", "right": "left", "up": "down", "down": "up",
             "up_left": "down_right", "down_right": "up_left",
             "up_right": "down_left", "down_left": "up_right"}


def _tokens(text: str) -> list[str]:
    """Lower-case words; hyphens and punctuation separate words, apostrophes vanish."""
    return re.findall(r"[a-z]+", re.sub(r"['\u2019]", "", text.lower()))


def _plurals(words: Sequence[str]) -> tuple[str, ...]:
    return tuple(w + ("es" if w.endswith(("s", "x")) else "s") for w in words)


def _lexicon(kind: str, table: dict[str, Sequence[str]]) -> dict[tuple[str, ...], tuple]:
    return {tuple(_tokens(phrase)): (kind, value)
            for value, phrases in table.items() for phrase in phrases}


_KNOWN_SHAPE_WORDS = {s: (s, *SHAPE_WORDS[s].train, *_SHAPE_SYNONYMS[s]) for s in SHAPES}
_BACKGROUND_LEXICON = _lexicon("background", _BACKGROUND_SYNONYMS)
_LEXICON = {
    **_lexicon("colour", {c: (c, *COLOUR_WORDS[c].train, *_COLOUR_SYNONYMS[c]) for c in COLOURS}),
    **_lexicon("shape", {s: (*w, *_plurals(w)) for s, w in _KNOWN_SHAPE_WORDS.items()}),
    **_lexicon("size", _SIZE_SYNONYMS),
    **_lexicon("direction", {d: words.train for d, words in DIRECTION_WORDS.items()}),
    **_lexicon("direction", {"still": [form for forms in STILL_PHRASES.train for form in forms]}),
    **_lexicon("direction", _DIRECTION_SYNONYMS),
}


class _Mention(NamedTuple):
    start: int  # tokens[start:end] name it
    end: int
    kind: str  # 'colour' | 'shape' | 'direction' | 'size' | 'background'
    value: str


def _find(tokens: list[str], lexicon: dict, claimed: set[int],
          accept: Callable[[int, int], bool] = lambda start, end: True) -> list[_Mention]:
    """Unclaimed occurrences of the lexicon's phrases, longest phrases first; claims their words."""
    found = []
    for phrase in sorted(lexicon, key=len, reverse=True):
        for start in range(len(tokens) - len(phrase) + 1):
            span = set(range(start, start + len(phrase)))
            if (tuple(tokens[start:start + len(phrase)]) == phrase and not span & claimed
                    and accept(start, start + len(phrase))):
                claimed |= span
                found.append(_Mention(start, start + len(phrase), *lexicon[phrase]))
    return found


def _word_before(tokens: list[str], start: int) -> str | None:
    """The word before tokens[start], skipping one article ('on a', 'from the')."""
    i = start - 1
    if i >= 0 and tokens[i] in _ARTICLES:
        i -= 1
    return tokens[i] if i >= 0 else None


def _directions(tokens: list[str], mentions: list[_Mention]) -> list[_Mention]:
    """Joins neighbouring compatible words into one direction ('top left', 'climbing up and to the
    right'); 'from X' heads away from X, and 'at/in/on the X' says where the shape is, not where
    it goes, so it is dropped."""
    joined: list[_Mention] = []
    for m in sorted(mentions):
        prev = joined[-1] if joined else None
        axes = set(prev.value.split("_")) | set(m.value.split("_")) if prev else {"still"}
        if ("still" not in axes and not {"up", "down"} <= axes and not {"left", "right"} <= axes
                and all(t in _DIAGONAL_JOINERS for t in tokens[prev.end:m.start])):
            direction = "_".join(sorted(axes, key=lambda axis: axis in ("left", "right")))
            joined[-1] = _Mention(prev.start, m.end, "direction", direction)
        else:
            joined.append(m)
    resolved = []
    for m in joined:
        before = _word_before(tokens, m.start)
        if before == "from":
            resolved.append(m._replace(value=_OPPOSITE[m.value]))
        elif m.value == "still" or before not in _POSITION_PREPOSITIONS:
            resolved.append(m)
    return resolved


def parse_prompt(prompt: str) -> dict[str, str]:
    """The moving_shapes attributes a prompt mentions, by kind ('colour', 'shape', 'direction',
    'size', 'background'); of several mentions of one kind, the first counts."""
    tokens = _tokens(prompt)

    def background_context(start: int, end: int) -> bool:  # "... black background", "on black"
        return ((end < len(tokens) and tokens[end] in _BACKGROUND_NOUNS)
                or _word_before(tokens, start) in _BACKGROUND_PREPOSITIONS)

    claimed: set[int] = set()
    mentions = _find(tokens, _BACKGROUND_LEXICON, claimed, background_context)
    directions = []
    for m in _find(tokens, _LEXICON, claimed):
        if m.kind == "colour" and background_context(m.start, m.end):
            logging.info("Prompt %r asks for a %s background; moving_shapes has only %s.",
                         prompt, m.value, ", ".join(BACKGROUNDS))
        else:
            (directions if m.kind == "direction" else mentions).append(m)
    first: dict[str, str] = {}
    for m in sorted(mentions + _directions(tokens, directions)):
        if m.kind in first and m.value != first[m.kind]:
            logging.info("Prompt %r names several %ss; using the first, %s (not %s).",
                         prompt, m.kind, first[m.kind], m.value)
        first.setdefault(m.kind, m.value)
    return first


class MovingShapesExpander(PromptExpander):
    """Offline expander for moving_shapes: parses a prompt's attributes (`parse_prompt`), invents
    the colour, shape, direction and background it leaves out, and writes a training caption.

    An expansion is a pure function of (seed, prompt). Size is written only when mentioned, since
    most training captions omit it.
    """

    name = "moving_shapes (offline)"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def expand(self, prompts: Sequence[str]) -> list[str]:
        return [self._expand_one(prompt) for prompt in prompts]

    def _expand_one(self, prompt: str) -> str:
        found = parse_prompt(prompt)
        if not found:
            raise PromptExpansionError(
                f"{prompt!r} names no colour, shape, motion, size or background that the "
                f"moving_shapes expander knows; phrase it like 'a scarlet ball heading to the "
                f"top-left'.", [prompt])
        rng = np.random.default_rng((self.seed, zlib.crc32(prompt.encode())))
        # Invent what is missing from the training combinations, so the model has seen the triple.
        wanted = (found.get("colour"), found.get("shape"), found.get("direction"))
        options = [c for c in TRAIN_COMBOS if all(w in (None, v) for w, v in zip(wanted, c))]
        colour, shape, direction = options[rng.integers(len(options))] if options else wanted
        background = found.get("background") or BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        invented = {k: v for k, v in zip(("colour", "shape", "direction", "background"),
                                         (colour, shape, direction, background)) if k not in found}
        if invented:
            logging.info("Prompt %r leaves out its %s; invented %s.", prompt,
                         ", ".join(invented), ", ".join(invented.values()))
        return _training_caption(colour, shape, direction, found.get("size"), background, rng)


def _training_caption(colour: str, shape: str, direction: str, size: str | None,
                      background: str, rng: np.random.Generator) -> str:
    """A caption in moving_shapes' training phrasing that always names the background."""

    def pick(options):
        return options[rng.integers(len(options))]

    desc = " ".join(w for w in (size and pick(SIZE_WORDS[size].train),
                                pick(COLOUR_WORDS[colour].train),
                                pick(SHAPE_WORDS[shape].train)) if w)
    if direction == "still":
        moves, moving = pick(STILL_PHRASES.train)
    else:
        (verb, participle), where = pick(VERBS.train), pick(DIRECTION_WORDS[direction].train)
        moves, moving = f"{verb} {where}", f"{participle} {where}"
    bg = pick(BACKGROUND_PHRASES.train).format(pick(BACKGROUND_WORDS[background]))
    return pick(TEMPLATES.train).format(a="an" if desc[0] in "aeiou" else "a", desc=desc,
                                        moves=moves, moving=moving, bg=bg)


def get_prompt_expander(spec: str, *, model: str = "gpt-4o-mini",
                        api_key_env: str = "OPENAI_API_KEY", seed: int = 0) -> PromptExpander:
    """'moving_shapes' -> MovingShapesExpander(seed); an http(s) URL -> ChatEndpointExpander."""
    if spec == "moving_shapes":
        return MovingShapesExpander(seed)
    if spec.startswith(("http://", "https://")):
        return ChatEndpointExpander(spec, model, api_key_env=api_key_env)
    raise ValueError(f"--expand_prompt must be 'moving_shapes' (offline, for the moving_shapes "
                     f"dataset) or the URL of an OpenAI-compatible endpoint such as "
                     f"http://localhost:8000/v1 or https://api.openai.com/v1; got {spec!r}.")

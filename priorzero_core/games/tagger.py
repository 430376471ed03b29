"""A light rule-based part-of-speech tagger that stands in for spaCy inside `jericho.util`.

Jericho only asks spaCy which words of a `look`/`inventory` text are nouns or adjectives, then keeps
the ones the game's dictionary knows and probes each with `examine`. Rules over closed word classes
are enough for that, and unlike spaCy they give the same tags on every machine.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

# jericho's package attribute `util` is ctypes.util when ctypes.util was imported before jericho (its
# `from ctypes import *` re-exports the submodule over its own), so `jericho.util` and `from jericho import util`
# depend on import order; import_module returns sys.modules["jericho.util"], the real one.
jericho_util = importlib.import_module("jericho.util")

_WORD_CLASSES = {
    "DET": "a an the this that these those some any each every no another either neither all both "
    "my your his her its our their whose which what",
    "PRON": "i you he she it we they me him us them myself yourself himself herself itself "
    "ourselves themselves one ones something anything nothing everything someone anyone "
    "nobody everyone who whom",
    "AUX": "is are was were be been being am has have had do does did can could will would "
    "shall should may might must",
    "ADP": "in on at to from with into onto of under over behind through across above below beside "
    "besides near inside outside within without off about around against along by for upon "
    "beneath underneath toward towards between among past beyond except via like than",
    "CCONJ": "and or but nor yet so",
    "SCONJ": "if because although though while whilst unless until as since whether where when",
    "ADV": "not very also only just too quite rather here there now then away back nearby "
    "somewhat already still even ever never always often again once perhaps however "
    "instead otherwise anyway almost enough up down out north south east west northeast "
    "northwest southeast southwest upward upwards downward downwards",
    "VERB": "see seems seem looks look lies lie leads lead contains contain sits sit stands stand "
    "hangs hang appears appear notice make makes find finds carry carrying carries get got "
    "go goes going come comes take takes taken open opens close closes say says said know "
    "knows think thinks feel feels hear hears let lets leave leaves",
    "INTJ": "oh hm hmm well yes okay ok hello",
}
_CLOSED_CLASSES = {word: pos for pos, words in _WORD_CLASSES.items() for word in words.split()}

_ADJECTIVE_SUFFIXES = ("ous", "ful", "ish", "ive", "able", "ible", "less", "ed")
_TOKEN = re.compile(r"[A-Za-z]+(?:['-][A-Za-z]+)*|\d+|[^\sA-Za-z\d]")
_CONTENT = ("NOUN", "ADJ", "PROPN")


@dataclass(frozen=True)
class Token:
    """One word with the spaCy attributes jericho reads."""

    text: str
    pos_: str

    @property
    def lower_(self) -> str:
        return self.text.lower()


def _base_tag(word: str, sentence_start: bool) -> str:
    lower = word.lower()
    if lower in _CLOSED_CLASSES:
        return _CLOSED_CLASSES[lower]
    if word.isdigit():
        return "NUM"
    if not word[0].isalpha():
        return "PUNCT"
    if word[0].isupper() and not sentence_start and not word.isupper():
        return "PROPN"
    return "NOUN"


def tag(text: str) -> list[Token]:
    """Tag words; in a run of content words all but the last are adjectives ("small brass lamp")."""
    words = _TOKEN.findall(text)
    tags: list[str] = []
    sentence_start = True
    for word in words:
        tags.append(_base_tag(word, sentence_start))
        sentence_start = word in {".", "!", "?", ":", ">"}
    for i, (word, pos) in enumerate(zip(words, tags)):
        next_pos = tags[i + 1] if i + 1 < len(tags) else "PUNCT"
        if pos == "NOUN" and next_pos in _CONTENT:
            tags[i] = "ADJ"
        elif pos == "NOUN" and len(word) > 5 and word.lower().endswith(_ADJECTIVE_SUFFIXES):
            tags[i] = "ADJ"
    return [Token(w, p) for w, p in zip(words, tags)]


class Tagger:
    """Callable like a spaCy pipeline: `nlp(text)` returns the tagged tokens."""

    def __call__(self, text: str) -> list[Token]:
        return tag(text)


def install_tagger() -> None:
    """Make jericho use this tagger instead of loading spaCy (its `_load_spacy` skips an existing one)."""
    if not isinstance(getattr(jericho_util, "spacy_nlp", None), Tagger):
        jericho_util.spacy_nlp = Tagger()

"""Prompts: what a user asks for, split, checked and resolved in one place.

The command line, the Slicer module and the engine all go through here, so "liver, spleen" typed
in Slicer, ``-p "liver, spleen"`` on the command line and ``["liver", "spleen"]`` in Python mean
exactly the same two prompts. Resolution answers, for each prompt, which vocabulary structure it
names (synonyms, sides and spellings included), which of the model's trained classes it means
(by :func:`voila.vocabulary.class_key`, so the prompt "tumor core" means the class trained from the
label ``Tumor_Core``), and whether it repeats an earlier prompt.

>>> split_prompts(["liver, spleen", "left kidney\\naorta"])
['liver', 'spleen', 'left kidney', 'aorta']
>>> resolved, notes = resolve_prompts(["Liver", "IVC", "tumor core"], vocabulary, model_classes)
>>> [(p.structure.name if p.structure else None, p.trained) for p in resolved]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

from voila.errors import PromptError
from voila.vocabulary import Structure, Vocabulary, class_key, free_text_color, normalize_prompt

MAX_PROMPT_CHARACTERS = 200
MAX_PROMPTS = 1000
# What separates prompts typed in one text field or one command-line value.
_SEPARATORS = re.compile(r"[,;\n\r]+")
# Terminal escape sequences and other control characters: never part of a structure name, and
# echoed raw they would rewrite the user's terminal.
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]|[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Names a model uses for itself, not for anatomy.
RESERVED_NAMES = ("background",)

PromptInput = Union[str, Sequence[str]]


def split_prompts(values: PromptInput) -> list[str]:
    """Prompt texts from a string or a list of strings, each split at commas, semicolons and line
    breaks; control characters (terminal escapes) are removed, runs of white space become one
    space and empty parts are dropped."""
    if isinstance(values, str):
        values = [values]
    parts = (part for value in values for part in _SEPARATORS.split(_CONTROL.sub(" ", str(value))))
    return [text for text in (" ".join(part.split()) for part in parts) if text]


def check_prompts(prompts: Sequence[str]) -> None:
    """Raise :class:`PromptError` for no prompt, an over-long prompt or too many distinct prompts
    (repeats cost nothing: they are dropped before any work)."""
    if not prompts:
        raise PromptError("no prompts given; type at least one structure name, e.g. 'liver'")
    reserved = [p for p in prompts if normalize_prompt(p) in RESERVED_NAMES]
    if reserved:
        raise PromptError(
            f"{reserved[0]!r} is what the model calls everything that is not a structure, not a "
            "structure to segment; ask for the structures you want (e.g. 'liver')"
        )
    too_long = [p for p in prompts if len(p) > MAX_PROMPT_CHARACTERS]
    if too_long:
        raise PromptError(
            f"a prompt is {len(too_long[0])} characters long (at most {MAX_PROMPT_CHARACTERS}); "
            "give structure names, one per prompt"
        )
    distinct = len({normalize_prompt(p) for p in prompts})
    if distinct > MAX_PROMPTS:
        raise PromptError(f"{distinct} different prompts given; at most {MAX_PROMPTS} per run")


@dataclass(frozen=True)
class ResolvedPrompt:
    """One prompt after resolution.

    ``structure``: the vocabulary structure it names, or None for free text. ``class_name``: the
    model's trained class it means (a vocabulary name or a trained free-text class), or None when
    the model was not trained on it (open vocabulary). ``key``: what duplicates and earlier
    Slicer segments are matched by.
    """

    prompt: str
    structure: Structure | None
    class_name: str | None
    key: str

    @property
    def trained(self) -> bool:
        return self.class_name is not None

    @property
    def text_class(self) -> str:
        """The class whose sentence stands for this prompt: the trained class, the vocabulary
        name, or the typed text."""
        if self.class_name is not None:
            return self.class_name
        return self.structure.name if self.structure is not None else self.prompt

    @property
    def display_name(self) -> str:
        return self.structure.display_name if self.structure is not None else self.prompt

    @property
    def color(self) -> tuple[int, int, int]:
        if self.structure is not None:
            return tuple(self.structure.color)
        return free_text_color(self.class_name or self.prompt)


def resolve_prompts(
    prompts: PromptInput, vocabulary: Vocabulary, classes: Sequence[str] = ()
) -> tuple[list[ResolvedPrompt], list[str]]:
    """Split, check and resolve ``prompts`` against ``vocabulary`` and a model's ``classes``
    (its class list, background first). Returns the prompts in order, each once, and notes on the
    duplicates that were dropped. Raises :class:`PromptError` for unusable prompts."""
    texts = split_prompts(prompts)
    check_prompts(texts)
    trained = {class_key(name, vocabulary): name for name in classes[1:]}
    resolved: list[ResolvedPrompt] = []
    first_of: dict[str, str] = {}
    repeats: dict[tuple[str, str], int] = {}
    for text in texts:
        key = class_key(text, vocabulary)
        if key in first_of:
            repeats[(text, first_of[key])] = repeats.get((text, first_of[key]), 0) + 1
            continue
        first_of[key] = text
        resolved.append(ResolvedPrompt(text, vocabulary.match(text), trained.get(key), key))
    notes = [
        f"duplicate prompt {text!r} (same as {first!r}) was ignored"
        + (f" {count} times" if count > 1 else "")
        for (text, first), count in repeats.items()
    ]
    return resolved, notes


# -- spatial prompts ------------------------------------------------------------------------------
def parse_spatial(text: str, count: int, what: str) -> tuple[str, tuple[float, ...]]:
    """``"PROMPT: x, y, z[, ...]"`` → ``(prompt, (x, y, z, ...))`` with ``count`` numbers (world RAS
    mm, as Slicer shows them)."""
    prompt, separator, numbers = str(text).rpartition(":")
    prompt = " ".join(_CONTROL.sub(" ", prompt).split())
    try:
        values = tuple(float(v) for v in numbers.replace(";", ",").split(","))
    except ValueError:
        values = ()
    if (
        not separator
        or not prompt
        or len(values) != count
        or not all(v == v and abs(v) < 1e7 for v in values)
    ):
        example = "liver: 12.5,-80,310" if count == 3 else "liver: -60,-150,250,60,-40,350"
        raise PromptError(
            f"{what} {text!r} is not 'PROMPT: {','.join('RAS'[i % 3] + str(i // 3 + 1) for i in range(count))}'"
            f" in mm, e.g. {example!r}"
        )
    return prompt, values


def points_from_arguments(included: Sequence[str] = (), excluded: Sequence[str] = ()) -> dict[str, list]:
    """``--point`` / ``--exclude-point`` values → ``{prompt: [((R, A, S), positive), ...]}``."""
    points: dict[str, list] = {}
    for texts, positive in ((included, True), (excluded, False)):
        for text in texts:
            prompt, position = parse_spatial(text, 3, "the point")
            points.setdefault(prompt, []).append((position, positive))
    return points


def boxes_from_arguments(texts: Sequence[str] = ()) -> dict[str, tuple]:
    """``--box`` values → ``{prompt: ((R1, A1, S1), (R2, A2, S2))}``."""
    boxes = {}
    for text in texts:
        prompt, values = parse_spatial(text, 6, "the box")
        if prompt in boxes:
            raise PromptError(f"two boxes for {prompt!r}; give one box per prompt")
        boxes[prompt] = (values[:3], values[3:])
    return boxes

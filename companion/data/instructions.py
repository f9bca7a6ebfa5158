"""A generated Alpaca-style instruction dataset whose answers can be checked by exact match.

Each record has an ``instruction``, an ``input`` (empty when the instruction carries the
arguments itself), an ``output`` and the task ``family``. Outputs are a deterministic function of
the arguments and short (at most ~40 characters), so a tiny causal LM with a character-level
tokenizer can learn some families on a CPU in a few hundred steps. Every family has several
phrasings.

Held-out inputs (:func:`make_instruction_splits`): each example keeps ``key``, the canonical
form of its arguments (``"17 25"``, ``"hot"``, ``"moon 3"``). One key in five, chosen by
CRC-32 of ``family:key`` and the same for every seed, is reserved for the test split, so a test
question never appears in training under any phrasing.

:func:`load_alpaca` reads the real ``tatsu-lab/alpaca`` for the ``gpu`` profile.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Callable

WORDS = ("apple", "river", "stone", "cloud", "lamp", "tiger", "bread", "candle", "rocket",
         "planet", "mirror", "button", "ladder", "kettle", "marble", "pepper", "island", "wagon",
         "castle", "pocket", "basket", "falcon", "copper", "lemon", "jacket", "puzzle", "tunnel",
         "anchor", "barrel", "cactus", "dragon", "engine", "guitar", "helmet", "igloo", "jungle",
         "kitten", "lizard", "magnet", "needle", "parrot", "rabbit", "sugar", "turnip", "valley",
         "walnut", "yogurt", "zipper", "moon", "fox", "owl", "desk", "ship", "frog")
ANTONYM_PAIRS = (("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"),
                 ("light", "dark"), ("early", "late"), ("full", "empty"), ("hard", "soft"),
                 ("high", "low"), ("long", "short"), ("open", "closed"), ("rich", "poor"),
                 ("strong", "weak"), ("wet", "dry"), ("loud", "quiet"), ("thick", "thin"),
                 ("wide", "narrow"), ("clean", "dirty"), ("deep", "shallow"),
                 ("cheap", "expensive"), ("sweet", "sour"), ("first", "last"),
                 ("easy", "difficult"), ("awake", "asleep"))
ANTONYMS = {**dict(ANTONYM_PAIRS), **{b: a for a, b in ANTONYM_PAIRS}}
_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
         "fourteen fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
HELD_OUT_EVERY = 5  # one key in five belongs to the test split
PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


def number_to_words(n: int) -> str:
    """English words for 0 <= n <= 99: ``47 -> "forty-seven"``."""
    if not 0 <= n <= 99:
        raise ValueError(f"number_to_words covers 0..99, got {n}")
    if n < 20:
        return _ONES[n]
    return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])


@dataclass(frozen=True)
class InstructionExample:
    """One instruction record; ``key`` is the canonical input (empty for Alpaca records)."""

    instruction: str
    input: str
    output: str
    family: str
    key: str = ""


@dataclass(frozen=True)
class Family:
    """A task: how to draw its arguments, how to phrase them, how to answer.

    ``phrasings`` are ``(instruction, input)`` format strings over the argument names; numbers
    and word lists are shown separated by single spaces.
    """

    name: str
    draw: Callable[[random.Random], dict]
    answer: Callable[[dict], str]
    phrasings: tuple[tuple[str, str], ...]


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _pair(rng: random.Random) -> dict:
    return {"a": rng.randint(0, 49), "b": rng.randint(0, 49)}


def _ordered_pair(rng: random.Random) -> dict:
    a, b = sorted(_pair(rng).values(), reverse=True)
    return {"a": a, "b": b}


def _numbers(rng: random.Random) -> dict:
    return {"numbers": tuple(rng.sample(range(100), rng.randint(3, 5)))}


def _words(low: int, high: int) -> Callable[[random.Random], dict]:
    return lambda rng: {"words": tuple(rng.sample(WORDS, rng.randint(low, high)))}


def _word(rng: random.Random) -> dict:
    return {"word": rng.choice(WORDS)}


FAMILIES = {f.name: f for f in (
    Family("add", _pair, lambda x: str(x["a"] + x["b"]), (
        ("Add the two numbers.", "{a} {b}"),
        ("What is the sum of these numbers?", "{a} {b}"),
        ("What is {a} plus {b}?", ""))),
    Family("subtract", _ordered_pair, lambda x: str(x["a"] - x["b"]), (
        ("Subtract the second number from the first.", "{a} {b}"),
        ("What is {a} minus {b}?", ""),
        ("Take {b} away from {a}.", ""))),
    Family("reverse_words", _words(3, 4), lambda x: _show(x["words"][::-1]), (
        ("Reverse the order of the words.", "{words}"),
        ("Write these words again, last word first.", "{words}"),
        ("Put the words in the opposite order.", "{words}"))),
    Family("sort_numbers", _numbers, lambda x: _show(tuple(sorted(x["numbers"]))), (
        ("Sort the numbers from smallest to largest.", "{numbers}"),
        ("Arrange these numbers in increasing order.", "{numbers}"),
        ("List the numbers, smallest first.", "{numbers}"))),
    Family("largest", _numbers, lambda x: str(max(x["numbers"])), (
        ("Which number is the largest?", "{numbers}"),
        ("Pick the biggest number in the list.", "{numbers}"),
        ("Name the largest of these numbers.", "{numbers}"))),
    Family("uppercase", _word, lambda x: x["word"].upper(), (
        ("Write the word in capital letters.", "{word}"),
        ("Convert this word to upper case.", "{word}"),
        ("Make every letter of {word} a capital.", ""))),
    Family("count_letters", _word, lambda x: str(len(x["word"])), (
        ("How many letters does this word have?", "{word}"),
        ("Count the letters in the word.", "{word}"),
        ("How many letters are in the word {word}?", ""))),
    Family("count_words", _words(2, 6), lambda x: str(len(x["words"])), (
        ("How many words are there?", "{words}"),
        ("Count the words in the text.", "{words}"),
        ("Tell me the number of words.", "{words}"))),
    Family("spell", _word, lambda x: "-".join(x["word"]), (
        ("Spell the word with a dash between the letters.", "{word}"),
        ("Write the letters of this word separated by dashes.", "{word}"),
        ("Spell {word} letter by letter, joined by dashes.", ""))),
    Family("antonym", lambda rng: {"word": rng.choice(sorted(ANTONYMS))},
           lambda x: ANTONYMS[x["word"]], (
        ("Give the opposite of this adjective.", "{word}"),
        ("What is the antonym of {word}?", ""),
        ("Name a word that means the opposite.", "{word}"))),
    Family("number_to_words", lambda rng: {"n": rng.randint(0, 99)},
           lambda x: number_to_words(x["n"]), (
        ("Write the number in words.", "{n}"),
        ("Spell out {n} in English words.", ""),
        ("How is this number written in words?", "{n}"))),
    Family("repeat", lambda rng: {"word": rng.choice(WORDS), "n": rng.randint(2, 4)},
           lambda x: " ".join([x["word"]] * x["n"]), (
        ("Repeat the word {n} times.", "{word}"),
        ("Write {word} {n} times, separated by spaces.", ""),
        ("Say this word {n} times.", "{word}"))),
)}
FAMILY_NAMES = tuple(FAMILIES)


def is_held_out(family: str, key: str) -> bool:
    """Whether the input ``key`` of ``family`` belongs to the test split (seed-independent)."""
    return zlib.crc32(f"{family}:{key}".encode()) % HELD_OUT_EVERY == 0


def _draw(rng: random.Random, family: Family, held_out: bool | None) -> InstructionExample:
    """One example; ``held_out`` None draws from all keys, True/False from one side."""
    for _ in range(1000):
        args = family.draw(rng)
        key = " ".join(_show(v) for v in args.values())
        if held_out is None or is_held_out(family.name, key) == held_out:
            break
    else:
        raise ValueError(f"family {family.name!r} has no {'test' if held_out else 'train'} keys")
    shown = {k: _show(v) for k, v in args.items()}
    instruction, input_ = rng.choice(family.phrasings)
    return InstructionExample(instruction.format(**shown), input_.format(**shown),
                              family.answer(args), family.name, key)


def _check(n: int, arg: str, families) -> list[str]:
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"{arg} must be a positive integer, got {n!r}")
    names = list(FAMILY_NAMES if families is None else families)
    unknown = [f for f in names if f not in FAMILIES]
    if unknown or not names:
        raise ValueError(f"unknown or empty families {unknown or names}; "
                         f"valid families: {', '.join(FAMILY_NAMES)}")
    return names


def _generate(rng: random.Random, n: int, names: list[str],
              held_out: bool | None) -> list[InstructionExample]:
    order = [names[i % len(names)] for i in range(n)]  # families as even as n allows
    rng.shuffle(order)
    return [_draw(rng, FAMILIES[name], held_out) for name in order]


def make_instruction_dataset(n: int = 1000, seed: int = 0,
                             families: list[str] | None = None) -> list[InstructionExample]:
    """``n`` examples, families in equal shares, from all inputs (no held-out split)."""
    names = _check(n, "n", families)
    return _generate(random.Random(seed), n, names, held_out=None)


def make_instruction_splits(seed: int = 0, n_train: int = 2000, n_test: int = 200,
                            families: list[str] | None = None
                            ) -> dict[str, list[InstructionExample]]:
    """Train and test splits whose inputs are disjoint: test keys satisfy :func:`is_held_out`.

    Keys may repeat within a split (under another phrasing); never across the two.
    """
    names = _check(n_train, "n_train", families)
    _check(n_test, "n_test", families)
    rng = random.Random(seed)
    return {"train": _generate(rng, n_train, names, held_out=False),
            "test": _generate(rng, n_test, names, held_out=True)}


def format_prompt(example: InstructionExample, include_output: bool = True) -> str:
    """The course's prompt; the Input section is left out when ``input`` is empty."""
    if example.input:
        prompt = PROMPT_TEMPLATE.format(instruction=example.instruction, input=example.input)
    else:
        prompt = PROMPT_TEMPLATE_NO_INPUT.format(instruction=example.instruction)
    return prompt + example.output if include_output else prompt


def exact_match(prediction: str, example: InstructionExample) -> bool:
    """Whether ``prediction`` equals the expected output after stripping whitespace
    (case matters). Cut a generation at the EOS token before calling this."""
    return prediction.strip() == example.output.strip()


# ------------------------------------------------------------------ Alpaca (gpu profile)
def from_alpaca_record(record: dict) -> InstructionExample:
    """Convert one ``tatsu-lab/alpaca`` record (instruction, input, output) to an example."""
    return InstructionExample(instruction=record["instruction"], input=record.get("input") or "",
                              output=record["output"], family="alpaca")


def load_alpaca(split: str = "train", limit: int | None = None) -> list[InstructionExample]:
    """The Stanford Alpaca records from the Hugging Face hub (needs ``datasets`` and a network)."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError("load_alpaca needs the `datasets` package, which the ci profile "
                          "leaves out; install it with pip install 'peft-course-companion[gpu]'"
                          ) from err
    records = datasets.load_dataset("tatsu-lab/alpaca", split=split)
    if limit is not None:
        records = records.select(range(min(limit, len(records))))
    return [from_alpaca_record(r) for r in records]

"""The embedded dataset `tasks`: Alpaca-format instructions whose answers can be checked exactly.

Generated deterministically (a fixed generator seed, independent of the experiment's `seed`), so every
machine builds the same rows byte for byte; the experiment's seed only decides which rows are drawn.
Each row carries a `task` field naming its family, for per-family accuracy in evaluation.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

NUM_ROWS = 4000  # fixed size of the dataset; a "version" of it, like a hub revision
_GENERATOR_SEED = 20261127

_WORDS = (
    "apple river candle garden silver orange planet window forest rocket pencil yellow marble "
    "tiger castle bridge violin summer winter thunder meadow pirate lantern copper dragon"
).split()
_NAMES = "Ann Bob Carla Dev Elif Femi Gus Hana Ivo June Kofi Lena".split()


def _add(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    return "Add the two numbers.", f"{a} + {b}", str(a + b)


def _subtract(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    return "Subtract the second number from the first.", f"{a} - {b}", str(a - b)


def _multiply(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(2, 99), rng.randint(2, 9)
    return "Multiply the two numbers.", f"{a} * {b}", str(a * b)


def _sort_numbers(rng: random.Random) -> tuple[str, str, str]:
    nums = rng.sample(range(1, 100), rng.randint(3, 6))
    return "Sort the numbers in ascending order.", ", ".join(map(str, nums)), ", ".join(map(str, sorted(nums)))


def _maximum(rng: random.Random) -> tuple[str, str, str]:
    nums = rng.sample(range(1, 1000), rng.randint(3, 6))
    return "Give the largest number in the list.", ", ".join(map(str, nums)), str(max(nums))


def _pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 4)))


def _reverse_word(rng: random.Random) -> tuple[str, str, str]:
    word = _pseudo_word(rng)
    return "Reverse the letters of the word.", word, word[::-1]


def _count_letter(rng: random.Random) -> tuple[str, str, str]:
    word = _pseudo_word(rng)
    letter = rng.choice(sorted(set(word)) + ["z"])
    return f"How many times does the letter '{letter}' occur in the word?", word, str(word.count(letter))


def _uppercase(rng: random.Random) -> tuple[str, str, str]:
    words = " ".join(rng.sample(_WORDS, rng.randint(2, 4)))
    return "Rewrite the text in upper case.", words, words.upper()


def _sort_words(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(_WORDS, rng.randint(3, 5))
    return "Sort the words alphabetically.", " ".join(words), " ".join(sorted(words))


def _to_json(rng: random.Random) -> tuple[str, str, str]:
    name, age = rng.choice(_NAMES), rng.randint(18, 90)
    city = rng.choice(_WORDS).capitalize()
    return (
        "Convert the record to a JSON object with the keys name, age and city.",
        f"name={name}; age={age}; city={city}",
        json.dumps({"name": name, "age": age, "city": city}),
    )


FAMILIES: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "add": _add,
    "subtract": _subtract,
    "multiply": _multiply,
    "sort_numbers": _sort_numbers,
    "maximum": _maximum,
    "reverse_word": _reverse_word,
    "count_letter": _count_letter,
    "uppercase": _uppercase,
    "sort_words": _sort_words,
    "to_json": _to_json,
}


def generate(num_rows: int = NUM_ROWS) -> list[dict[str, str]]:
    """The rows of `tasks`, families in turn, each row unique."""
    rng = random.Random(_GENERATOR_SEED)
    rows, seen = [], set()
    names = list(FAMILIES)
    while len(rows) < num_rows:
        family = names[len(rows) % len(names)]
        instruction, input_text, output = FAMILIES[family](rng)
        if (instruction, input_text) in seen:
            continue
        seen.add((instruction, input_text))
        rows.append({"instruction": instruction, "input": input_text, "output": output, "task": family})
    return rows

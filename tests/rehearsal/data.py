"""Stand-in for ``datasets.load_dataset`` in the gpu-profile rehearsal: small local tables, real schemas.

Answers exactly the hub data sets the course reads, with the columns, dtypes, label names and split names
of the hub versions, and refuses anything else (so a notebook that starts reading a new data set fails the
rehearsal until a stand-in exists):

* ``nyu-mll/glue``, ``sst2``: ``sentence`` (string), ``label`` (ClassLabel negative/positive), ``idx`` (int32);
  splits train / validation / test (test labels are -1, as on the hub).
* ``nyu-mll/glue``, ``mnli``: ``premise``, ``hypothesis``, ``label`` (ClassLabel entailment/neutral/
  contradiction), ``idx``; splits train, validation_matched, validation_mismatched, test_matched,
  test_mismatched.
* ``tatsu-lab/alpaca``: ``instruction``, ``input``, ``output``, ``text``; split train only. One row is
  longer than any ``max_length`` the course uses (the hub has prompts of 569+ tokens).
"""

from __future__ import annotations

import random

ROWS = {"train": 320, "validation": 96, "test": 32}
GLUE_TRAIN_ROWS = 2600  # ch06 holds out the last 2,000 training records as its test split
NOUNS = ["film", "plot", "cast", "score", "ending", "script", "pacing", "dialogue"]
GOOD = ["good", "moving", "clever", "warm", "sharp", "lovely"]
BAD = ["dull", "flat", "clumsy", "tedious", "weak", "messy"]


def _sst2(split: str, n: int, rng: random.Random) -> dict:
    rows = {"sentence": [], "label": [], "idx": []}
    for i in range(n):
        label = i % 2
        word = rng.choice(GOOD if label else BAD)
        rows["sentence"].append(f"the {rng.choice(NOUNS)} is {word} and {rng.choice(GOOD + BAD)} at times ")
        rows["label"].append(-1 if split == "test" else label)
        rows["idx"].append(i)
    return rows


def _mnli(split: str, n: int, rng: random.Random) -> dict:
    rows = {"premise": [], "hypothesis": [], "label": [], "idx": []}
    for i in range(n):
        label, noun = i % 3, rng.choice(NOUNS)
        word = rng.choice(GOOD)
        hyp = [f"The {noun} is {word}.", f"The {noun} was made last year.", f"The {noun} is {rng.choice(BAD)}."]
        rows["premise"].append(f"The {noun} is {word}, critics said.")
        rows["hypothesis"].append(hyp[label])
        rows["label"].append(-1 if split.startswith("test") else label)
        rows["idx"].append(i)
    return rows


def _alpaca(n: int, rng: random.Random) -> dict:
    rows = {"instruction": [], "input": [], "output": [], "text": []}
    for i in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        instruction, inp, out = ("Add the two numbers.", f"{a} and {b}", str(a + b)) if i % 2 else (
            "Name a colour.", "", rng.choice(["Red.", "Blue.", "Green."]))
        if i == 3:  # one over-long record, as the hub has
            instruction, inp = "Summarize the following text in one sentence.", " ".join(["word"] * 3000)
        rows["instruction"].append(instruction)
        rows["input"].append(inp)
        rows["output"].append(out)
        rows["text"].append(f"### Instruction:\n{instruction}\n\n### Input:\n{inp}\n\n### Response:\n{out}")
    return rows


def _features(kind: str):
    from datasets import ClassLabel, Features, Value

    if kind == "sst2":
        return Features({"sentence": Value("string"), "label": ClassLabel(names=["negative", "positive"]),
                         "idx": Value("int32")})
    if kind == "mnli":
        return Features({"premise": Value("string"), "hypothesis": Value("string"),
                         "label": ClassLabel(names=["entailment", "neutral", "contradiction"]),
                         "idx": Value("int32")})
    return Features({k: Value("string") for k in ("instruction", "input", "output", "text")})


SPLITS = {("nyu-mll/glue", "sst2"): ("train", "validation", "test"),
          ("nyu-mll/glue", "mnli"): ("train", "validation_matched", "validation_mismatched", "test_matched",
                                     "test_mismatched"),
          ("tatsu-lab/alpaca", None): ("train",)}


def load_dataset(path: str, name: str | None = None, split: str | None = None, **kwargs):
    """``datasets.load_dataset`` for the three hub data sets above; a ``DatasetDict`` when ``split`` is None."""
    from datasets import Dataset, DatasetDict

    key = (path, name)
    if key not in SPLITS:
        raise FileNotFoundError(f"rehearsal: no stand-in for load_dataset({path!r}, {name!r}); add one to "
                                f"tests/rehearsal/data.py with the hub schema")
    kind = name or "alpaca"

    def table(s: str):
        if s not in SPLITS[key]:
            raise ValueError(f'Unknown split "{s}". Should be one of {list(SPLITS[key])}.')
        rng = random.Random(f"{path}/{name}/{s}")
        n = ROWS["train" if s == "train" else "test" if s.startswith("test") else "validation"]
        if s == "train" and kind != "alpaca":
            n = GLUE_TRAIN_ROWS
        rows = _alpaca(n, rng) if kind == "alpaca" else (_sst2 if kind == "sst2" else _mnli)(s, n, rng)
        return Dataset.from_dict(rows, features=_features(kind), split=s)

    if split is None:
        return DatasetDict({s: table(s) for s in SPLITS[key]})
    return table(split)

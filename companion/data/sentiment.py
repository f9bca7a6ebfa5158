"""A generated English sentiment task whose labels hinge on negation, contrast and degree words.

Every sentence is one template filled with nouns and adjectives from a small review lexicon
(restaurants, hotels, films, gadgets). Each adjective has one polarity ``p`` (1 = positive,
0 = negative) and the label follows from ``p`` by one rule per phenomenon:

=================  ==============================================  =======================
phenomenon         example                                         label
=================  ==============================================  =======================
plain              "The soup was delicious."                       ``p``
negation           "The service was not bad."                      ``1 - p``
intensifier        "The plot was slightly predictable."            ``p``: degree words, up
                                                                   or down, never flip it
contrast           "The food was good but overpriced."             ``p`` of the last clause
double_negation    "Nobody could say the room was not clean."      ``p``: two negations
                                                                   cancel
=================  ==============================================  =======================

Negators are ``not``, ``never``, ``hardly``, ``not at all``, ``far from``, ``by no means`` and
the ones built into templates (``n't``, ``nobody``). ``barely`` is left out on purpose:
"barely dirty" reads as neither praise nor complaint. In every contrast template the clause that
decides comes last ("although A, B", "A, but B"), so "the last clause decides" is the whole rule.

Splits (:func:`make_sentiment_splits`): train and validation draw from the same templates and
words; test uses only held-out templates and held-out nouns and adjectives (right of the ``|``
in the lexicon), so a model must compose, not remember. Every split has the phenomenon shares
of ``PHENOMENON_SHARES`` and labels balanced to within one example per phenomenon; no sentence
appears twice across the three splits.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NEGATIVE, POSITIVE = 0, 1
LABEL_NAMES = ("negative", "positive")
PHENOMENON_SHARES = {"plain": 0.20, "negation": 0.25, "contrast": 0.25,
                     "intensifier": 0.15, "double_negation": 0.15}
PHENOMENA = tuple(PHENOMENON_SHARES)
NEGATORS = ("not", "never", "hardly", "not at all", "far from", "by no means")
DEGREE_WORDS = ("very", "really", "extremely", "incredibly", "truly", "remarkably", "so",
                "slightly", "somewhat", "rather", "fairly")  # intensifiers, then downtoners
_PLURAL_WITHOUT_S = {"the staff"}  # every other noun phrase is plural iff it ends in "s"


@dataclass(frozen=True)
class Aspect:
    """One thing a review talks about. Each word field reads ``"seen words | held-out words"``."""

    domain: str
    name: str
    nouns: str
    positive: str
    negative: str

    def words(self, field: str, held_out: bool) -> tuple[str, ...]:
        seen, held = getattr(self, field).split("|")
        return tuple(w.strip() for w in (held if held_out else seen).split(",") if w.strip())


_SERVICE = dict(positive="friendly, attentive, polite, helpful | courteous, welcoming",
                negative="rude, slow, careless, unhelpful | dismissive, impatient")
GENERIC = Aspect("any", "generic", nouns="|",
                 positive="good, great, excellent, pleasant, wonderful, impressive, lovely"
                          " | superb, delightful, terrific",
                 negative="bad, poor, awful, terrible, disappointing, mediocre"
                          " | dreadful, lousy, abysmal")
ASPECTS = (
    Aspect("restaurant", "food",
           nouns="the food, the soup, the pasta, the dessert, the fries, the steak, the noodles"
                 " | the curry, the salad, the dumplings, the pancakes",
           positive="delicious, tasty, fresh | flavourful, scrumptious",
           negative="bland, greasy, stale, overpriced | soggy, tasteless"),
    Aspect("restaurant", "service",
           nouns="the staff, the waiter, the service, the manager | the bartender, the servers",
           **_SERVICE),
    Aspect("hotel", "room",
           nouns="the room, the bed, the bathroom, the towels, the hallway"
                 " | the suite, the pillows, the balcony",
           positive="clean, spacious, comfortable, quiet | spotless, cosy",
           negative="dirty, cramped, noisy, overpriced | shabby, musty"),
    Aspect("hotel", "staff",
           nouns="the receptionist, the concierge, the cleaners | the porter, the housekeepers",
           **_SERVICE),
    Aspect("film", "story",
           nouns="the plot, the story, the script, the ending, the pacing"
                 " | the dialogue, the screenplay, the twists",
           positive="gripping, clever, moving, original | captivating, witty",
           negative="predictable, boring, confusing, slow | tedious, clumsy"),
    Aspect("film", "cast",
           nouns="the acting, the cast, the actors, the lead actor"
                 " | the performances, the villain",
           positive="convincing, charming, brilliant | compelling, nuanced",
           negative="wooden, unconvincing, dull | stiff, forgettable"),
    Aspect("gadget", "device",
           nouns="the phone, the laptop, the battery, the speakers, the keyboard"
                 " | the charger, the headphones, the tablet",
           positive="reliable, fast, sturdy, responsive | durable, snappy",
           negative="sluggish, flimsy, faulty, overpriced | fragile, glitchy"),
    Aspect("gadget", "software",
           nouns="the app, the software, the interface, the update | the firmware, the menus",
           positive="intuitive, responsive, reliable | seamless, polished",
           negative="buggy, sluggish, confusing | clunky, unstable"),
)
POLARITY = {w: p for a in (*ASPECTS, GENERIC) for held in (False, True)
            for p, field in ((POSITIVE, "positive"), (NEGATIVE, "negative"))
            for w in a.words(field, held)}
NOUN_DOMAIN = {n: a.domain for a in ASPECTS for held in (False, True)
               for n in a.words("nouns", held)}


@dataclass(frozen=True)
class Template:
    """A sentence frame. Slots: ``{np} {be} {adj}``, a second clause ``{np_b} {be_b} {adj_b}``
    (or just ``{adj_b}`` for a shared subject) and ``{cue}`` for a negator or degree word.
    ``cue`` names the fixed cue of frames without a ``{cue}`` slot."""

    id: str
    phenomenon: str
    pattern: str
    held_out: bool = False
    cue: str = ""


def _t(phenomenon: str, number: int, pattern: str, cue: str = "", held_out: bool = False):
    return Template(f"{phenomenon}-{number}", phenomenon, pattern, held_out, cue)


TEMPLATES = (
    _t("plain", 1, "{np} {be} {adj}."),
    _t("plain", 2, "honestly, {np} {be} {adj}."),
    _t("plain", 3, "we thought {np} {be} {adj}."),
    _t("plain", 4, "all in all, {np} {be} {adj}."),
    _t("plain", 5, "i found {np} {adj}.", held_out=True),
    _t("plain", 6, "in my opinion, {np} {be} {adj}.", held_out=True),
    _t("negation", 1, "{np} {be} {cue} {adj}."),
    _t("negation", 2, "{np} {be}n't {adj}.", "n't"),
    _t("negation", 3, "we did not think {np} {be} {adj}.", "not"),
    _t("negation", 4, "i would not call {np} {adj}.", "not", held_out=True),
    _t("negation", 5, "nobody found {np} {adj}.", "nobody", held_out=True),
    _t("negation", 6, "{np} never seemed {adj}.", "never", held_out=True),
    _t("contrast", 1, "{np} {be} {adj}, but {np_b} {be_b} {adj_b}.", "but"),
    _t("contrast", 2, "{np} {be} {adj} but {adj_b}.", "but"),
    _t("contrast", 3, "although {np} {be} {adj}, {np_b} {be_b} {adj_b}.", "although"),
    _t("contrast", 4, "{np} {be} {adj}, yet {np_b} {be_b} {adj_b}.", "yet"),
    _t("contrast", 5, "i admit {np} {be} {adj}, but {np_b} {be_b} {adj_b}.", "but", True),
    _t("contrast", 6, "even though {np} {be} {adj}, {np_b} {be_b} {adj_b}.", "even though", True),
    _t("contrast", 7, "{np} {be} {adj}; however, {np_b} {be_b} {adj_b}.", "however", True),
    _t("contrast", 8, "{np} {be} {adj}, and yet {adj_b}.", "yet", True),
    _t("intensifier", 1, "{np} {be} {cue} {adj}."),
    _t("intensifier", 2, "to be honest, {np} {be} {cue} {adj}."),
    _t("intensifier", 3, "overall, {np} {be} {cue} {adj}."),
    _t("intensifier", 4, "i thought {np} {be} {cue} {adj}.", held_out=True),
    _t("intensifier", 5, "{np} turned out to be {cue} {adj}.", held_out=True),
    _t("double_negation", 1, "it is not true that {np} {be} not {adj}.", "not ... not"),
    _t("double_negation", 2, "nobody could say {np} {be} not {adj}.", "nobody ... not"),
    _t("double_negation", 3, "i would never claim {np} {be} not {adj}.", "never ... not", True),
    _t("double_negation", 4, "no one can honestly say {np} {be}n't {adj}.", "no one ... n't",
       True),
)
TEMPLATE_BY_ID = {t.id: t for t in TEMPLATES}


@dataclass(frozen=True)
class SentimentExample:
    """One labelled sentence (0 = negative, 1 = positive) and the parts it was built from.

    ``nouns`` and ``adjectives`` are in surface order. GLUE records (:func:`load_glue`) use
    ``phenomenon="glue"``; MNLI puts the hypothesis in ``text_pair`` and has labels 0/1/2.
    """

    text: str
    label: int
    phenomenon: str
    template_id: str
    domain: str = ""
    cue: str = ""
    nouns: tuple[str, ...] = ()
    adjectives: tuple[str, ...] = ()
    text_pair: str | None = None

    @property
    def content_words(self) -> tuple[str, ...]:
        """The lexicon words in the sentence: noun heads (without "the") and adjectives."""
        heads = tuple(w for n in self.nouns for w in n.split() if w != "the")
        return heads + self.adjectives


def label_for(phenomenon: str, polarities: tuple[int, ...]) -> int:
    """The labelling rules of the module docstring; ``polarities`` in surface order."""
    if phenomenon == "negation":
        return 1 - polarities[0]
    if phenomenon == "contrast":
        return polarities[-1]  # the last clause decides
    return polarities[0]  # plain, intensifier, double_negation


def _be(noun: str) -> str:
    return "were" if noun.endswith("s") or noun in _PLURAL_WITHOUT_S else "was"


def _check_word(word: str, known: dict, what: str) -> None:
    if word not in known:
        raise ValueError(f"{what} {word!r} is not in the sentiment lexicon; "
                         f"pick one of: {', '.join(sorted(known))}")


def compose(template_id: str, noun: str, adjective: str, *, cue: str | None = None,
            noun_b: str | None = None, adjective_b: str | None = None) -> SentimentExample:
    """Build one example from its parts and label it by the rules.

    >>> compose("contrast-2", "the food", "good", adjective_b="overpriced").label
    0
    """
    if template_id not in TEMPLATE_BY_ID:
        raise ValueError(f"unknown template_id {template_id!r}; "
                         f"valid: {', '.join(TEMPLATE_BY_ID)}")
    t = TEMPLATE_BY_ID[template_id]
    nouns = (noun,) if noun_b is None else (noun, noun_b)
    adjectives = (adjective,) if adjective_b is None else (adjective, adjective_b)
    for n in nouns:
        _check_word(n, NOUN_DOMAIN, "noun")
    for a in adjectives:
        _check_word(a, POLARITY, "adjective")
    if "{cue}" in t.pattern:
        choices = NEGATORS if t.phenomenon == "negation" else DEGREE_WORDS
        if cue not in choices:
            raise ValueError(f"template {template_id} needs cue= one of {choices}, got {cue!r}")
    elif cue is not None:
        raise ValueError(f"template {template_id} has a fixed cue ({t.cue!r}); leave cue=None")
    for arg, value, slot in (("adjective_b", adjective_b, "{adj_b}"),
                             ("noun_b", noun_b, "{np_b}")):
        if (slot in t.pattern) != (value is not None):
            need = "needs" if slot in t.pattern else "takes no"
            raise ValueError(f"template {template_id} {need} {arg}; pattern is {t.pattern!r}")
    polarities = tuple(POLARITY[a] for a in adjectives)
    if t.phenomenon == "contrast" and polarities[0] == polarities[1]:
        raise ValueError(f"a contrast needs adjectives of opposite polarity, got {adjective!r} "
                         f"and {adjective_b!r} (both {LABEL_NAMES[polarities[0]]})")
    text = t.pattern.format(np=noun, be=_be(noun), adj=adjective, cue=cue, np_b=noun_b,
                            be_b=_be(noun_b or ""), adj_b=adjective_b)
    return SentimentExample(text=text[0].upper() + text[1:],
                            label=label_for(t.phenomenon, polarities),
                            phenomenon=t.phenomenon, template_id=t.id, domain=NOUN_DOMAIN[noun],
                            cue=cue if cue is not None else t.cue, nouns=nouns,
                            adjectives=adjectives)


def _adjectives(aspect: Aspect, polarity: int, held_out: bool) -> tuple[str, ...]:
    field = "positive" if polarity == POSITIVE else "negative"
    return aspect.words(field, held_out) + GENERIC.words(field, held_out)


def _draw(rng: random.Random, phenomenon: str, label: int, held_out: bool) -> SentimentExample:
    """Draw one example of ``phenomenon`` whose rule gives ``label``."""
    template = rng.choice([t for t in TEMPLATES
                           if t.phenomenon == phenomenon and t.held_out == held_out])
    aspect = rng.choice(ASPECTS)
    noun = rng.choice(aspect.words("nouns", held_out))
    first = 1 - label if phenomenon in ("negation", "contrast") else label
    parts = dict(noun=noun, adjective=rng.choice(_adjectives(aspect, first, held_out)))
    if "{cue}" in template.pattern:
        parts["cue"] = rng.choice(NEGATORS if phenomenon == "negation" else DEGREE_WORDS)
    if "{np_b}" in template.pattern:  # second clause: same domain, another noun
        aspect = rng.choice([a for a in ASPECTS if a.domain == aspect.domain])
        parts["noun_b"] = rng.choice([n for n in aspect.words("nouns", held_out) if n != noun])
    if "{adj_b}" in template.pattern:
        parts["adjective_b"] = rng.choice(_adjectives(aspect, label, held_out))
    return compose(template.id, **parts)


def _plan(n: int) -> list[tuple[str, int]]:
    """(phenomenon, label) for ``n`` examples: shares by largest remainder, labels alternating."""
    raw = {p: n * s for p, s in PHENOMENON_SHARES.items()}
    counts = {p: int(r) for p, r in raw.items()}
    by_remainder = sorted(PHENOMENA, key=lambda p: counts[p] - raw[p])
    for p in by_remainder[: n - sum(counts.values())]:
        counts[p] += 1
    phenomena = [p for p in PHENOMENA for _ in range(counts[p])]
    return [(p, i % 2) for i, p in enumerate(phenomena)]


def _make_split(rng: random.Random, name: str, n: int, held_out: bool,
                taken: set[str]) -> list[SentimentExample]:
    examples = []
    for phenomenon, label in _plan(n):
        for _ in range(500):
            example = _draw(rng, phenomenon, label, held_out)
            if example.text not in taken:
                break
        else:
            raise ValueError(f"ran out of distinct {phenomenon} sentences for the {name} split "
                             f"after {len(examples)} examples; ask for fewer examples")
        taken.add(example.text)
        examples.append(example)
    rng.shuffle(examples)
    return examples


def make_sentiment_splits(seed: int = 0, n_train: int = 2000, n_validation: int = 500,
                          n_test: int = 500) -> dict[str, list[SentimentExample]]:
    """Train, validation and test splits; test uses held-out templates and words only.

    The defaults fine-tune MiniLM on a CPU in minutes; the lexicon has room for about 8,000
    train + validation and 2,000 test sentences. Deterministic in ``seed``, no global state.
    """
    sizes = {"n_train": n_train, "n_validation": n_validation, "n_test": n_test}
    for arg, n in sizes.items():
        if not isinstance(n, int) or n < len(PHENOMENA):
            raise ValueError(f"{arg} must be an integer >= {len(PHENOMENA)} so that every "
                             f"phenomenon appears, got {n!r}")
    rng = random.Random(seed)
    taken: set[str] = set()
    return {name: _make_split(rng, name, n, name == "test", taken)
            for name, n in zip(("train", "validation", "test"), sizes.values())}


# ------------------------------------------------------------------ GLUE (gpu profile)
GLUE_FIELDS = {"sst2": ("sentence", None), "mnli": ("premise", "hypothesis")}


def from_glue_record(task: str, record: dict) -> SentimentExample:
    """Convert one ``nyu-mll/glue`` record (SST-2 or MNLI) to a :class:`SentimentExample`."""
    if task not in GLUE_FIELDS:
        raise ValueError(f"unknown GLUE task {task!r}; valid: {', '.join(GLUE_FIELDS)}")
    text_field, pair_field = GLUE_FIELDS[task]
    return SentimentExample(text=record[text_field], label=int(record["label"]),
                            phenomenon="glue", template_id=f"glue-{task}", domain=task,
                            text_pair=record[pair_field] if pair_field else None)


def load_glue(task: str = "sst2", split: str = "train",
              limit: int | None = None) -> list[SentimentExample]:
    """GLUE SST-2 or MNLI from the Hugging Face hub (needs ``datasets`` and a network).

    MNLI's evaluation splits are ``validation_matched`` and ``validation_mismatched``; hub test
    splits carry label -1.
    """
    if task not in GLUE_FIELDS:
        raise ValueError(f"unknown GLUE task {task!r}; valid: {', '.join(GLUE_FIELDS)}")
    try:
        import datasets
    except ImportError as err:
        raise ImportError("load_glue needs the `datasets` package, which the ci profile leaves "
                          "out; install it with pip install 'peft-course-companion[gpu]'"
                          ) from err
    records = datasets.load_dataset("nyu-mll/glue", task, split=split)
    if limit is not None:
        records = records.select(range(min(limit, len(records))))
    return [from_glue_record(task, r) for r in records]

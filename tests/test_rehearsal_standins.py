"""The rehearsal's stand-in for ``datasets.load_dataset`` keeps the hub's schemas and refuses the unknown.

(The stand-in checkpoints are exercised by the rehearsal itself, ``make rehearsal``.)
"""

import pytest

from tests.rehearsal import data


def test_glue_sst2_has_the_hub_columns_label_names_and_test_labels_of_minus_one():
    sst2 = data.load_dataset("nyu-mll/glue", "sst2")
    assert list(sst2) == ["train", "validation", "test"]
    assert sst2["train"].column_names == ["sentence", "label", "idx"]
    assert sst2["train"].features["label"].names == ["negative", "positive"]
    assert set(sst2["test"]["label"]) == {-1} and set(sst2["train"]["label"]) == {0, 1}


def test_glue_mnli_has_matched_and_mismatched_splits_and_three_labels():
    mnli = data.load_dataset("nyu-mll/glue", "mnli", split="validation_matched")
    assert mnli.column_names == ["premise", "hypothesis", "label", "idx"]
    assert mnli.features["label"].names == ["entailment", "neutral", "contradiction"]
    with pytest.raises(ValueError, match="Unknown split"):
        data.load_dataset("nyu-mll/glue", "mnli", split="validation")


def test_alpaca_has_the_hub_columns_and_one_record_longer_than_any_max_length():
    alpaca = data.load_dataset("tatsu-lab/alpaca", split="train")
    assert alpaca.column_names == ["instruction", "input", "output", "text"]
    assert max(len(r["input"].split()) for r in alpaca) > 2048


def test_an_unknown_data_set_is_refused_so_a_new_one_needs_a_stand_in():
    with pytest.raises(FileNotFoundError, match="no stand-in"):
        data.load_dataset("imdb")

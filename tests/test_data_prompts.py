"""Prompts: the paper's template by default, the released code's forms only on request."""
import pytest

from meddap.data.prompts import (ADJECTIVES, CLASS_PHRASES, class_phrase, prompt_for,
                                 unknown_adjectives)
from meddap.errors import MeddapError


def test_table1_adjectives_in_paper_order():
    # MEDDAP Table 1 (paper_facts.md, "Prompts and generation").
    assert ADJECTIVES == ("none", "colorful", "stylized", "high-contrast", "low-contrast",
                          "posterized", "sheared", "solarized", "bright", "dark")


def test_class_phrases():
    assert CLASS_PHRASES == {"benign": "benign", "malignant": "malignant", "normal": "no"}
    assert class_phrase("normal") == "no"
    assert class_phrase("cyst") == "cyst"          # any ImageFolder class is used verbatim


@pytest.mark.parametrize("label,phrase", [("benign", "benign"), ("malignant", "malignant"),
                                          ("normal", "no")])
def test_paper_template(label, phrase):
    plain = f"ultrasound image of {phrase} tumor in the breast"
    assert prompt_for(label) == plain
    assert prompt_for(label, "none") == plain
    assert prompt_for(label, None, stage="train") == plain
    assert prompt_for(label, "high-contrast") == f"high-contrast {plain}"
    assert prompt_for(label, "  low-contrast ") == f"low-contrast {plain}"   # single space


def test_every_adjective_joined_by_one_space():
    for adj in ADJECTIVES[1:]:
        p = prompt_for("benign", adj)
        assert p.startswith(adj + " ultrasound") and "  " not in p


def test_released_generation_prompt_is_glued():
    assert prompt_for("benign", "colorful", as_released=True) == \
        "colorfulan ultrasound photo of benign tumor in breast"
    assert prompt_for("normal", "dark", as_released=True) == \
        "darkan ultrasound photo of no tumor in breast"
    assert prompt_for("malignant", "none", as_released=True) == \
        "an ultrasound photo of malignant tumor in breast"


def test_released_training_caption_says_normal_tumor():
    assert prompt_for("normal", stage="train", as_released=True) == \
        "an ultrasound photo of normal tumor in breast"
    assert prompt_for("benign", stage="train", as_released=True) == \
        "an ultrasound photo of benign tumor in breast"
    with pytest.raises(MeddapError, match="no adjective"):
        prompt_for("benign", "colorful", stage="train", as_released=True)


def test_bad_stage_and_unknown_adjectives():
    with pytest.raises(MeddapError, match="'inference' is unknown"):
        prompt_for("benign", stage="inference")
    assert unknown_adjectives(["none", "Dark", "glossy"]) == ["glossy"]

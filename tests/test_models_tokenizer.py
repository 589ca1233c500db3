"""Tokenizer: SD v1's CLIP tokenization, checked against transformers' CLIPTokenizer.

The oracle tokenizer is built offline from open_clip's shipped BPE merges the
way OpenAI's CLIP vocabulary is defined (256 byte symbols, their `</w>` forms,
one entry per merge, then <|startoftext|> and <|endoftext|>), with padding to
77 by <|endoftext|>, as `openai/clip-vit-large-patch14`'s tokenizer (which SD v1
used) is configured.
"""
import gzip
import json

import pytest
import torch

from meddap.data.prompts import ADJECTIVES, prompt_for
from meddap.models.text_encoder import END_OF_TEXT, START_OF_TEXT, tokenize, tokenize_with_dropped


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]               # OpenAI CLIP's 48,894 merges
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer.from_pretrained(folder, pad_token="<|endoftext|>")
    assert tok.bos_token_id == START_OF_TEXT and tok.pad_token_id == END_OF_TEXT
    return lambda texts: tok(texts, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids


def test_recorded_ids():
    # OpenAI CLIP ids: "a" 320, "photo" 1125, "of" 539, "cat" 2368, "ultrasound" 29717.
    ids = tokenize(["a photo of a cat", "ultrasound"])
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids[1, :3].tolist() == [49406, 29717, 49407]


def test_shape_and_padding_with_end_token():
    ids = tokenize(["a photo of a cat", ""])
    assert ids.shape == (2, 77) and ids.dtype == torch.int64
    assert (ids[0, 7:] == END_OF_TEXT).all()               # padded with 49407, not open_clip's 0
    assert ids[1].tolist() == [START_OF_TEXT] + [END_OF_TEXT] * 76


def test_truncation_to_75_tokens_and_dropped_words(hf_tokenizer):
    words = ("a photo of the dark breast with an image " * 9).split()   # 81 words
    text = " ".join(words)
    ids, dropped = tokenize_with_dropped([text, "short prompt"])
    assert ids[0, 0] == START_OF_TEXT and ids[0, 76] == END_OF_TEXT
    assert (ids[0, 1:76] != END_OF_TEXT).all()             # exactly 75 prompt tokens kept
    assert torch.equal(ids, hf_tokenizer([text, "short prompt"]))
    assert dropped[1] == ""
    # each of these words is one BPE token, so the last 81 - 75 = 6 words are cut
    assert dropped[0].split() == words[75:]


def test_case_and_whitespace_insensitive(hf_tokenizer):
    a = tokenize(["Benign Tumor in the BREAST", "  benign   tumor in the breast "])
    assert torch.equal(a[0], a[1])
    assert torch.equal(a, hf_tokenizer(["Benign Tumor in the BREAST", "  benign   tumor in the breast "]))


@pytest.mark.parametrize("adjective", ADJECTIVES)
def test_paper_adjectives_match_clip_tokenizer(adjective, hf_tokenizer):
    prompts = [prompt_for(c, adjective) for c in ("benign", "malignant", "normal")]
    prompts += [prompt_for(c, adjective, as_released=True) for c in ("benign", "malignant", "normal")]
    assert torch.equal(tokenize(prompts), hf_tokenizer(prompts))


def test_hyphenated_adjective_splits_like_clip():
    # CLIP's pre-tokenizer splits "high-contrast" into "high", "-", "contrast": three end-of-word tokens
    from meddap.models.text_encoder import _bpe
    ids = tokenize(["high-contrast"])[0]
    assert [_bpe().decoder[i] for i in ids[1:4].tolist()] == ["high</w>", "-</w>", "contrast</w>"]
    assert ids[4] == END_OF_TEXT

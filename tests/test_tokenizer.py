"""CLIP tokenizer parity with transformers' CLIPTokenizer, on the bundled OpenAI vocabulary."""
import json
import shutil

import pytest
import torch
import transformers

from fastdiff.models.tokenizer import BUNDLED_VOCAB, CLIPTokenizer

SD1_PAD, SD2_PAD = "<|endoftext|>", "!"

_WORDS = ("a majestic castle on a hill at sunset, highly detailed oil painting by an old master, trending on "
          "artstation; volumetric light 8k octane render").split()
LONG_PROMPT = " ".join(_WORDS[i % len(_WORDS)] for i in range(200))

PROMPTS = [
    "",
    "a photo of an astronaut riding a horse on mars",
    "Mixed CASE Words, LOUD and quiet",
    "   extra \t whitespace\n\nand  newlines   ",
    "punctuation: hello, world! (really?) [yes] {no} -- ... 'quoted' \"double\" don't it's we'll",
    "numbers 0 42 3.14159 1,000,000 2024-01-31 1/2 100% #1 $5",
    "accents: café naïve façade Ünïcödé crème brûlée ÆØÅ ß ﬁ",
    "combining: cafe\u0301 e\u0301",  # NFC composes e + U+0301 into é
    "CJK: 你好世界 日本語のテキスト 한국어",
    "emoji: 😀👍🏽 🏳️‍🌈 🐱‍👤",
    "greek ΟΔΟΣ σοφία, cyrillic Привет, arabic مرحبا, hindi नमस्ते",
    "odd spaces:\u3000ideographic\xa0nbsp\u2009thin \x1c\x1f control \u200bzero-width",
    "special tokens in text: a<|endoftext|>b <|startoftext|> <|ENDOFTEXT|>",
    "SD2's pad token: wow!! hello! a ! b !?",
    LONG_PROMPT,
]


@pytest.fixture(scope="module", params=[SD1_PAD, SD2_PAD], ids=["pad_eos", "pad_bang"])
def tokenizers(request):
    theirs = transformers.CLIPTokenizer.from_pretrained(BUNDLED_VOCAB, pad_token=request.param)
    return CLIPTokenizer.default(pad_token=request.param), theirs


def _their_ids(theirs, prompts):
    return theirs(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def test_ids_match_transformers(tokenizers):
    ours, theirs = tokenizers
    with pytest.warns(UserWarning):  # LONG_PROMPT is cut
        got = ours(PROMPTS)
    want = _their_ids(theirs, PROMPTS)
    assert got.shape == want.shape == (len(PROMPTS), 77) and got.dtype == torch.long
    mismatches = [(p, g.tolist(), w.tolist()) for p, g, w in zip(PROMPTS, got, want) if not torch.equal(g, w)]
    for prompt, g, w in mismatches:
        print(f"MISMATCH {prompt!r}\n  ours   {g}\n  theirs {w}")
    assert not mismatches


def test_padding_follows_eos(tokenizers):
    ours, theirs = tokenizers
    ids = ours("a cat")[0].tolist()
    pad = theirs.pad_token_id
    print(ids[:6], "pad id", pad)
    assert ids[:4] == [49406, 320, 2368, 49407]
    assert ids[4:] == [pad] * 73
    assert pad == (0 if ours.pad_token == SD2_PAD else 49407)


def test_long_prompt_keeps_eos_and_warns_with_count(tokenizers):
    ours, theirs = tokenizers
    n = len(ours.encode(LONG_PROMPT))
    with pytest.warns(UserWarning, match=f"{n} tokens long.*dropped the last {n - 75} tokens"):
        got = ours(LONG_PROMPT)[0]
    want = _their_ids(theirs, LONG_PROMPT)[0]
    print(f"{n} tokens, kept 75; last ids ours {got[-3:].tolist()} theirs {want[-3:].tolist()}")
    assert n > 75
    assert torch.equal(got, want)
    assert got[-1] == 49407 and got[0] == 49406


def test_encode_and_decode_without_specials():
    ours = CLIPTokenizer.default()
    ids = ours.encode("A Photo of   a CAT, 3 dogs!")
    print(ids, ours.decode(ids))
    assert ids == ours("A Photo of   a CAT, 3 dogs!")[0, 1:1 + len(ids)].tolist()
    assert ours.decode(ids) == "a photo of a cat , 3 dogs !"


def test_bundled_vocab_is_openai_clip():
    vocab = json.loads((BUNDLED_VOCAB / "vocab.json").read_text(encoding="utf-8"))
    merges = (BUNDLED_VOCAB / "merges.txt").read_text(encoding="utf-8").splitlines()
    print(len(vocab), "tokens,", len(merges) - 1, "merges")
    assert len(vocab) == 49408 and merges[0] == "#version: 0.2" and len(merges) == 1 + 48894
    # OpenAI's SimpleTokenizer layout: 256 bytes, the same with "</w>", one token per merge, then the specials.
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert all(vocab["".join(m.split(" "))] == 512 + rank for rank, m in enumerate(merges[1:]))
    assert (vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (49406, 49407)


def test_from_pretrained_reads_pad_token_and_vocab_of_a_diffusers_folder(tmp_path):
    # An SD2 tokenizer/ folder written by transformers 4: vocab.json, merges.txt, AddedToken dicts.
    shutil.copy(BUNDLED_VOCAB / "vocab.json", tmp_path)
    shutil.copy(BUNDLED_VOCAB / "merges.txt", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 77, "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"pad_token": {"content": "!", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}}))
    ours = CLIPTokenizer.from_pretrained(tmp_path)
    assert (ours.pad_token, ours.pad_id, ours.max_length) == ("!", 0, 77)
    assert CLIPTokenizer.from_pretrained(tmp_path, pad_token=SD1_PAD).pad_id == 49407


def test_from_pretrained_reads_what_transformers_5_saves(tmp_path):
    theirs = transformers.CLIPTokenizer.from_pretrained(BUNDLED_VOCAB, pad_token=SD2_PAD)
    theirs.save_pretrained(tmp_path)
    print(sorted(p.name for p in tmp_path.iterdir()))  # tokenizer.json + tokenizer_config.json, no vocab.json
    ours = CLIPTokenizer.from_pretrained(tmp_path)
    assert ours.pad_token == SD2_PAD and ours.max_length == 77
    assert torch.equal(ours(PROMPTS[:-1]), _their_ids(theirs, PROMPTS[:-1]))


def test_pad_token_missing_from_vocab_raises():
    with pytest.raises(ValueError, match="pad token '<pad>' is not in the vocabulary"):
        CLIPTokenizer.default(pad_token="<pad>")


def test_truncation_warning_names_a_huge_prompt_by_a_short_excerpt(tokenizers):
    ours, _ = tokenizers
    prompt = "a red circle " + "word " * 10000
    with pytest.warns(UserWarning) as record:
        ours(["", prompt])
    message = str(record[0].message)
    print(message)
    assert len(record) == 1 and len(message) < 300
    assert message.startswith("prompt 'a red circle word word") and "10003 tokens long" in message

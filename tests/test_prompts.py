"""AUTOMATIC1111-style prompts: emphasis parsing, 75-token chunks, BREAK, and weighting of the encoder output.

Expected parses are stable-diffusion-webui's own: its docstring examples, and outputs of its parse_prompt_attention
for malformed emphasis.
"""
import random
import re

import pytest
import torch

from fastdiff.models.tokenizer import CLIPTokenizer
from fastdiff.prompts import parse_prompt_attention, tokenize_prompt, weigh

SD1_PAD, SD2_PAD = "<|endoftext|>", "!"


@pytest.fixture(scope="module")
def sd1():
    return CLIPTokenizer.default(pad_token=SD1_PAD)


@pytest.fixture(scope="module", params=[SD1_PAD, SD2_PAD], ids=["sd1", "sd2"])
def tokenizer(request):
    return CLIPTokenizer.default(pad_token=request.param)


def _parse(text):
    """parse_prompt_attention's output as webui writes it: a list of [text, weight] lists."""
    return [list(piece) for piece in parse_prompt_attention(text)]


@pytest.mark.parametrize("text, expected", [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    (r"\(literal\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0],
      ["house", 1.5730000000000004],
      [" ", 1.1],
      ["on", 1.0],
      [" a ", 1.1],
      ["hill", 0.55],
      [", sun, ", 1.1],
      ["sky", 1.4641000000000006],
      [".", 1.1]]),
])
def test_parse_matches_a1111_docstring_examples(text, expected):
    assert _parse(text) == expected


def test_parse_empty_prompt_and_weight_syntax():
    assert parse_prompt_attention("") == [("", 1.0)]
    assert parse_prompt_attention("((word))") == [("word", 1.1 * 1.1)]
    assert parse_prompt_attention("(word:1.3)") == [("word", 1.3)]
    assert parse_prompt_attention("[word]") == [("word", 1 / 1.1)]
    assert parse_prompt_attention(r"\\ \( \) \[ \]") == [("\\ ( ) [ ]", 1.0)]
    assert parse_prompt_attention("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]


@pytest.mark.parametrize("text, expected", [
    ("a (b", [("a ", 1.0), ("b", 1.1)]),
    ("a )b( c", [("a )b", 1.0), (" c", 1.1)]),
    ("a ]b[ c", [("a ]b", 1.0), (" c", 0.9090909090909091)]),
    ("((a)", [("a", 1.2100000000000002)]),
    ("[[a]", [("a", 0.8264462809917354)]),
    ("(a]", [("a]", 1.1)]),
    ("[a)", [("a)", 0.9090909090909091)]),
    ("(a [b) c]", [("a ", 1.1), ("b", 1.0), (" c", 0.9090909090909091)]),
    ("[(a:2]", [("a:2", 1.0)]),
    ("]])a((", [("]])a", 1.0)]),
    ("a:b", [("a:b", 1.0)]),
    ("(a:b)", [("a:b", 1.1)]),
    ("(a:)", [("a:", 1.1)]),
    ("(a: 1.5 )", [("a", 1.5)]),
    ("a:1.5)", [("a:1.5)", 1.0)]),
    ("a(b:0)c", [("a", 1.0), ("b", 0.0), ("c", 1.0)]),
    ("\\a\\", [("a", 1.0)]),
    ("a\\\\b", [("a\\b", 1.0)]),
    ("\\\\(a\\)", [("\\", 1.0), ("a)", 1.1)]),
    ("BREAK a", [("", 1.0), ("BREAK", -1.0), ("a", 1.0)]),
    ("a BREAK", [("a", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),
    ("a (b:-1) BREAK c", [("a ", 1.0), ("b", -1.0), ("", 1.0), ("BREAK", -1.0), ("c", 1.0)]),
    # webui scales a BREAK inside brackets like any piece, after which it is no longer a BREAK.
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
])
def test_malformed_emphasis_parses_as_a1111(text, expected):
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("(a:1.2.3)", [("a:1.2.3", 1.1)]),
    ("(a:.)", [("a:.", 1.1)]),
    ("x:1.2.3)", [("x:1.2.3)", 1.0)]),
])
def test_weight_that_is_not_a_number_reads_as_text(text, expected):
    assert parse_prompt_attention(text) == expected


def test_random_bracket_strings_never_raise():
    rng = random.Random(0)
    atoms = ["(", ")", "[", "]", ":", "\\", "\\(", "\\]", "\\\\", "a", "b c", " ", ":1.5)", ": .3 )", ":1.2.3)",
             " BREAK ", ","]
    for _ in range(2000):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 12)))
        pieces = parse_prompt_attention(text)
        assert pieces and all(isinstance(t, str) and isinstance(w, float) for t, w in pieces), text
        assert all(a[1] != b[1] for a, b in zip(pieces, pieces[1:])), (text, pieces)
        # The syntax is brackets, backslashes and weights: every letter of the prompt is kept, in order.
        assert re.sub("[^a-zA-Z]", "", "".join(t for t, _ in pieces)) == re.sub("[^a-zA-Z]", "", text), text


def _words(n, word="cat"):
    """n single-token words."""
    return " ".join([word] * n)


@pytest.mark.parametrize("text", [
    "",
    "a photo of an astronaut riding a horse on mars",
    "punctuation: hello, world! really? yes; {no} -- ... 'quoted' \"double\" don't it's",
    "numbers 0 42 3.14159 1,000,000 2024-01-31 1/2 100% #1 $5",
    "  extra \t whitespace\n and  newlines ",
    _words(75),
])
def test_plain_prompt_gives_the_tokenizers_row(tokenizer, text):
    ids, weights = tokenize_prompt(tokenizer, text)
    assert ids == tokenizer(text).tolist()
    assert weights == [[1.0] * tokenizer.max_length]


def test_exactly_75_tokens_is_one_chunk_and_76_is_two(sd1):
    assert len(sd1.encode(_words(75))) == 75
    assert len(tokenize_prompt(sd1, _words(75))[0]) == 1
    assert len(tokenize_prompt(sd1, _words(76))[0]) == 2


def test_unit_weight_and_round_brackets_keep_the_ids(tokenizer):
    plain_ids, plain_weights = tokenize_prompt(tokenizer, "a photo of a cat")
    assert tokenize_prompt(tokenizer, "a photo of a (cat:1.0)") == (plain_ids, plain_weights)
    ids, weights = tokenize_prompt(tokenizer, "a photo of a (cat)")
    assert ids == plain_ids
    cat = 1 + len(tokenizer.encode("a photo of a"))  # after bos
    assert weights[0][cat] == 1.1
    assert weights[0][:cat] + weights[0][cat + 1:] == [1.0] * (tokenizer.max_length - 1)


def test_long_prompt_is_cut_into_chunks_of_75(tokenizer):
    words = "castle hill sunset painting master light river forest".split()
    text = " ".join(words[i % len(words)] for i in range(200))
    tokens = tokenizer.encode(text)
    assert len(tokens) == 200
    ids, weights = tokenize_prompt(tokenizer, text)
    assert len(ids) == len(weights) == 3
    assert all(len(row) == tokenizer.max_length and row[0] == tokenizer.bos_id for row in ids)
    assert [row[1:76] for row in ids[:2]] == [tokens[:75], tokens[75:150]]
    assert ids[2] == tokenizer(tokenizer.decode(tokens[150:])).tolist()[0]

    changed = " ".join(text.split()[:150] + ["dog"] * 50)
    changed_ids, _ = tokenize_prompt(tokenizer, changed)
    assert changed_ids[:2] == ids[:2] and changed_ids[2] != ids[2]


@pytest.mark.parametrize("backtrack, moved", [(20, True), (5, True), (4, False), (0, False)])
def test_comma_backtrack_moves_the_tail_to_the_next_chunk(sd1, backtrack, moved):
    # Tokens 0-69 "cat", 70 ",", 71-80 "(dog)": the 76th token finds the chunk's last comma 5 tokens from its end.
    ids, weights = tokenize_prompt(sd1, f"{_words(70)}, ({_words(10, 'dog')})", comma_backtrack=backtrack)
    cat, comma, dog = sd1.encode("cat , dog")
    assert len(ids) == 2
    first = 71 if moved else 75
    assert ids[0][1:first + 1] == [cat] * 70 + [comma] + [dog] * (first - 71)
    assert ids[0][first + 1] == sd1.eos_id
    assert ids[1][1:1 + 81 - first] == [dog] * (81 - first)
    assert weights[1][1:1 + 81 - first] == [1.1] * (81 - first)


def test_break_starts_a_new_chunk(tokenizer):
    ids, weights = tokenize_prompt(tokenizer, "a red cat BREAK a blue dog")
    assert ids == tokenizer(["a red cat", "a blue dog"]).tolist()
    assert weights == [[1.0] * tokenizer.max_length] * 2
    assert tokenize_prompt(tokenizer, "a cat BREAK")[0] == tokenizer(["a cat"]).tolist()
    assert tokenize_prompt(tokenizer, "BREAK a cat")[0] == tokenizer(["", "a cat"]).tolist()
    assert tokenize_prompt(tokenizer, "a break cat")[0] == tokenizer(["a break cat"]).tolist()
    # A BREAK right after a full chunk ends that chunk only: no empty chunk follows.
    ids, _ = tokenize_prompt(tokenizer, f"{_words(74)}, BREAK dog")
    assert ids == tokenizer([f"{_words(74)},", "dog"]).tolist()


def _hidden(n, t=77, d=16):
    return torch.randn(n, t, d) + 0.5  # a mean well away from zero


def test_weigh_with_unit_weights_is_the_identity_bit_for_bit():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        hidden = _hidden(3).to(dtype)
        out = weigh(hidden, torch.ones(3, 77))
        assert out.dtype == dtype and torch.equal(out, hidden)


def test_weigh_scales_weighted_tokens_and_restores_each_chunks_mean():
    hidden = _hidden(3)
    weights = torch.ones(3, 77)
    weights[0, 5], weights[0, 6], weights[2, 10] = 1.5, 0.5, 1.21
    out = weigh(hidden, weights)
    print("mean error", (out.mean(dim=(1, 2)) - hidden.mean(dim=(1, 2))).abs().max().item())
    assert torch.equal(out[1], hidden[1])
    assert torch.allclose(out.mean(dim=(1, 2)), hidden.mean(dim=(1, 2)), rtol=0, atol=1e-6)
    scale = out / hidden  # (N, T, D): one rescale factor per chunk, times the token's weight
    for n, t, w in ((0, 5, 1.5), (0, 6, 0.5), (2, 10, 1.21)):
        assert torch.allclose(scale[n, t], w * scale[n, 0], rtol=1e-5)
        assert not torch.equal(out[n], hidden[n])
    assert torch.allclose(scale[0, 7:], scale[0, 0].expand(70, -1), rtol=1e-5)


def test_weigh_rejects_weights_of_another_shape():
    with pytest.raises(ValueError, match=r"weights \(2, 76\)"):
        weigh(_hidden(2), torch.ones(2, 76))

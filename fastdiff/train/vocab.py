"""A CLIP-format byte-level BPE vocabulary small enough to ship: the 512 byte symbols plus merges that make
every caption word one token.

OpenAI CLIP's 49408-token vocabulary would cost the default model a 49408 x D embedding (12.6 M parameters
at D = 256, 25 MB in float16) to spell 25 words. This vocabulary keeps CLIP's layout and rules, so
`fastdiff.models.CLIPTokenizer` (and transformers' CLIPTokenizer) read it unchanged:

    ids 0..255      the 256 byte symbols (GPT-2's printable byte alphabet)
    ids 256..511    the same with the end-of-word marker "</w>"
    ids 512..       one token per merge, in merge order
    last two        <|startoftext|>, <|endoftext|> (also the pad token, as in SD1)

Any text still tokenizes (unknown words fall apart into byte symbols); only caption words are single tokens.
tokenizer_config.json declares the words (`"fastdiff_known_words"`), so that fastdiff's tokenizer notes the
prompt words the model never saw (transformers ignores the key).
The merges are learnt by BPE (Sennrich et al. 2016) on the word list itself, each word counted once, most
frequent pair first, ties broken by the pair's text, until every word is one symbol; encoding a word
replays its own merges, so it comes out as one token.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable

from fastdiff.models.tokenizer import (BOS_TOKEN, END_OF_WORD, EOS_TOKEN, KNOWN_WORDS_KEY, CLIPTokenizer,
                                       bytes_to_unicode, merge_pair)

MAX_LENGTH = 77  # token ids per prompt: CLIP's context length, kept so prompts behave as in SD


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges, highest priority first, after which each of `words` (lowercase) is a single symbol."""
    byte_encoder = bytes_to_unicode()
    spelled = []
    for word in sorted(set(words)):
        if not word or word != word.lower() or " " in word:
            raise ValueError(f"words must be non-empty lowercase words without spaces, got {word!r}")
        symbols = [byte_encoder[b] for b in word.encode("utf-8")]
        spelled.append(symbols[:-1] + [symbols[-1] + END_OF_WORD])
    merges = []
    while any(len(s) > 1 for s in spelled):
        pairs = Counter(pair for s in spelled for pair in zip(s, s[1:]))
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        spelled = [merge_pair(s, best) for s in spelled]
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """token -> id in CLIP's layout (module docstring)."""
    base = list(bytes_to_unicode().values())
    tokens = base + [b + END_OF_WORD for b in base] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}


def write_tokenizer(folder: Path, words: Iterable[str]) -> int:
    """Write a diffusers `tokenizer/` folder (vocab.json, merges.txt, special_tokens_map.json,
    tokenizer_config.json) whose vocabulary spells each of `words` as one token, and which declares `words`
    (in their order) as the known words. Returns the vocabulary size."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = list(dict.fromkeys(words))
    merges = learn_merges(words)
    vocab = build_vocab(merges)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, **special}, indent=2))
    declare_known_words(folder, words)
    return len(vocab)


def declare_known_words(folder: Path, words: Iterable[str]) -> None:
    """Set tokenizer_config.json's known words of the tokenizer in `folder` to `words` (in their order),
    keeping its other settings; each word must be one token of the folder's vocabulary."""
    folder = Path(folder)
    words = list(dict.fromkeys(words))
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    split = [w for w in words if len(tokenizer.encode(w)) != 1 or w != w.lower()]
    if split:
        raise ValueError(f"known words must be lowercase single tokens of {folder}'s vocabulary, got {split[:5]}")
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    path.write_text(json.dumps({**config, KNOWN_WORDS_KEY: words}, indent=2))

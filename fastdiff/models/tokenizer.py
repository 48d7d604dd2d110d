"""CLIP's byte-level BPE tokenizer: prompt -> (B, 77) token ids, with no ftfy and no `tokenizers`.

Matches transformers 5's `CLIPTokenizer` (the only one it has, backed by `tokenizers`; diffusers uses it)
token for token. Text -> ids:
1. The special tokens <|startoftext|>, <|endoftext|> and the pad token, written literally in a prompt,
   are split out case-sensitively and map straight to their ids. SD2's pad token is "!", so a "!" in an
   SD2 prompt becomes id 0, not the BPE token "!</w>" (256): transformers does the same.
2. The rest is normalised: Unicode NFC, each whitespace run -> one space, lowercased character by
   character (so a word-final "Σ" becomes "σ", not Python's context-sensitive "ς").
3. It is split into words with OpenAI CLIP's pattern: contractions, letter runs, single digits,
   runs of other symbols. Whitespace only separates words.
4. Each word's UTF-8 bytes are spelled with GPT-2's printable byte alphabet, its last symbol gets the
   end-of-word marker "</w>", and adjacent symbols are merged, lowest merge rank first.

OpenAI's own tokenizer (which trained CLIP) also runs ftfy's mojibake repair and html.unescape before
step 2; transformers 5 does neither and neither do we, so fastdiff needs no ftfy. (transformers 4's
Python `CLIPTokenizer`, when ftfy was missing, fell back to a BERT BasicTokenizer that also dropped
control characters and put spaces around CJK ideographs; that fallback is gone in transformers 5.)

Layout of the output: `[<|startoftext|>, word tokens..., <|endoftext|>, pad, pad, ...]`, length 77;
prompts longer than 75 word tokens keep the first 75 and warn.
"""
import json
import unicodedata
import warnings
from pathlib import Path
from typing import Optional, Union

import regex
import torch

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# OpenAI CLIP's word pattern. Text is lowercased before it runs, so the contractions need no IGNORECASE.
_WORD_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
# `regex`'s \s is Unicode White_Space, as in `tokenizers`; str.split() would also eat \x1c-\x1f.
_WHITESPACE = regex.compile(r"\s+")

# The OpenAI CLIP vocabulary, shipped for single-file checkpoints, which carry no tokenizer.
BUNDLED_VOCAB = Path(__file__).resolve().parent.parent / "assets" / "clip"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves, the other
    68 (controls, space, soft hyphen) to chr(256 + n), so no BPE symbol is whitespace or a control."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


class CLIPTokenizer:
    """Byte-level BPE with OpenAI CLIP's vocabulary; see the module docstring for the exact rules.

    vocab: token -> id (49408 entries for CLIP); merges: the BPE merges, highest priority first;
    pad_token: fills the ids after <|endoftext|> (SD1: "<|endoftext|>", SD2: "!");
    max_length: ids per prompt, <|startoftext|> and <|endoftext|> included (the text encoder's 77 positions).
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str = EOS_TOKEN,
                 max_length: int = 77):
        for name, token in (("bos", BOS_TOKEN), ("eos", EOS_TOKEN), ("pad", pad_token)):
            if token not in vocab:
                raise ValueError(f"{name} token {token!r} is not in the vocabulary ({len(vocab)} entries)")
        if max_length < 2:
            raise ValueError(f"max_length must leave room for <|startoftext|> and <|endoftext|>, got {max_length}")
        self.vocab = vocab
        self.merge_ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.pad_token = pad_token
        self.max_length = max_length
        self.bos_id, self.eos_id, self.pad_id = vocab[BOS_TOKEN], vocab[EOS_TOKEN], vocab[pad_token]
        # transformers maps pieces missing from the vocabulary to its unk token, <|endoftext|>.
        self.unk_id = self.eos_id
        self._specials = {BOS_TOKEN: self.bos_id, EOS_TOKEN: self.eos_id, pad_token: self.pad_id}
        # Longest first, so that one special token that contains another wins.
        self._special_pattern = regex.compile(
            "(" + "|".join(regex.escape(t) for t in sorted(self._specials, key=len, reverse=True)) + ")")
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        self._id_to_token = {i: t for t, i in vocab.items()}
        self._bpe_cache: dict[str, list[str]] = {}

    @classmethod
    def from_pretrained(cls, folder: Union[str, Path], pad_token: Optional[str] = None) -> "CLIPTokenizer":
        """Load a diffusers `tokenizer/` folder: vocab.json + merges.txt, or tokenizer.json (what
        transformers 5 writes), with pad_token and model_max_length read from special_tokens_map.json
        and tokenizer_config.json (special_tokens_map.json wins, as in transformers). An explicit
        `pad_token` overrides both."""
        folder = Path(folder)
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            merges = _parse_merges((folder / "merges.txt").read_text(encoding="utf-8"))
        elif (folder / "tokenizer.json").is_file():
            vocab, merges = _read_tokenizer_json(folder / "tokenizer.json")
        else:
            raise FileNotFoundError(f"{folder} has neither vocab.json + merges.txt nor tokenizer.json")
        settings = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (folder / name).is_file():
                settings.update(json.loads((folder / name).read_text(encoding="utf-8")))
        if pad_token is None:
            pad_token = settings.get("pad_token", EOS_TOKEN)
            # AddedToken entries are saved as {"content": "!", "lstrip": false, ...}.
            pad_token = pad_token["content"] if isinstance(pad_token, dict) else pad_token
        # Folders saved without a length limit store a huge sentinel (int(1e30)): keep CLIP's 77 then.
        max_length = settings.get("model_max_length", 77)
        return cls(vocab, merges, pad_token=pad_token, max_length=max_length if max_length <= 77 else 77)

    @classmethod
    def default(cls, pad_token: str = EOS_TOKEN) -> "CLIPTokenizer":
        """The bundled OpenAI CLIP vocabulary (fastdiff/assets/clip). SD1 pads with "<|endoftext|>", SD2 with "!"."""
        return cls.from_pretrained(BUNDLED_VOCAB, pad_token=pad_token)

    def __call__(self, prompts: Union[str, list[str]]) -> torch.Tensor:
        """Token ids of one prompt or a batch: LongTensor (B, max_length); warns when a prompt is cut."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        rows = []
        for prompt in prompts:
            ids = self.encode(prompt)
            room = self.max_length - 2
            if len(ids) > room:
                warnings.warn(
                    f"prompt {_excerpt(prompt)} is {len(ids)} tokens long but CLIP reads at most {room}: dropped "
                    f"the last {len(ids) - room} tokens, from {_excerpt(self.decode(ids[room:]))}", stacklevel=2)
                ids = ids[:room]
            row = [self.bos_id, *ids, self.eos_id]
            rows.append(row + [self.pad_id] * (self.max_length - len(row)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_length)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without <|startoftext|>, <|endoftext|>, padding or truncation."""
        ids = []
        for piece in self._special_pattern.split(text):
            if piece in self._specials:
                ids.append(self._specials[piece])
                continue
            piece = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", piece))
            # Character by character, like `tokenizers`: str.lower() would turn a word-final "Σ" into "ς".
            piece = "".join(c.lower() for c in piece)
            for word in _WORD_PATTERN.findall(piece):
                symbols = "".join(self._byte_encoder[b] for b in word.encode("utf-8"))
                ids.extend(self.vocab.get(token, self.unk_id) for token in self._bpe(symbols))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of token ids: normalised (lowercase, single spaces), special tokens written out."""
        text = "".join(self._id_to_token[i] for i in ids)
        words = []
        for word in text.split(END_OF_WORD):
            # Special tokens are plain ASCII, which the byte alphabet spells as itself.
            words.append(bytes(self._byte_decoder[c] for c in word).decode("utf-8", errors="replace"))
        return " ".join(words).strip()

    def _bpe(self, symbols: str) -> list[str]:
        """BPE of one word spelled in the byte alphabet: merge the lowest-ranked adjacent pair, all
        its occurrences left to right, until no adjacent pair has a rank."""
        if symbols in self._bpe_cache:
            return self._bpe_cache[symbols]
        word = [*symbols[:-1], symbols[-1] + END_OF_WORD]
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda pair: self.merge_ranks.get(pair, float("inf")))
            if best not in self.merge_ranks:
                break
            word = merge_pair(word, best)
        self._bpe_cache[symbols] = word
        return word


def merge_pair(word: list[str], pair: tuple[str, str]) -> list[str]:
    """`word` with every occurrence of the adjacent `pair` joined into one symbol, left to right."""
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(word[i] + word[i + 1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged


def _parse_merges(text: str) -> list[tuple[str, str]]:
    """merges.txt: an optional "#version" header, then one "left right" pair per line."""
    lines = text.splitlines()
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = []
    for n, line in enumerate(lines):
        if not line:
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise ValueError(f"merges.txt line {n + 2} should be two symbols separated by a space, got {line!r}")
        merges.append((pair[0], pair[1]))
    return merges


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab and merges of a `tokenizers` tokenizer.json holding a CLIP-style BPE model."""
    model = json.loads(path.read_text(encoding="utf-8"))["model"]
    if model.get("type") != "BPE" or model.get("end_of_word_suffix") != END_OF_WORD:
        raise ValueError(f"{path} is not a CLIP BPE tokenizer: model type {model.get('type')!r}, "
                         f"end_of_word_suffix {model.get('end_of_word_suffix')!r} (expected 'BPE', {END_OF_WORD!r})")
    # Merges are ["left", "right"] pairs in recent `tokenizers` versions, "left right" strings in older ones.
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges


def _excerpt(text: str, chars: int = 40) -> str:
    """text quoted, cut to its first `chars` characters (a warning names a prompt without echoing all of it)."""
    return repr(text if len(text) <= chars else text[:chars] + "...")

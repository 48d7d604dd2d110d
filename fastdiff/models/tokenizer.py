"""CLIP's byte-level BPE tokenizer: prompt -> (B, 77) token ids, with no ftfy and no `tokenizers`.

Matches transformers 5's `CLIPTokenizer` (the only one it has, backed by `tokenizers`; diffusers uses it)
token for token. Text -> ids:
1. The special tokens <|startoftext|>, <|endoftext|> and the pad token, and the tokens of textual-inversion
   embeddings (`add_token`), written literally in a prompt, are split out case-sensitively and map straight to
   their ids. SD2's pad token is "!", so a "!" in an SD2 prompt becomes id 0, not the BPE token "!</w>"
   (256): transformers does the same.
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

A model trained on a closed set of words (fastdiff's default model: the words of its caption grammar) declares
them in tokenizer_config.json as `"fastdiff_known_words": [...]`; its tokenizer then notes, in one
`UnknownWordsWarning` per call, the prompt words outside that set. Words here are the letter and digit runs of
the normalised text (step 2) as CLIP's pattern splits it (step 3); contractions, punctuation and special tokens
are never noted. transformers ignores the key.
"""
import json
import unicodedata
import warnings
from pathlib import Path
from typing import Iterable, Optional, Union

import regex
import torch

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# OpenAI CLIP's word pattern. Text is lowercased before it runs, so the contractions need no IGNORECASE.
_WORD_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
# The words checked against a closed vocabulary: CLIP's pattern with digit runs kept whole ("20", not "2", "0"),
# so the letter runs are CLIP's words; matches that start with neither a letter nor a digit are not checked.
_CHECKED_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]+|[^\s\p{L}\p{N}]+""")
_CHECKED_WORD = regex.compile(r"[\p{L}]+|[\p{N}]+")
# `regex`'s \s is Unicode White_Space, as in `tokenizers`; str.split() would also eat \x1c-\x1f.
_WHITESPACE = regex.compile(r"\s+")

# The OpenAI CLIP vocabulary, shipped for single-file checkpoints, which carry no tokenizer.
BUNDLED_VOCAB = Path(__file__).resolve().parent.parent / "assets" / "clip"
# tokenizer_config.json key: the words a model was trained on, when they are a closed set (module docstring).
KNOWN_WORDS_KEY = "fastdiff_known_words"
# An unknown-words note names at most this many unknown words and lists at most this many known ones.
_NAMED_UNKNOWN = 8
_LISTED_KNOWN = 30


class UnknownWordsWarning(UserWarning):
    """A prompt uses words outside the closed vocabulary its model was trained on."""


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
    max_length: ids per prompt, <|startoftext|> and <|endoftext|> included (the text encoder's 77 positions);
    known_words: None for an open vocabulary, else every word the model knows (single words of letters or
    digits, compared after lowercasing; the order is the one a note lists them in): a call warns once, with an
    `UnknownWordsWarning`, naming the words of its prompts outside this set.
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str = EOS_TOKEN,
                 max_length: int = 77, known_words: Optional[Iterable[str]] = None):
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
        # Text split out before normalisation, each piece straight to its ids: the special tokens, and the tokens
        # of textual-inversion embeddings (`add_token`).
        self._specials = {BOS_TOKEN: [self.bos_id], EOS_TOKEN: [self.eos_id], pad_token: [self.pad_id]}
        self._special_pattern = _alternatives(self._specials)
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        self._id_to_token = {i: t for t, i in vocab.items()}
        self._bpe_cache: dict[str, list[str]] = {}
        self.known_words: Optional[tuple[str, ...]] = None
        if known_words is not None:
            if isinstance(known_words, str):
                raise ValueError(f"known_words must be a list of words, got the string {known_words!r}")
            words = [_normalise(w) if isinstance(w, str) else w for w in known_words]
            bad = [w for w in words if not isinstance(w, str) or not _CHECKED_WORD.fullmatch(w)]
            if bad:
                raise ValueError(f"known_words must be single words of letters or digits, got {bad[:5]}")
            self.known_words = tuple(dict.fromkeys(words))
        self._known_set = frozenset(self.known_words or ())

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
        known_words = settings.get(KNOWN_WORDS_KEY)
        if known_words is not None and not isinstance(known_words, list):
            raise ValueError(f"{KNOWN_WORDS_KEY} must be a list of words, got {type(known_words).__name__}")
        return cls(vocab, merges, pad_token=pad_token, max_length=max_length if max_length <= 77 else 77,
                   known_words=known_words)

    @classmethod
    def default(cls, pad_token: str = EOS_TOKEN) -> "CLIPTokenizer":
        """The bundled OpenAI CLIP vocabulary (fastdiff/assets/clip). SD1 pads with "<|endoftext|>", SD2 with "!"."""
        return cls.from_pretrained(BUNDLED_VOCAB, pad_token=pad_token)

    def add_token(self, token: str, ids: list[int]) -> None:
        """Textual inversion: `token`, written in a prompt, stands for `ids` (rows added to the text encoder's
        token table). Like the special tokens it is split out before normalisation, so it matches as written."""
        if not token or any(c.isspace() for c in token):
            raise ValueError(f"an embedding's token must be a non-empty word without spaces, got {token!r}")
        if token in self._specials:
            raise ValueError(f"token {token!r} is already taken; load the embedding under another token")
        if not ids:
            raise ValueError(f"token {token!r} needs at least one id")
        self._specials[token] = list(ids)
        self._special_pattern = _alternatives(self._specials)
        spelled = "".join(self._byte_encoder[b] for b in token.encode("utf-8")) + END_OF_WORD
        self._id_to_token.update({i: spelled if n == 0 else "" for n, i in enumerate(ids)})  # `decode` names it once

    def __call__(self, prompts: Union[str, list[str]]) -> torch.Tensor:
        """Token ids of one prompt or a batch: LongTensor (B, max_length); warns when a prompt is cut, and
        (closed vocabularies) once per call when prompts use words the model does not know."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        self.note_unknown_words(prompts)
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
                ids.extend(self._specials[piece])
                continue
            for word in _WORD_PATTERN.findall(_normalise(piece)):
                symbols = "".join(self._byte_encoder[b] for b in word.encode("utf-8"))
                ids.extend(self.vocab.get(token, self.unk_id) for token in self._bpe(symbols))
        return ids

    def unknown_words(self, prompts: Union[str, list[str]]) -> list[str]:
        """The words of `prompts` outside `known_words`, normalised (lowercase), each once, in order of first
        use; [] for an open vocabulary. Contractions, punctuation and special tokens are not words here."""
        if self.known_words is None:
            return []
        prompts = [prompts] if isinstance(prompts, str) else prompts
        unknown: dict[str, None] = {}
        for prompt in dict.fromkeys(prompts):  # a prompt repeated over a batch is read once
            for piece in self._special_pattern.split(prompt):
                if piece in self._specials:
                    continue
                for word in _CHECKED_PATTERN.findall(_normalise(piece)):
                    if _CHECKED_WORD.fullmatch(word) and word not in self._known_set:
                        unknown[word] = None
        return list(unknown)

    def note_unknown_words(self, prompts: list[str]) -> None:
        """(Closed vocabularies) one `UnknownWordsWarning` naming the words of `prompts` the model does not know."""
        unknown = self.unknown_words(prompts)
        if unknown:
            warnings.warn(self._unknown_words_note(unknown), UnknownWordsWarning, stacklevel=3)

    def _unknown_words_note(self, unknown: list[str]) -> str:
        """One line: the unknown words (the first _NAMED_UNKNOWN, quoted and cut short) and the known ones."""
        named = ", ".join(_excerpt(w, 20) for w in unknown[:_NAMED_UNKNOWN])
        if len(unknown) > _NAMED_UNKNOWN:
            named += f" and {len(unknown) - _NAMED_UNKNOWN} more"
        known = self.known_words
        listed = ", ".join(known[:_LISTED_KNOWN]) + (f" and {len(known) - _LISTED_KNOWN} more"
                                                     if len(known) > _LISTED_KNOWN else "")
        return f"this model knows only {len(known)} words; not known: {named} (known: {listed})"

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


def _normalise(text: str) -> str:
    """Step 2 of the module docstring: NFC, whitespace runs -> one space, lowercase."""
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
    # Character by character, like `tokenizers`: str.lower() would turn a word-final "Σ" into "ς".
    return "".join(c.lower() for c in text)


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


def _alternatives(tokens) -> regex.Pattern:
    """A pattern that splits text around any of `tokens`, longest first (one that contains another wins)."""
    return regex.compile("(" + "|".join(regex.escape(t) for t in sorted(tokens, key=len, reverse=True)) + ")")


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

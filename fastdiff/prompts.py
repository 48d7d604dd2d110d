"""AUTOMATIC1111-style prompts: emphasis, prompts longer than CLIP's 75 tokens, and BREAK.

    ids, weights = tokenize_prompt(tokenizer, "a (red:1.3) [cat], BREAK oil painting")  # N chunks of 77
    hidden = text_encoder(torch.tensor(ids))                                            # (N, 77, D)
    hidden = weigh(hidden, torch.tensor(weights))                                       # (N, 77, D)
    cond = hidden.reshape(1, N * 77, D)                                                 # the chunks side by side

Ported from stable-diffusion-webui (modules/prompt_parser.py, modules/sd_hijack_clip.py, modules/sd_emphasis.py):

- Emphasis: "(text)" multiplies text's weight by 1.1, "[text]" by 1/1.1, "(text:1.3)" by 1.3; brackets nest and
  their factors multiply. "\\(", "\\)", "\\[", "\\]" and "\\\\" are the literal characters; any other backslash is
  dropped. Malformed emphasis never fails: a closing bracket with no open one is plain text, as is a ":" not
  followed by a number and ")"; brackets still open at the end apply to the rest of the prompt.
- Long prompts: the prompt's tokens go into chunks of 75, each encoded on its own as a 77-token prompt. When a
  chunk is full and its last comma is among its last `comma_backtrack` tokens, the words after that comma move on
  to the next chunk, so a phrase is not cut in two.
- "BREAK" (the word, in capitals) ends the current chunk.
- Weighting: the text encoder's output vectors are multiplied by their tokens' weights, then each chunk is
  rescaled to its original mean (webui's "Original" emphasis).

Not here: prompt editing "[a:b:0.5]" and alternation "[a|b]" (a scheduler's business: they must be resolved to
plain text before parsing, or their brackets read as emphasis), composable "AND"; textual-inversion embeddings
(the tokenizer's) and LoRA tags (`fastdiff.request.lora_tags`).
"""
import re

import torch
from torch import Tensor

from .models.tokenizer import CLIPTokenizer

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1
# The piece that stands for BREAK in parse_prompt_attention's output.
BREAK = ("BREAK", -1.0)

# One syntax token per match; where two alternatives start alike, the earlier one wins. webui accepts any run of
# digits and dots as a weight, then fails on one float() rejects ("1.2.3"); here such a run does not match as a
# weight, so ":1.2.3)" reads as text followed by a plain ")".
_ATTENTION = re.compile(r"""
      \\[()\[\]\\]                          # an escaped bracket or backslash: that character
    | \\                                    # any other backslash: dropped
    | [(\[]
    | :\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)   # ":1.3)" closes a round bracket with its own factor
    | [)\]]
    | [^\\()\[\]:]+                         # plain text
    | :
""", re.VERBOSE)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)
_COMMA = ",</w>"


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) pieces by its emphasis brackets (see the module docstring).

    Each BREAK, with the whitespace around it, becomes the piece ("BREAK", -1.0). Adjacent pieces of equal weight
    are merged; the empty prompt is [("", 1.0)]. Weights are the products of their brackets' factors, multiplied
    in the order the brackets close (then the unclosed round ones, outermost first, then the unclosed square
    ones), so they equal webui's to the last bit:

        >>> parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5)")
        [('a ', 1.0), ('house', 1.5730000000000004), (' ', 1.1), ('on', 1.0), (' a ', 1.1), ('hill', 0.55)]
    """
    pieces: list[list] = []  # [text, weight]; weights are scaled in place as brackets close
    open_round: list[int] = []  # for each unclosed bracket, the index of the first piece inside it
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(pieces))
        elif token == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            scale(open_round.pop(), float(weight))
        elif token == ")" and open_round:
            scale(open_round.pop(), ROUND_FACTOR)
        elif token == "]" and open_square:
            scale(open_square.pop(), SQUARE_FACTOR)
        else:
            for n, part in enumerate(_BREAK_WORD.split(token)):
                if n:
                    pieces.append(list(BREAK))
                pieces.append([part, 1.0])
    for start in open_round:
        scale(start, ROUND_FACTOR)
    for start in open_square:
        scale(start, SQUARE_FACTOR)

    merged: list[tuple[str, float]] = []
    for piece_text, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece_text, weight)
        else:
            merged.append((piece_text, weight))
    return merged or [("", 1.0)]


def tokenize_prompt(tokenizer: CLIPTokenizer, text: str,
                    comma_backtrack: int = 20) -> tuple[list[list[int]], list[list[float]]]:
    """A prompt's token ids and weights in chunks of tokenizer.max_length (77): ([N][77] ids, [N][77] weights).

    Each parsed piece is encoded with tokenizer.encode; its tokens get its weight. Chunks hold
    tokenizer.max_length - 2 (75) prompt tokens and are laid out as the tokenizer lays out a prompt,
    [bos, tokens..., eos, pad...], with weight 1.0 at bos, eos and pad, so a plain prompt of up to 75 tokens
    gives exactly tokenizer(text)[0]. When a chunk is full and its last comma is within `comma_backtrack` tokens
    of its end, the tokens after that comma start the next chunk (0 turns this off). BREAK ends a chunk (a
    BREAK at the start gives an empty one). The empty prompt is one chunk.
    """
    room = tokenizer.max_length - 2
    comma_id = tokenizer.vocab.get(_COMMA)
    chunk_ids: list[list[int]] = []
    chunk_weights: list[list[float]] = []
    ids: list[int] = []  # the chunk being filled, without bos and eos
    weights: list[float] = []
    last_comma = -1  # index in `ids` of its last comma; -1 for none

    def end_chunk() -> None:
        nonlocal ids, weights, last_comma
        padding = room - len(ids)
        chunk_ids.append([tokenizer.bos_id, *ids, tokenizer.eos_id] + [tokenizer.pad_id] * padding)
        chunk_weights.append([1.0, *weights, 1.0] + [1.0] * padding)
        ids, weights, last_comma = [], [], -1

    for piece, weight in parse_prompt_attention(text):
        if (piece, weight) == BREAK:
            end_chunk()
            continue
        for token in tokenizer.encode(piece):
            if token == comma_id:
                last_comma = len(ids)
            elif len(ids) == room and last_comma != -1 and room - last_comma <= comma_backtrack:
                tail = last_comma + 1
                moved_ids, moved_weights = ids[tail:], weights[tail:]
                ids, weights = ids[:tail], weights[:tail]
                end_chunk()
                ids, weights = moved_ids, moved_weights
            if len(ids) == room:
                end_chunk()
            ids.append(token)
            weights.append(weight)
    if ids or not chunk_ids:
        end_chunk()
    return chunk_ids, chunk_weights


def weigh(hidden: Tensor, weights: Tensor) -> Tensor:
    """Emphasis on the text encoder's output: hidden (N, T, D) for N chunks, weights (N, T) -> (N, T, D).

    Each chunk's vectors are multiplied by their tokens' weights, then the chunk is rescaled so that its mean over
    (T, D) is what it was before. The arithmetic is in float32 (float64 for float64 input) and the result is in
    hidden's dtype; chunks whose weights are all 1.0 come back bit for bit unchanged. No host synchronisation.
    """
    if hidden.dim() != 3 or weights.shape != hidden.shape[:2]:
        raise ValueError(f"weights must be (N, T) for hidden (N, T, D), got weights {tuple(weights.shape)} "
                         f"and hidden {tuple(hidden.shape)}")
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    weights = weights.to(device=hidden.device, dtype=dtype)
    original = hidden.to(dtype)
    weighted = original * weights[..., None]
    weighted = weighted * (original.mean(dim=(1, 2), keepdim=True) / weighted.mean(dim=(1, 2), keepdim=True))
    unweighted = (weights == 1).all(dim=1)[:, None, None]
    return torch.where(unweighted, hidden, weighted.to(hidden.dtype))

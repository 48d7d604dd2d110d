"""The default model's closed vocabulary: its tokenizer folder declares the caption words, and a prompt with any
other word gets one short note naming exactly those words. Open vocabularies (OpenAI CLIP's) never note."""
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import transformers

import fastdiff
from fastdiff.loading import CheckpointError, load_components
from fastdiff.models.tokenizer import KNOWN_WORDS_KEY, CLIPTokenizer, UnknownWordsWarning
from fastdiff.pipeline import default_model_path
from fastdiff.train.__main__ import main as train_main
from fastdiff.train.data import CAPTION_WORDS, sample_scenes
from fastdiff.train.export import caption_words_in_order
from fastdiff.train.vocab import declare_known_words, write_tokenizer

TOKENIZER = Path(default_model_path()) / "tokenizer"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def default():
    return CLIPTokenizer.from_pretrained(TOKENIZER)


def notes(tokenizer, prompts) -> list[str]:
    """The messages of the UnknownWordsWarnings one tokenizer call gives (every warning recorded, none filtered)."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        tokenizer(prompts)
    return [str(w.message) for w in record if issubclass(w.category, UnknownWordsWarning)]


def named_words(note: str) -> list[str]:
    """The quoted words of a note's 'not known:' part."""
    unknown = note.split("not known: ", 1)[1].split(" (known:", 1)[0]
    return re.findall(r"'([^']*)'", unknown)


def test_default_tokenizer_declares_the_caption_words_in_caption_order(default):
    config = json.loads((TOKENIZER / "tokenizer_config.json").read_text())
    assert config[KNOWN_WORDS_KEY] == caption_words_in_order()
    assert sorted(default.known_words) == sorted(CAPTION_WORDS) and len(CAPTION_WORDS) == 25
    assert default.known_words[:4] == ("a", "small", "large", "red")
    for word in default.known_words:
        assert len(default.encode(word)) == 1, word


def test_captions_of_the_grammar_give_no_note(default):
    captions = sorted({scene.caption for scene in sample_scenes(500, seed=3)})
    assert len(captions) > 100
    assert notes(default, captions) == []
    assert notes(default, ["", "a red circle on the left on a white background"]) == []
    # Case, punctuation, contractions and special tokens are not words the model is missing.
    assert notes(default, "A RED Circle, on the LEFT... (on a white background)!! <|endoftext|>") == []
    assert notes(default, ["the circle's at the top"]) == []


def test_unknown_words_are_named_once_in_one_line(default):
    got = notes(default, ["", "a purple elephant on the moon"])
    print(got[0] if got else got)
    assert len(got) == 1
    note = got[0]
    assert named_words(note) == ["elephant", "moon"]
    assert "\n" not in note and len(note) < 300
    assert note == ("this model knows only 25 words; not known: 'elephant', 'moon' (known: a, small, large, red, "
                    "green, blue, yellow, purple, orange, circle, square, triangle, on, the, left, right, at, top, "
                    "bottom, in, center, white, black, gray, background)")


def test_a_batch_gives_one_note_with_each_word_once(default):
    prompts = ["", "", "a purple Elephant", "a purple elephant", "an ELEPHANT on the moon, 20 circles"]
    got = notes(default, prompts)
    assert len(got) == 1
    assert named_words(got[0]) == ["elephant", "an", "moon", "20", "circles"]
    assert default.unknown_words(prompts) == ["elephant", "an", "moon", "20", "circles"]


def test_a_note_names_at_most_eight_words_and_cuts_long_ones(default):
    words = [f"word{chr(ord('a') + i)}" for i in range(12)]
    got = notes(default, "a red " + " ".join(words) + " " + "x" * 500)
    assert len(got) == 1
    print(got[0])
    assert named_words(got[0]) == words[:8] and "and 5 more (known:" in got[0]
    assert "\n" not in got[0] and len(got[0]) < 400
    got = notes(default, "y" * 500)
    assert "'yyyyyyyyyyyyyyyyyyyy...'" in got[0] and len(got[0]) < 300


def test_the_note_comes_with_the_truncation_warning_not_instead(default):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        default("moon " * 100)
    kinds = sorted(w.category.__name__ for w in record)
    assert kinds == ["UnknownWordsWarning", "UserWarning"]


def test_open_vocabularies_never_note():
    prompts = ["", "a purple elephant on the moon", "a photo of an astronaut riding a horse on mars, 8k"]
    for tokenizer in (CLIPTokenizer.default(), CLIPTokenizer.default(pad_token="!")):
        assert tokenizer.known_words is None and tokenizer.unknown_words(prompts) == []
        assert notes(tokenizer, prompts) == []
    # A diffusers folder without the key, as every published SD model has it.
    folder = Path(default_model_path()).parent / "clip"
    assert notes(CLIPTokenizer.from_pretrained(folder), prompts) == []


def test_transformers_loads_the_default_tokenizer_folder_with_the_same_ids(default):
    theirs = transformers.CLIPTokenizer.from_pretrained(TOKENIZER)
    prompts = ["a large blue triangle in the center on a gray background", "", "a purple elephant on the moon",
               "Unknown words, still tokens! 1234 <|endoftext|> café"]
    want = torch.tensor(theirs(prompts, padding="max_length", max_length=77).input_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownWordsWarning)
        got = default(prompts)
    assert torch.equal(got, want)
    assert got[0, 12].item() == default.eos_id  # <bos>, 11 caption words of one token each, <eos>


def test_generate_with_the_default_model_notes_once_per_call():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fastdiff.generate(["a purple elephant on the moon"] * 2, 1, negative_prompt="blurry", num_images=2, seed=0,
                          device="cpu", output_type="latent", progress=False)
        fastdiff.generate("a red circle on the left on a white background", 1, seed=0, device="cpu",
                          output_type="latent", progress=False)
    got = [str(w.message) for w in record if issubclass(w.category, UnknownWordsWarning)]
    assert len(got) == 1 and named_words(got[0]) == ["blurry", "elephant", "moon"]


def test_write_tokenizer_declares_its_words_and_reexport_reproduces_the_shipped_folder(tmp_path):
    write_tokenizer(tmp_path, CAPTION_WORDS)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())[KNOWN_WORDS_KEY] == list(CAPTION_WORDS)
    declare_known_words(tmp_path, caption_words_in_order())
    for name in TOKENIZER_FILES:
        assert (tmp_path / name).read_bytes() == (TOKENIZER / name).read_bytes(), name


def test_declare_known_words_keeps_the_settings_and_refuses_words_that_are_not_one_token(tmp_path):
    shutil.copytree(TOKENIZER, tmp_path / "tok")
    folder = tmp_path / "tok"
    declare_known_words(folder, ["red", "circle"])
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config[KNOWN_WORDS_KEY] == ["red", "circle"] and config["model_max_length"] == 77
    assert named_words(notes(CLIPTokenizer.from_pretrained(folder), "a red circle")[0]) == ["a"]
    with pytest.raises(ValueError, match="elephant"):
        declare_known_words(folder, ["red", "elephant"])
    with pytest.raises(ValueError, match="Red"):
        declare_known_words(folder, ["Red"])


@pytest.mark.parametrize("value,match", [('"red circle"', "list of words"), ('["red circle"]', "single words"),
                                         ('[3]', "single words"), ('{"red": 1}', "list of words")])
def test_a_malformed_declaration_is_a_checkpoint_error(tmp_path, value, match):
    folder = tmp_path / "model"
    shutil.copytree(default_model_path(), folder)
    config = folder / "tokenizer" / "tokenizer_config.json"
    config.write_text(config.read_text().replace(f'"{KNOWN_WORDS_KEY}": [', f'"{KNOWN_WORDS_KEY}": {value}, "x": ['))
    with pytest.raises(CheckpointError, match=match):
        load_components(folder)


def test_export_declares_the_caption_words_even_for_an_older_run(tmp_path):
    out = tmp_path / "run"
    assert train_main(["all", "--out", str(out), "--config", "tiny", "--quiet", "--vae-steps", "1",
                       "--unet-steps", "1", "--vae-batch", "1", "--unet-batch", "1", "--device", "cpu"]) == 0
    for name in TOKENIZER_FILES:  # the tiny recipe shares the caption words, hence the tokenizer
        assert (out / "model" / "tokenizer" / name).read_bytes() == (TOKENIZER / name).read_bytes(), name
    # A run whose tokenizer/ predates the declaration: the export adds it.
    config = out / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != KNOWN_WORDS_KEY}))
    assert train_main(["export", "--out", str(out)]) == 0
    assert (out / "model" / "tokenizer" / "tokenizer_config.json").read_bytes() == \
        (TOKENIZER / "tokenizer_config.json").read_bytes()
    assert load_components(out / "model").tokenizer.known_words == tuple(caption_words_in_order())

"""CLIP text encoder parity with transformers' CLIPTextModel, on tiny random configs."""
import json
import warnings

import pytest
import torch
import transformers

from fastdiff.models.clip import CLIPTextConfig, CLIPTextModel
from tiny_models import CLIP_CONFIGS as CONFIGS, clip_from_transformers as _ours, transformers_clip as _theirs

def _rel_err(ours, theirs, what):
    err = (ours - theirs).norm() / theirs.norm()
    print(f"{what}: rel err {err:.2e}, max abs err {(ours - theirs).abs().max():.2e}")
    return err


@pytest.mark.parametrize("hidden, layers, heads, intermediate, act", CONFIGS)
@pytest.mark.parametrize("tokens", [77, 13])
def test_final_hidden_states_match_transformers(hidden, layers, heads, intermediate, act, tokens):
    theirs = _theirs(hidden, layers, heads, intermediate, act)
    ours = _ours(theirs)
    ids = torch.randint(0, 1000, (2, tokens))
    with torch.no_grad():
        want = theirs(ids).last_hidden_state
        got = ours(ids)
    assert got.shape == (2, tokens, hidden)
    assert _rel_err(got, want, f"{act} T={tokens}") <= 1e-5


@pytest.mark.parametrize("hidden, layers, heads, intermediate, act", CONFIGS)
def test_clip_skip_matches_diffusers_rule(hidden, layers, heads, intermediate, act):
    theirs = _theirs(hidden, layers, heads, intermediate, act)
    ours = _ours(theirs)
    ids = torch.randint(0, 1000, (2, 77))
    with torch.no_grad():
        hidden_states = theirs(ids, output_hidden_states=True).hidden_states  # embeddings + one per layer
        for clip_skip in range(1, layers + 1):
            # diffusers' StableDiffusionPipeline.encode_prompt
            want = theirs.final_layer_norm(hidden_states[-(clip_skip + 1)])
            got = ours(ids, clip_skip=clip_skip)
            assert _rel_err(got, want, f"clip_skip={clip_skip}") <= 1e-5
        assert torch.equal(ours(ids, clip_skip=0), ours(ids))


def test_reference_runs_in_plain_pytorch_without_the_ops_seam(monkeypatch):
    # the fused q/k/v attention is the engine's (fastdiff.engine.engine.FastCLIPAttention, tested in
    # test_engine.py); the reference calls no fastdiff.ops
    from fastdiff import ops

    def refuse(*args, **kwargs):
        raise AssertionError("the reference text encoder called fastdiff.ops")

    for op in ops.OPS:
        monkeypatch.setattr(ops, op, refuse)
    theirs = _theirs(32, 2, 4, 64, "quick_gelu")
    ids = torch.randint(0, 1000, (2, 77))
    with torch.no_grad():
        assert _rel_err(_ours(theirs)(ids), theirs(ids).last_hidden_state, "no ops") <= 1e-5


def test_clip_skip_out_of_range_raises():
    ours = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2))
    with pytest.raises(ValueError, match=r"clip_skip must be in \[0, 2\].*got 3"):
        ours(torch.zeros(1, 77, dtype=torch.long), clip_skip=3)
    with pytest.raises(ValueError, match="at most 77 tokens, got shape"):
        ours(torch.zeros(1, 78, dtype=torch.long))


def test_state_dict_keys_are_transformers_keys_without_position_ids():
    theirs = _theirs(32, 2, 4, 64, "quick_gelu")
    ours = _ours(theirs)
    keys = set(ours.state_dict())
    # transformers 5 keeps the modules at the top level in memory; its files and every SD checkpoint
    # carry them under `text_model.`.
    assert keys == {"text_model." + k for k in theirs.state_dict()}
    assert "text_model.embeddings.token_embedding.weight" in keys
    assert "text_model.encoder.layers.1.self_attn.out_proj.bias" in keys
    assert not any("position_ids" in k for k in keys)


def test_loads_every_transformers_file_layout(tmp_path):
    theirs = _theirs(32, 2, 4, 64, "gelu")
    ids = torch.randint(0, 1000, (1, 77))
    want = theirs(ids).last_hidden_state.detach()
    flat = theirs.state_dict()
    prefixed = {"text_model." + k: v for k, v in flat.items()}
    # transformers < 4.31 saved the position_ids buffer (some files even as float): it must be ignored.
    legacy = {**prefixed, "text_model.embeddings.position_ids": torch.arange(77.0)[None]}
    # What transformers 5's save_pretrained writes: check it and accept it, whatever it is.
    theirs.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key transformers writes is known to fastdiff
        config = CLIPTextConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    for name, sd in (("flat", flat), ("prefixed", prefixed), ("legacy", legacy), ("save_pretrained", saved)):
        ours = CLIPTextModel(config)
        ours.load_state_dict(sd, strict=True)
        with torch.no_grad():
            assert _rel_err(ours(ids), want, name) <= 1e-5


def test_config_from_dict_reads_a_real_sd2_config_and_round_trips():
    sd2 = {  # stabilityai/stable-diffusion-2-1 text_encoder/config.json
        "_name_or_path": "hf-models/stable-diffusion-v2-768x768/text_encoder", "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "gelu",
        "hidden_size": 1024, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 4096,
        "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
        "num_attention_heads": 16, "num_hidden_layers": 23, "pad_token_id": 1, "projection_dim": 512,
        "torch_dtype": "float32", "transformers_version": "4.25.0.dev0", "vocab_size": 49408,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a published config must read without complaint
        config = CLIPTextConfig.from_dict(sd2)
    assert (config.hidden_size, config.num_hidden_layers, config.hidden_act) == (1024, 23, "gelu")
    assert CLIPTextConfig.from_dict(config.to_dict()) == config
    theirs = transformers.CLIPTextConfig(**config.to_dict())
    assert {k: getattr(theirs, k) for k in config.__dataclass_fields__} == config.__dict__


@pytest.mark.parametrize("change, message", [
    ({"hidden_act": "gelu_new"}, "hidden_act must be one of"),
    ({"model_type": "clip"}, r"model_type='clip' is not supported by fastdiff \(expected 'clip_text_model'\)"),
    ({"architectures": ["CLIPVisionModelWithProjection"]}, r"architectures=\['CLIPVisionModelWithProjection'\]"),
    ({"pruned_heads": {"0": [1]}}, "pruned_heads="),
    ({"hidden_size": 100}, "multiple of num_attention_heads"),
])
def test_config_from_dict_rejects_unsupported_settings(change, message):
    with pytest.raises(ValueError, match=message) as info:
        CLIPTextConfig.from_dict({**CLIPTextConfig().to_dict(), **change})
    print(info.value)


def test_config_from_dict_ignores_known_harmless_keys_silently():
    # transformers 4.x wrote PretrainedConfig's generation defaults into every config.json.
    d = {**CLIPTextConfig().to_dict(), "num_beams": 1, "temperature": 1.0, "torchscript": False,
         "pruned_heads": {}, "architectures": None, "_attn_implementation": "sdpa"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert CLIPTextConfig.from_dict(d) == CLIPTextConfig()


def test_config_from_dict_ignores_unknown_keys_with_one_warning_naming_them():
    d = {**CLIPTextConfig().to_dict(), "use_attention_mask": True, "a_setting_from_the_future": 1}
    with pytest.warns(UserWarning) as record:
        config = CLIPTextConfig.from_dict(d)
    print(record[0].message)
    assert len(record) == 1
    assert "'use_attention_mask', 'a_setting_from_the_future'" in str(record[0].message)
    assert config == CLIPTextConfig()


def test_config_from_dict_requires_every_field():
    d = CLIPTextConfig().to_dict()
    del d["num_hidden_layers"]
    with pytest.raises(ValueError, match="lacks.*num_hidden_layers"):
        CLIPTextConfig.from_dict(d)

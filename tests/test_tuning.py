"""fastdiff.tuning: the per-GPU tables of measured choices, how a call finds its row, and the committed tables."""
import json

import pytest
import torch

from fastdiff import tuning
from fastdiff.kernels.attention import MAX_ONCHIP_KEYS, AttentionConfig, candidate_configs


def _row(head_dim=40, seq_q=4096, seq_kv=4096, batch_heads=16, impl="sdpa", config=(128, 64, 4, 3), dtype="float16"):
    return {"head_dim": head_dim, "seq_q": seq_q, "seq_kv": seq_kv, "batch_heads": batch_heads, "dtype": dtype,
            "impl": impl, "config": list(config), "us": {}}


def _write(tmp_path, devices) -> "tuning.Path":
    path = tmp_path / "sm_90.json"
    path.write_text(json.dumps({"devices": devices}))
    tuning.read_tables.cache_clear()
    return path


def test_nearest_row_is_the_closest_in_log_sequence_and_batch_of_the_same_head_dim_dtype_and_key_path():
    rows = [_row(seq_q=4096, seq_kv=4096, batch_heads=16, impl="sdpa"),
            _row(seq_q=9216, seq_kv=9216, batch_heads=16, impl="fastdiff"),
            _row(seq_q=4096, seq_kv=4096, batch_heads=128, impl="fastdiff"),
            _row(seq_q=4096, seq_kv=77, batch_heads=16, impl="fastdiff", config=(64, 128, 4, 2)),
            _row(head_dim=80, seq_q=6144, seq_kv=6144),
            _row(seq_q=6144, seq_kv=6144, dtype="bfloat16")]

    def nearest(**call):
        return tuning.nearest_attention_row(rows, **{"head_dim": 40, "dtype": "float16", "batch_heads": 16,
                                                     "onchip_keys": MAX_ONCHIP_KEYS, **call})

    assert nearest(seq_q=5000, seq_kv=5000) is rows[0]
    assert nearest(seq_q=8192, seq_kv=8192) is rows[1]
    assert nearest(seq_q=4096, seq_kv=4096, batch_heads=64) is rows[2]
    assert nearest(seq_q=6144, seq_kv=77) is rows[3]  # the short-key path only
    assert nearest(seq_q=6144, seq_kv=6144, dtype="float32") is None
    assert tuning.nearest_attention_row(rows, 64, 4096, 4096, 16, "float16", MAX_ONCHIP_KEYS) is None


def test_a_gpu_takes_its_own_table_else_its_architectures_first(tmp_path, monkeypatch):
    path = _write(tmp_path, {"NVIDIA H200": {"attention": [_row(impl="fastdiff")]},
                             "NVIDIA H100 80GB HBM3": {"attention": [_row(impl="sdpa")]}})
    monkeypatch.setattr(tuning, "TABLES", tmp_path)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    for name, impl in [("NVIDIA H100 80GB HBM3", "sdpa"), ("NVIDIA H200", "fastdiff"), ("NVIDIA H20", "fastdiff")]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None, name=name: name)
        tuning.device_table.cache_clear()
        assert tuning.device_table(0)["attention"][0]["impl"] == impl
    assert path.name == tuning.table_path((9, 0)).name
    assert tuning.describe(0) == ("sm_90.json, the table of NVIDIA H200 (none for NVIDIA H20), measured on an "
                                  "unrecorded date with torch ?")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    tuning.device_table.cache_clear()
    assert tuning.device_table(0) is None  # no sm_80 file: the built-in rules
    assert tuning.describe(0).startswith("built-in rules (no sm_80.json in ")
    tuning.device_table.cache_clear()


def test_a_row_whose_config_does_not_suit_the_call_gives_the_calls_default_config(tmp_path, monkeypatch):
    _write(tmp_path, {"GPU": {"attention": [_row(seq_q=256, seq_kv=256, head_dim=160, config=(128, 128, 8, 3),
                                                impl="fastdiff")]}})
    monkeypatch.setattr(tuning, "TABLES", tmp_path)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "GPU")
    tuning.device_table.cache_clear()
    tuning._attention_choice.cache_clear()
    impl, config = tuning._attention_choice(0, torch.float16, 160, 256, 256, 16)
    tuning.device_table.cache_clear()
    tuning._attention_choice.cache_clear()
    assert impl == "fastdiff"
    assert config == candidate_configs(torch.float16, 256, 160)[0]  # 128-key blocks overflow at 160 columns


@pytest.mark.parametrize("content, message", [
    ("not json", "is not a tuning table file"),
    (json.dumps({"devices": {"GPU": {"attention": [{"head_dim": 40}]}}}), "attention row 0 is malformed"),
    (json.dumps({"devices": {"GPU": {"attention": [_row(impl="flash")]}}}), "impl 'flash'"),
])
def test_a_malformed_table_is_one_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "sm_90.json"
    path.write_text(content)
    tuning.read_tables.cache_clear()
    with pytest.raises(tuning.TuningError, match=message) as info:
        tuning.read_tables(path)
    assert str(path) in str(info.value)
    tuning.read_tables.cache_clear()


def test_no_table_on_the_cpu():
    q = torch.empty(2, 8, 64, 40)
    assert tuning.attention_choice(q, q) is None


def test_every_committed_row_names_a_candidate_config_of_its_call():
    files = sorted(tuning.TABLES.glob("sm_*.json"))
    if not files:
        pytest.skip(f"no tuning table in {tuning.TABLES}")
    for path in files:
        tables = tuning.read_tables(path)
        assert tables, f"{path} holds no table"
        for name, table in tables.items():
            assert table["measured"]["gpu"] == name and table["attention"]
            for row in table["attention"]:
                dtype = getattr(torch, row["dtype"])
                assert AttentionConfig(*row["config"]) in candidate_configs(dtype, row["seq_kv"], row["head_dim"]), row
    print(f"{len(files)} table files: {[p.name for p in files]}")


def _timed_row(head_dim: int, seq: int, sdpa: float, **configs: float) -> dict:
    """A self-attention row as tune.py measures it: SDPA's time and each config's (c64_64_4_3=... for "64,64,4,3")."""
    us = {"sdpa": sdpa, **{name.removeprefix("c").replace("_", ","): t for name, t in configs.items()}}
    return dict(head_dim=head_dim, seq_q=seq, seq_kv=seq, batch_heads=16, dtype="float16", us=us)


def test_choose_takes_the_kernel_only_past_its_margin_over_sdpa():
    close, clear = _timed_row(80, 1024, 10.2, c64_64_4_3=10.0), _timed_row(80, 2048, 13.0, c64_64_4_3=10.0)
    tuning.choose([close, clear])
    assert close["impl"] == "sdpa" and clear["impl"] == "fastdiff"
    assert close["config"] == clear["config"] == [64, 64, 4, 3]


def test_choose_picks_a_groups_config_from_the_rows_the_kernel_can_win():
    # the long row, which SDPA takes whatever the config, would pick 128 x 64 tiles: the short one decides
    short = _timed_row(160, 144, 12.0, c128_64_8_3=10.0, c64_64_4_3=7.0)
    long = _timed_row(160, 4096, 100.0, c128_64_8_3=120.0, c64_64_4_3=200.0)
    tuning.choose([short, long])
    assert short["config"] == long["config"] == [64, 64, 4, 3]
    assert (short["impl"], long["impl"]) == ("fastdiff", "sdpa")


def test_choose_keeps_a_config_an_earlier_group_of_the_head_dim_took_when_within_its_margin():
    first = _timed_row(64, 64, 20.0, c64_64_4_3=10.0)
    near = _timed_row(64, 256, 20.0, c128_64_8_3=10.0, c64_64_4_3=10.3)  # another candidate set: another group
    far = _timed_row(40, 64, 20.0, c64_64_4_3=10.0), _timed_row(40, 256, 20.0, c128_64_8_3=10.0, c64_64_4_3=12.0)
    tuning.choose([first, near, *far])
    assert near["config"] == [64, 64, 4, 3]
    assert far[1]["config"] == [128, 64, 8, 3]


def test_every_committed_table_holds_the_choices_its_timings_give():
    for path in sorted(tuning.TABLES.glob("sm_*.json")):
        for name, table in tuning.read_tables(path).items():
            rows, linears = table["attention"], table.get("linear", [])
            recorded = [(r["config"], r["impl"]) for r in rows], [r["impl"] for r in linears]
            tuning.choose(rows)
            tuning.choose_linears(linears)
            assert ([(r["config"], r["impl"]) for r in rows], [r["impl"] for r in linears]) == recorded, \
                f"{path.name}, {name}: run tune.py --rechoose"


def _linear_row(m=4096, k=320, n=2560, epilogue="geglu", dtype="float16", impl="triton"):
    return {"m": m, "k": k, "n": n, "epilogue": epilogue, "dtype": dtype, "impl": impl, "us": {}}


def test_nearest_linear_row_is_the_closest_in_log_rows_and_widths_of_the_same_epilogue_and_dtype():
    rows = [_linear_row(m=4096), _linear_row(m=18432, impl="cublas"), _linear_row(m=4096, k=640, n=5120),
            _linear_row(m=4096, epilogue="residual", n=320), _linear_row(m=9216, dtype="bfloat16")]
    assert tuning.nearest_linear_row(rows, 6000, 320, 2560, "geglu", "float16") is rows[0]
    assert tuning.nearest_linear_row(rows, 16384, 320, 2560, "geglu", "float16") is rows[1]
    assert tuning.nearest_linear_row(rows, 4096, 640, 5120, "geglu", "float16") is rows[2]
    assert tuning.nearest_linear_row(rows, 9216, 320, 2560, "residual", "float16") is rows[3]
    assert tuning.nearest_linear_row(rows, 4096, 320, 2560, "none", "float16") is None
    assert tuning.nearest_linear_row(rows, 4096, 320, 2560, "geglu", "float32") is None


def test_choose_linears_takes_the_faster_implementation():
    rows = [dict(_linear_row(), us={"triton": 10.0, "cublas": 12.0}),
            dict(_linear_row(m=512), us={"triton": 5.0, "cublas": 4.0})]
    tuning.choose_linears(rows)
    assert [r["impl"] for r in rows] == ["triton", "cublas"]


@pytest.mark.parametrize("row, message", [
    ({"m": 4096}, "linear row 0 is malformed"),
    (_linear_row(impl="flash"), "impl 'flash'"),
    (_linear_row(epilogue="gelu"), "epilogue 'gelu'"),
])
def test_a_malformed_linear_row_is_one_error_naming_the_file(tmp_path, row, message):
    path = _write(tmp_path, {"GPU": {"attention": [_row()], "linear": [row]}})
    with pytest.raises(tuning.TuningError, match=message) as info:
        tuning.read_tables(path)
    assert str(path) in str(info.value)
    tuning.read_tables.cache_clear()


def test_no_linear_choice_on_the_cpu():
    assert tuning.linear_choice(torch.empty(64, 320), torch.empty(2560, 320), "geglu") is None

"""Kernel and implementation choices per GPU, kept as data: the tables `benchmarks/tune.py` writes on a GPU.

    impl, config = tuning.attention_choice(q, k)   # for q (B, H, Sq, D), k (B, H, Skv, D) on a CUDA device:
                                                   # ("sdpa" | "fastdiff", the Triton kernel's AttentionConfig)

`fastdiff/assets/tuning/sm_<major><minor>.json` holds the tables of one GPU architecture, one per GPU model
(torch.cuda.get_device_name), each with the machine and versions it was measured on and its rows. A GPU the file
does not name takes the first table of its architecture; an architecture without a file, the CPU, and a dtype
no table was measured in take no table: `fastdiff.ops` then applies its built-in rules, and the Triton kernels
their default configs. Nothing is timed at run time: the first image of a shape launches what the table says.

An attention row is one measured call: {"head_dim", "seq_q", "seq_kv", "batch_heads" (B * H), "dtype",
"impl" (the faster of "sdpa" and "fastdiff"), "config" (the fastest of the Triton kernel's candidate configs),
"us" (each timing, for the reader)}. A call takes the row of its head dim, dtype and key path (at most
MAX_ONCHIP_KEYS keys, or more) nearest to it in log2 of Sq, Skv and B * H.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

TABLES = Path(__file__).resolve().parent / "assets" / "tuning"
ATTENTION_IMPLS = ("sdpa", "fastdiff")
_ROW_KEYS = ("head_dim", "seq_q", "seq_kv", "batch_heads", "dtype", "impl", "config")


class TuningError(ValueError):
    """A tuning table that cannot be read as one."""


def table_path(capability: tuple[int, int]) -> Path:
    return TABLES / f"sm_{capability[0]}{capability[1]}.json"


@functools.lru_cache(maxsize=None)
def read_tables(path: Path) -> dict[str, dict]:
    """GPU name -> its table, from one architecture's file (empty when there is no file), rows checked."""
    if not path.exists():
        return {}
    try:
        devices = json.loads(path.read_text())["devices"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TuningError(f"{path} is not a tuning table file ({e!r}); rewrite it with benchmarks/tune.py") from e
    for name, table in devices.items():
        for i, row in enumerate(table.get("attention", [])):
            missing = [k for k in _ROW_KEYS if k not in row]
            if missing or row["impl"] not in ATTENTION_IMPLS or len(row["config"]) != 4:
                raise TuningError(f"{path}: {name}'s attention row {i} is malformed (missing {missing}, impl "
                                  f"{row.get('impl')!r}, config {row.get('config')!r}); expected the keys "
                                  f"{_ROW_KEYS} with impl in {ATTENTION_IMPLS} and a 4-int config")
    return devices


def _taken_table(device_index: int) -> tuple[Path, Optional[str]]:
    """The CUDA device's architecture file, and the GPU model whose table in it the device takes: its own, else
    the file's first (None without a file)."""
    path = table_path(torch.cuda.get_device_capability(device_index))
    tables = read_tables(path)
    if not tables:
        return path, None
    name = torch.cuda.get_device_name(device_index)
    return path, name if name in tables else next(iter(tables))


@functools.lru_cache(maxsize=None)
def device_table(device_index: int) -> Optional[dict]:
    """The table of the CUDA device `device_index`: its own model's, else its architecture's first, else None."""
    path, taken = _taken_table(device_index)
    return None if taken is None else read_tables(path)[taken]


def describe(device_index: int) -> str:
    """Which table the CUDA device `device_index` takes, in one line (`fastdiff info`)."""
    path, taken = _taken_table(device_index)
    if taken is None:
        return f"built-in rules (no {path.name} in {TABLES})"
    name = torch.cuda.get_device_name(device_index)
    measured = read_tables(path)[taken].get("measured", {})
    return (f"{path.name}, the table of {taken}" + ("" if taken == name else f" (none for {name})")
            + f", measured {measured.get('date', 'on an unrecorded date')} with torch {measured.get('torch', '?')}")


def nearest_attention_row(rows: list[dict], head_dim: int, seq_q: int, seq_kv: int, batch_heads: int,
                          dtype: str, onchip_keys: int) -> Optional[dict]:
    """The row of this head dim, dtype and key path nearest to the call in log2 of Sq, Skv and B * H; None when
    no row has them."""
    short = seq_kv <= onchip_keys
    same = [r for r in rows if r["head_dim"] == head_dim and r["dtype"] == dtype and (r["seq_kv"] <= onchip_keys)
            == short]
    if not same:
        return None

    def distance(row: dict) -> float:
        return (abs(math.log2(row["seq_q"] / seq_q)) + abs(math.log2(row["seq_kv"] / seq_kv))
                + abs(math.log2(row["batch_heads"] / batch_heads)))

    return min(same, key=distance)


@functools.lru_cache(maxsize=4096)
def _attention_choice(device_index: int, dtype: torch.dtype, head_dim: int, seq_q: int, seq_kv: int,
                      batch_heads: int) -> Optional[tuple[str, tuple[int, int, int, int]]]:
    table = device_table(device_index)
    if table is None:
        return None
    from fastdiff.kernels.attention import MAX_ONCHIP_KEYS, AttentionConfig, candidate_configs

    row = nearest_attention_row(table.get("attention", []), head_dim, seq_q, seq_kv, batch_heads,
                                str(dtype).removeprefix("torch."), MAX_ONCHIP_KEYS)
    if row is None:
        return None
    config = AttentionConfig(*row["config"])
    if config not in candidate_configs(dtype, seq_kv, head_dim):  # the nearest row's shape took another path
        config = candidate_configs(dtype, seq_kv, head_dim)[0]
    return row["impl"], config


def attention_choice(q: Tensor, k: Tensor) -> Optional[tuple[str, tuple[int, int, int, int]]]:
    """(impl, config) the table gives attention over q (B, H, Sq, D) and k (B, H, Skv, D), or None (no table
    for the device, its dtype or head dim)."""
    if q.device.type != "cuda":
        return None
    batch, heads, seq_q, head_dim = q.shape
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    return _attention_choice(index, q.dtype, head_dim, seq_q, k.shape[2], batch * heads)

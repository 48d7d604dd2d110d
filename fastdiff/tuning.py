"""Kernel and implementation choices per GPU, kept as data: the tables `benchmarks/tune.py` writes on a GPU.

    impl, config = tuning.attention_choice(q, k)   # for q (B, H, Sq, D), k (B, H, Skv, D) on a CUDA device:
                                                   # ("sdpa" | "fastdiff", the Triton kernel's AttentionConfig)
    impl = tuning.linear_choice(x, weight, epilogue)  # "triton" | "cublas" for a linear with its epilogue

`fastdiff/assets/tuning/sm_<major><minor>.json` holds the tables of one GPU architecture, one per GPU model
(torch.cuda.get_device_name), each with the machine and versions it was measured on and its rows. A GPU the file
does not name takes the first table of its architecture; an architecture without a file, the CPU, and a dtype
no table was measured in take no table: `fastdiff.ops` then applies its built-in rules, and the Triton kernels
their default configs. Nothing is timed at run time: the first image of a shape launches what the table says.

An attention row is one measured call: {"head_dim", "seq_q", "seq_kv", "batch_heads" (B * H), "dtype",
"impl" (the faster of "sdpa" and "fastdiff"), "config" (the fastest of the Triton kernel's candidate configs),
"us" (each timing, for the reader)}. A call takes the row of its head dim, dtype and key path (at most
MAX_ONCHIP_KEYS keys, or more) nearest to it in log2 of Sq, Skv and B * H.

A linear row is one measured call of `fastdiff.kernels.linear` (a transformer's linear with its epilogue) against
cuBLAS and the epilogue as its own pass: {"m" (rows), "k", "n" (the weight's rows), "epilogue" (one of
LINEAR_EPILOGUES), "dtype", "impl" (the faster of LINEAR_IMPLS), "us"}. A call takes the row of its epilogue and
dtype nearest to it in log2 of m, k and n.
"""
from __future__ import annotations

import functools
import json
import math
import statistics
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

TABLES = Path(__file__).resolve().parent / "assets" / "tuning"
ATTENTION_IMPLS = ("sdpa", "fastdiff")
_ROW_KEYS = ("head_dim", "seq_q", "seq_kv", "batch_heads", "dtype", "impl", "config")
LINEAR_IMPLS = ("triton", "cublas")
LINEAR_EPILOGUES = ("geglu", "residual", "none")  # GEGLU's gate, a residual add, nothing
_LINEAR_ROW_KEYS = ("m", "k", "n", "epilogue", "dtype", "impl")


# The kernel takes a call only when it beats SDPA by this factor: SDPA compiles no Triton variant, so a site that a
# few percent put on the kernel at one shape and on SDPA at the next would cost a compile for nothing.
KERNEL_MARGIN = 1.05
# A config another group of this head dim took already is kept when it is within this factor of the group's best:
# its variant is compiled then, so a shape that moves a site between groups compiles nothing new.
CONFIG_MARGIN = 1.05


def choose(rows: list[dict]) -> None:
    """Give every measured attention row ("us" filled, in the order measured) its "config" and "impl": the rule
    `benchmarks/tune.py` writes the tables by.

    One config per head dim and set of candidates (a group): the one whose time is nearest each row's fastest
    (geometric mean of the ratios) over the group's contested rows, those where the kernel's best beats SDPA by
    KERNEL_MARGIN (all rows when none does: a row SDPA takes whatever the config must not pick it); or, within
    CONFIG_MARGIN of that one, a config an earlier group of the head dim took. Then per row, that config's time
    against SDPA's, with KERNEL_MARGIN, picks the implementation."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:  # rows with the same candidates (on chip, their key block follows the key count)
        groups.setdefault((row["head_dim"], tuple(k for k in row["us"] if k != "sdpa")), []).append(row)
    taken: dict[int, set[str]] = {}
    for (head_dim, configs), group in groups.items():
        contested = [r for r in group if KERNEL_MARGIN * min(r["us"][c] for c in configs) <= r["us"]["sdpa"]]

        def slowdown(config: str) -> float:
            ratios = [r["us"][config] / min(r["us"][c] for c in configs) for r in contested or group]
            return statistics.geometric_mean(ratios)

        config = min(configs, key=slowdown)
        kept = [c for c in configs if c in taken.get(head_dim, ()) and slowdown(c) <= CONFIG_MARGIN * slowdown(config)]
        config = min(kept, key=slowdown) if kept else config
        taken.setdefault(head_dim, set()).add(config)
        for row in group:
            row["config"] = [int(x) for x in config.split(",")]
            row["impl"] = "fastdiff" if KERNEL_MARGIN * row["us"][config] <= row["us"]["sdpa"] else "sdpa"


def choose_linears(rows: list[dict]) -> None:
    """Give every measured linear row its "impl": the faster of the Triton kernel and cuBLAS + the epilogue pass."""
    for row in rows:
        row["impl"] = "triton" if row["us"]["triton"] < row["us"]["cublas"] else "cublas"


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
        for i, row in enumerate(table.get("linear", [])):
            missing = [k for k in _LINEAR_ROW_KEYS if k not in row]
            if missing or row["impl"] not in LINEAR_IMPLS or row["epilogue"] not in LINEAR_EPILOGUES:
                raise TuningError(f"{path}: {name}'s linear row {i} is malformed (missing {missing}, impl "
                                  f"{row.get('impl')!r}, epilogue {row.get('epilogue')!r}); expected the keys "
                                  f"{_LINEAR_ROW_KEYS} with impl in {LINEAR_IMPLS} and epilogue in {LINEAR_EPILOGUES}")
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
    return _nearest(same, dict(seq_q=seq_q, seq_kv=seq_kv, batch_heads=batch_heads))


def _nearest(rows: list[dict], sizes: dict[str, int]) -> Optional[dict]:
    """The row nearest to a call's sizes, summing |log2(row size / call size)| over them; None without rows."""
    if not rows:
        return None
    return min(rows, key=lambda row: sum(abs(math.log2(row[key] / size)) for key, size in sizes.items()))


def _device_index(t: Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


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
    return _attention_choice(_device_index(q), q.dtype, head_dim, seq_q, k.shape[2], batch * heads)


def nearest_linear_row(rows: list[dict], m: int, k: int, n: int, epilogue: str, dtype: str) -> Optional[dict]:
    """The row of this epilogue and dtype nearest to the call in log2 of m, k and n; None when no row has them."""
    same = [r for r in rows if r["epilogue"] == epilogue and r["dtype"] == dtype]
    return _nearest(same, dict(m=m, k=k, n=n))


@functools.lru_cache(maxsize=4096)
def _linear_choice(device_index: int, dtype: torch.dtype, m: int, k: int, n: int, epilogue: str) -> Optional[str]:
    table = device_table(device_index)
    if table is None:
        return None
    row = nearest_linear_row(table.get("linear", []), m, k, n, epilogue, str(dtype).removeprefix("torch."))
    return None if row is None else row["impl"]


def linear_choice(x: Tensor, weight: Tensor, epilogue: str) -> Optional[str]:
    """The implementation ("triton" or "cublas") the table gives a linear of x (..., K) and weight (N', K) ending
    in `epilogue` (one of LINEAR_EPILOGUES), or None (no table for the device, no linear rows for its dtype or
    epilogue)."""
    if x.device.type != "cuda" or x.numel() == 0:
        return None
    k = x.shape[-1]
    return _linear_choice(_device_index(x), x.dtype, x.numel() // k, k, weight.shape[0], epilogue)

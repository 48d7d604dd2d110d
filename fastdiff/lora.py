"""LoRAs merged into a pipeline's weights in place, so that loading, reweighting, switching and unloading them never
captures a CUDA graph or compiles a kernel again.

The fast path's graphs and kernels read the models' weights where they lie (the fused projections are views of one
storage), so a weight rewritten in place is seen by every graph that reads it. For each layer some LoRA touches,

    W = W0 + sum_i  weight_i * scale_i * up_i @ down_i

is computed in float32 from W0, a copy of the loaded weight kept while any LoRA touches the layer, and written into
W (in W's dtype and memory layout). Unloading writes W0 back: the base weights return bit for bit.

    loras = LoraMerger({"unet": unet, "text_encoder": text_encoder})
    loras.add("style", read_lora(path, models), weight=0.8)
    loras.set_weights({"style": 0.0})
    loras.clear()
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from fastdiff.loading.lora import LoraLayer


class LoraMerger:
    """The LoRAs merged into `models` ({"unet": ..., "text_encoder": ..., "text_encoder_2": ... (SDXL)}, the modules
    LoraLayer targets name)."""

    def __init__(self, models: Mapping[str, nn.Module]):
        self.models = dict(models)
        self.weights: dict[str, float] = {}  # name -> weight, in load order
        self._factors: dict[str, dict[str, tuple[Tensor, Tensor, float]]] = {}  # name -> target -> (up, down, scale)
        self._base: dict[str, Tensor] = {}  # target -> its weight as loaded, while a LoRA touches it

    def add(self, name: str, layers: Mapping[str, LoraLayer], weight: float = 1.0) -> None:
        """Merge the LoRA `layers` (`fastdiff.loading.lora.read_lora`) at `weight` under `name`."""
        if name in self.weights:
            raise ValueError(f"a LoRA named {name!r} is already loaded; change its weight with set_lora_weights, or "
                             f"load the file under another name")
        weight = _check_weight(name, weight)
        factors = {}
        for target, layer in layers.items():
            param = self._weight(target)
            factors[target] = (layer.up.flatten(1).to(param.device, torch.float32),
                               layer.down.flatten(1).to(param.device, torch.float32), layer.scale)
        self._factors[name] = factors
        self.weights[name] = weight
        self._merge(factors)

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """New weights for loaded LoRAs (0 turns one off; it stays loaded); the others keep theirs."""
        unknown = [name for name in weights if name not in self.weights]
        if unknown:
            raise ValueError(f"no LoRA named {', '.join(map(repr, unknown))} is loaded; loaded: "
                             f"{', '.join(map(repr, self.weights)) or 'none'}")
        checked = {name: _check_weight(name, w) for name, w in weights.items()}
        changed = [name for name, w in checked.items() if w != self.weights[name]]
        self.weights.update(checked)
        self._merge(t for name in changed for t in self._factors[name])

    def clear(self) -> None:
        """Unload every LoRA: the base weights written back, bit for bit."""
        with torch.no_grad():
            for target, base in self._base.items():
                self._weight(target).copy_(base)
        self._base.clear()
        self._factors.clear()
        self.weights.clear()

    @torch.no_grad()
    def _merge(self, targets: Iterable[str]) -> None:
        """Write W0 + the weighted sum of the loaded LoRAs' products into each of `targets`' weights."""
        for target in dict.fromkeys(targets):
            param = self._weight(target)
            base = self._base.get(target)
            if base is None:
                base = self._base[target] = param.detach().clone()
            terms = [(factors[target], self.weights[name]) for name, factors in self._factors.items()
                     if target in factors and self.weights[name] != 0.0]
            if not terms:
                param.copy_(base)
                continue
            merged = base.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
            rows = merged.view(merged.shape[0], -1)
            for (up, down, scale), weight in terms:
                rows.addmm_(up, down, alpha=weight * scale)
            param.copy_(merged)

    def _weight(self, target: str) -> nn.Parameter:
        model, _, path = target.partition(".")
        return self.models[model].get_submodule(path).weight


def _check_weight(name: str, weight: float) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ValueError(f"LoRA {name!r}: weight must be a finite number, got {weight!r}")
    return float(weight)

"""LoRA adapters in PEFT's format (adapter_config.json + adapter_model.safetensors) or as
llama.cpp's LoRA GGUF (service/models/lora_gguf.py), read into the fused projections our
Llama-family layers run (qkv, o, gate_up, down). Readers yield per (layer, module) A, B and
scaling; checking and fusing is shared.

PEFT adds `B(A(x)) * scaling` to a target module's output. q/k/v (and gate/up) are one matmul
here, so their adapters are laid side by side: A's ranks stacked, B block-diagonal, each part's
rank padded to the server's --max-lora-rank. The scaling (alpha / r, or alpha / sqrt(r) with
rsLoRA; per module with rank_pattern / alpha_pattern) is folded into B once, at load.
Everything PEFT could express that this does not compute exactly is refused, naming it."""
from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels import cpu_native
from kernels.lora import LoRAPlan, lora_add_
from service.models.lora_adapter import AdapterLoadError, AdapterModule, BaseShapes

PROJECTIONS = ("qkv", "o", "gate_up", "down")
# PEFT's module name -> (our fused projection, which part of it).
MODULE_PARTS = {"q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2), "o_proj": ("o", 0),
                "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1), "down_proj": ("down", 0)}
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(slots=True)
class LoRAWeights:
    """One adapter, fused and padded: per layer and projection (A^T [in, parts * R],
    B^T scaled [parts * R, out]), or None where the adapter leaves a projection alone."""
    name: str
    path: Path
    rank: int                   # the largest rank among its modules
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor] | None]]

    @property
    def num_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                   for layer in self.layers for ab in layer.values() if ab is not None for a, b in [ab])


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern: a key matches a module name by its dotted suffix."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(?:.*\.)?{key}", module):
            return value
    return default


def read_config(path: Path) -> dict:
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise AdapterLoadError(f"{path}: not a PEFT adapter directory (no {CONFIG_FILE})")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterLoadError(f"{cfg_file}: not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise AdapterLoadError(f"{cfg_file}: must hold a JSON object")
    kind = cfg.get("peft_type", "LORA")
    if kind != "LORA":
        raise AdapterLoadError(f"{cfg_file}: peft_type {kind!r} is not supported (only LORA)")
    for key, why in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out weights"),
                     ("modules_to_save", "modules_to_save (fully trained copies of base modules)"),
                     ("trainable_token_indices", "trainable tokens"), ("lora_bias", "LoRA biases")):
        if cfg.get(key):
            raise AdapterLoadError(f"{cfg_file}: {key}: {why} not supported")
    if cfg.get("bias", "none") != "none":
        raise AdapterLoadError(f"{cfg_file}: bias {cfg['bias']!r}: trained biases are not supported")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]   # a regex in PEFT; the weights file says which modules it matched
    for t in targets:
        if re.fullmatch(r"\w+", t) and t not in MODULE_PARTS:
            raise AdapterLoadError(f"{cfg_file}: target_modules: {t!r} is not supported (supported: "
                                   f"{', '.join(MODULE_PARTS)})")
    return cfg


def read_peft(path: Path) -> tuple[Path, list[AdapterModule]]:
    """A PEFT directory's modules; returns the weights file (errors name it) and the modules."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg = read_config(path)
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        raise AdapterLoadError(f"{path}: no {WEIGHTS_FILE} (adapters saved as .bin are not read: re-save with "
                               "safe_serialization)")
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterLoadError(f"{weights_file}: cannot be read: {exc}") from None
    r0, alpha0 = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.search(key)
        if m is None or m.group(2) not in MODULE_PARTS:
            raise AdapterLoadError(f"{weights_file}: {key}: only q/k/v/o/gate/up/down projections of decoder layers "
                                   "can be adapted")
        found.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = t
    modules = []
    for (layer, module), ab in sorted(found.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterLoadError(f"{weights_file}: layers.{layer}.{module}: needs both lora_A and lora_B")
        full = f"model.layers.{layer}.{'self_attn' if MODULE_PARTS[module][0] in ('qkv', 'o') else 'mlp'}.{module}"
        r = int(_pattern_value(cfg.get("rank_pattern"), full, r0))
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), full, alpha0))
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        modules.append(AdapterModule(layer, module, ab["A"], ab["B"], scaling))
    return weights_file, modules


def load_lora(name: str, path: str | Path, shapes: BaseShapes, max_rank: int,
              dtype: torch.dtype = torch.float32) -> LoRAWeights:
    """Read (a PEFT directory, or a llama.cpp LoRA GGUF file), check and fuse an adapter.
    Raises AdapterLoadError naming what is wrong."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ".gguf" or path.is_file():
        from service.models.lora_gguf import read_gguf

        source, modules = path, read_gguf(path, shapes)
    else:
        source, modules = read_peft(path)
    return fuse(name, path, source, modules, shapes, max_rank, dtype)


def fuse(name: str, path: Path, source: Path, modules: list[AdapterModule], shapes: BaseShapes, max_rank: int,
         dtype: torch.dtype) -> LoRAWeights:
    """Check read modules against the base model and lay them out as our fused projections."""
    if not modules:
        raise AdapterLoadError(f"{source}: holds no LoRA weights")
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor] | None]] = [
        dict.fromkeys(PROJECTIONS) for _ in range(shapes.num_layers)]
    parts: dict[tuple[int, str], list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    top = 0
    for mod in modules:
        where = f"{source}: layers.{mod.layer}.{mod.module}"
        if mod.layer >= shapes.num_layers:
            raise AdapterLoadError(f"{where}: the base model has {shapes.num_layers} layers")
        a, b = mod.a.float(), mod.b.float()
        proj, part = MODULE_PARTS[mod.module]
        fan_in, outs = shapes.parts(proj)
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != fan_in or b.shape != (outs[part], rank):
            raise AdapterLoadError(f"{where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base "
                                   f"model ({outs[part]} x {fan_in}): an adapter for another model?")
        if rank > max_rank:
            raise AdapterLoadError(f"{where}: rank {rank} is over --max-lora-rank {max_rank}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterLoadError(f"{where}: holds NaN or infinite values")
        parts.setdefault((mod.layer, proj), []).append((part, a, b * mod.scaling))
        top = max(top, rank)
    for (layer, proj), found in parts.items():
        fan_in, outs = shapes.parts(proj)
        a_t = torch.zeros(fan_in, len(outs) * max_rank, dtype=dtype)
        b_t = torch.zeros(len(outs) * max_rank, sum(outs), dtype=dtype)
        for part, a, b in found:
            rank, row = a.shape[0], part * max_rank
            col = sum(outs[:part])
            a_t[:, row:row + rank] = a.t()
            b_t[row:row + rank, col:col + outs[part]] = b.t()
        layers[layer][proj] = (a_t, b_t)
    return LoRAWeights(name, path, top, layers)


class LoRAStacks:
    """The resident adapters of one model: per layer and projection, every slot's A^T and B^T
    stacked ([slots, in, parts * R] and [slots, parts * R, out]), so that one batched matmul
    serves every adapter of a step. A slot's projections an adapter leaves alone hold zeros."""

    def __init__(self, shapes: BaseShapes, num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.shapes, self.num_slots, self.max_rank = shapes, num_slots, max_rank
        # Where each part of a fused projection starts in its output (the native op reads only
        # B's diagonal blocks, kernels/csrc/cpu_lora.c), as int64 for the C call.
        self.part_cols = {proj: torch.tensor([0, *itertools.accumulate(shapes.parts(proj)[1])], dtype=torch.long)
                          for proj in PROJECTIONS}
        self.stacks: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        for _ in range(shapes.num_layers):
            layer = {}
            for proj in PROJECTIONS:
                fan_in, outs = shapes.parts(proj)
                r = len(outs) * max_rank
                layer[proj] = (torch.zeros(num_slots, fan_in, r, dtype=dtype, device=device),
                               torch.zeros(num_slots, r, sum(outs), dtype=dtype, device=device))
            self.stacks.append(layer)

    def write(self, slot: int, weights: LoRAWeights) -> None:
        for layer, own in zip(self.stacks, weights.layers):
            for proj, (a_stack, b_stack) in layer.items():
                ab = own[proj]
                if ab is None:
                    a_stack[slot].zero_()
                    b_stack[slot].zero_()
                else:
                    a_stack[slot].copy_(ab[0])
                    b_stack[slot].copy_(ab[1])


@dataclass(slots=True)
class LoRAStep:
    """What a forward pass needs to add the adapters of one step: the stacks and the plan."""
    stacks: LoRAStacks
    plan: LoRAPlan

    def add_(self, out: torch.Tensor, x: torch.Tensor, layer: int, proj: str) -> None:
        a_stack, b_stack = self.stacks.stacks[layer][proj]
        if cpu_native.usable(out, x, a_stack, b_stack) and out.is_contiguous() and x.is_contiguous():
            # On CPU one C call (the native loop's op) instead of ~5 torch ops a projection; each
            # token's sum is the same whatever the batch, as with the loop's decode steps.
            cpu_native.lora_add(out, x, a_stack, b_stack, self.stacks.max_rank, self.stacks.part_cols[proj],
                                self.plan.token_slots, self.stacks.num_slots)
            return
        lora_add_(out, x, a_stack, b_stack, self.plan)

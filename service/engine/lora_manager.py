"""Which LoRA adapters a model serves and which of them sit in the batch's stacks.

Registered adapters (`--lora NAME=PATH`, LoadAdapter) keep their weights in host memory; at
most `--max-loras` of them are *resident*: copied into a slot of the stacks the forward pass
multiplies (service/models/lora.py). The scheduler pins a slot for each running request and
unpins it when the request finishes or is preempted; a waiting request whose adapter is not
resident takes a free slot, or evicts the least recently used adapter that no running request
pins, or waits its turn (vLLM's max_loras rule). Unloading drops the name at once (new requests
get NOT_FOUND), and the weights once the requests that already hold the adapter are done.

Each load gets a fresh uid: the prefix cache keys blocks by it, so KV computed under an adapter
is never reused by another adapter, by the base model, or by a reloaded adapter of the same name.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from common.errors import InvalidArgumentError
from service.models.lora import LoRAStacks, LoRAWeights


@dataclass(slots=True)
class AdapterRef:
    """What a request holds: the adapter it runs with, by name and by load."""
    name: str
    uid: int


@dataclass(slots=True)
class AdapterInfo:
    name: str
    path: str
    rank: int
    uid: int
    load_s: float          # reading and checking the files
    resident: bool


@dataclass(slots=True)
class _Adapter:
    weights: LoRAWeights
    uid: int
    load_s: float
    slot: int | None = None
    holders: int = 0       # requests added with it and not yet finished
    running: int = 0       # of those, admitted and pinning its slot
    last_used: int = 0
    unloaded: bool = False


class LoRAManager:
    def __init__(self, stacks: LoRAStacks) -> None:
        self.stacks = stacks
        self._by_name: dict[str, _Adapter] = {}
        self._by_uid: dict[int, _Adapter] = {}
        self._slots: list[int | None] = [None] * stacks.num_slots   # slot -> uid
        self._uids = itertools.count(1)
        self._clock = itertools.count(1)

    # ---- registry (engine thread) ---------------------------------------------------------

    def register(self, weights: LoRAWeights, load_s: float = 0.0) -> AdapterInfo:
        """Serve `weights` under its name (a name already served is replaced for new requests;
        running ones finish on the old weights)."""
        if weights.name in self._by_name:
            self.unregister(weights.name)
        a = _Adapter(weights, next(self._uids), load_s)
        self._by_name[weights.name] = a
        self._by_uid[a.uid] = a
        return self._info(a)

    def unregister(self, name: str) -> bool:
        a = self._by_name.pop(name, None)
        if a is None:
            return False
        a.unloaded = True
        self._drop_if_unused(a)
        return True

    def infos(self) -> list[AdapterInfo]:
        return [self._info(a) for a in self._by_name.values()]

    def _info(self, a: _Adapter) -> AdapterInfo:
        return AdapterInfo(a.weights.name, str(a.weights.path), a.weights.rank, a.uid, a.load_s, a.slot is not None)

    # ---- requests (engine thread) ---------------------------------------------------------

    def hold(self, name: str) -> AdapterRef:
        a = self._by_name.get(name)
        if a is None:
            raise InvalidArgumentError("model", f"no LoRA adapter {name!r} is loaded")
        a.holders += 1
        return AdapterRef(name, a.uid)

    def release(self, ref: AdapterRef) -> None:
        a = self._by_uid[ref.uid]
        a.holders -= 1
        self._drop_if_unused(a)

    def pin(self, ref: AdapterRef) -> int | None:
        """The slot of a request about to run (loading the adapter into one if needed), or None
        when every slot is pinned by running requests of other adapters."""
        a = self._by_uid[ref.uid]
        if a.slot is None:
            slot = self._free_slot()
            if slot is None:
                return None
            self.stacks.write(slot, a.weights)
            self._slots[slot], a.slot = a.uid, slot
        a.running += 1
        a.last_used = next(self._clock)
        return a.slot

    def unpin(self, ref: AdapterRef) -> None:
        a = self._by_uid[ref.uid]
        a.running -= 1

    def _free_slot(self) -> int | None:
        for slot, uid in enumerate(self._slots):
            if uid is None:
                return slot
        idle = [self._by_uid[uid] for uid in self._slots if uid is not None and self._by_uid[uid].running == 0]
        if not idle:
            return None
        victim = min(idle, key=lambda a: a.last_used)
        slot = victim.slot
        assert slot is not None
        victim.slot, self._slots[slot] = None, None
        return slot

    def _drop_if_unused(self, a: _Adapter) -> None:
        if a.unloaded and a.holders == 0:
            if a.slot is not None:
                self._slots[a.slot] = None
            del self._by_uid[a.uid]

    @property
    def num_resident(self) -> int:
        return sum(uid is not None for uid in self._slots)

    def is_idle(self) -> bool:
        """Nothing holds any adapter (tests check this with the KV pool)."""
        return all(a.holders == 0 and a.running == 0 for a in self._by_uid.values())


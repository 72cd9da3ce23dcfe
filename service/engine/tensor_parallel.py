"""Tensor parallelism's process group: rendezvous, the local worker processes, and the one
message a step sends.

The driver (rank 0: the process with the scheduler, the guides and the API) holds a shard like
every other rank. Each step it broadcasts a header and one int64 tensor with the step's token
ids, positions, slot mapping, block tables and rows to sample; every rank runs its shard of the
forward pass (the layers all-reduce their partial sums), and rank 0 gathers the vocabulary
shares of the logits. Nothing else crosses: requests, guides and sampling never leave rank 0.

The transport is `torch.distributed` (gloo on CPU, NCCL on CUDA) with its usual TCP rendezvous
(MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK as `torchrun` sets them). Without RANK in the
environment the driver starts ranks 1..N-1 itself on this machine (`python -m
service.engine.tp_worker`). A lost rank surfaces as a failed collective (gloo reports a closed
connection at once); the group is then broken for good and every call raises UnavailableError.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from common import env
from common.net import free_port
from common.errors import ModelLoadError, UnavailableError
from service.config import EngineConfig

log = logging.getLogger("weft.engine")

OP_STEP, OP_HEARTBEAT, OP_STOP = 1, 2, 3
HEADER_LEN = 8
# A rank waits for the next step as long as the driver is idle: the group's own timeout only
# ends waits nothing else ends (a peer that hangs without closing its connection).
GROUP_TIMEOUT = timedelta(hours=24)
HEARTBEAT_TIMEOUT = timedelta(seconds=10)
STOP_TIMEOUT = timedelta(seconds=10)
RENDEZVOUS_TIMEOUT_S = 300.0   # for ranks on other hosts to be started


@dataclass(slots=True)
class Rendezvous:
    addr: str
    port: int
    world: int
    rank: int

    local_rank: int = 0

    @classmethod
    def from_env(cls, world: int) -> Rendezvous | None:
        """The torchrun-style environment, if RANK is set (checked against --tensor-parallel-size)."""
        found = env.rendezvous()
        if found is None:
            return None
        env_world = int(found.get("WORLD_SIZE", world))
        if env_world != world:
            raise ValueError(f"WORLD_SIZE={env_world} but --tensor-parallel-size is {world}")
        rank = int(found["RANK"])
        return cls(found.get("MASTER_ADDR", "127.0.0.1"), int(found.get("MASTER_PORT", "29500")), world, rank,
                   int(found.get("LOCAL_RANK", rank)))


@dataclass(slots=True)
class CommStats:
    """What the collectives cost so far (bench/tp.py reads it per step)."""
    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0


class TPGroup:
    """One rank's handle on the group: the collectives the model and the runner use."""

    def __init__(self, rdv: Rendezvous, backend: str = "gloo") -> None:
        # Our own handle on the rendezvous store (rank 0 hosts it) outlives the group, so that
        # teardown can be ordered: see close().
        self.store = dist.TCPStore(rdv.addr, rdv.port, rdv.world, is_master=rdv.rank == 0,
                                   timeout=timedelta(seconds=RENDEZVOUS_TIMEOUT_S), wait_for_workers=False)
        dist.init_process_group(backend, store=self.store, rank=rdv.rank, world_size=rdv.world, timeout=GROUP_TIMEOUT)
        self.rank = rdv.rank
        self.world = rdv.world
        self.broken: str | None = None
        self.stats = CommStats()
        self.workers: list[subprocess.Popen] = []   # the local ranks this driver started
        self.threads_before: int | None = None       # the driver's thread count before it took its share

    # ---- what every rank calls inside a forward pass --------------------------------------------

    def all_reduce_(self, t: torch.Tensor) -> None:
        self._call(dist.all_reduce, t, nbytes=t.numel() * t.element_size())

    def gather_logits(self, shard: torch.Tensor, vocab: int) -> torch.Tensor | None:
        """Rank 0: the whole [rows, vocab] logits from every rank's vocabulary share; others: None."""
        nbytes = shard.numel() * shard.element_size()
        if self.rank:
            self._call(dist.gather, shard.contiguous(), None, 0, nbytes=nbytes)
            return None
        parts = [torch.empty_like(shard) for _ in range(self.world)]
        self._call(dist.gather, shard.contiguous(), parts, 0, nbytes=nbytes * self.world)
        return torch.cat(parts, dim=-1)[:, :vocab]

    # ---- the driver's side ---------------------------------------------------------------------

    def send_step(self, dims: list[int], packed: torch.Tensor) -> None:
        header = torch.tensor([OP_STEP, packed.numel(), *dims] + [0] * (HEADER_LEN - 2 - len(dims)), dtype=torch.long)
        self._call(dist.broadcast, header, 0, nbytes=header.numel() * 8)
        self._call(dist.broadcast, packed, 0, nbytes=packed.numel() * 8)

    def send_ints(self, values: list[int]) -> None:
        self._call(dist.broadcast, torch.tensor(values, dtype=torch.long), 0, nbytes=8 * len(values))

    def heartbeat(self) -> None:
        """An idle driver's check that every rank is still there (a lost one breaks the group)."""
        if self.broken:
            raise UnavailableError(self.broken)
        header = torch.zeros(HEADER_LEN, dtype=torch.long)
        header[0] = OP_HEARTBEAT
        try:
            dist.broadcast(header, 0)
            ping = torch.ones(1)
            work = dist.all_reduce(ping, async_op=True)
            work.wait(HEARTBEAT_TIMEOUT)
        except RuntimeError as exc:
            self._break(exc)
        for p in self.workers:
            if p.poll() is not None:
                self._break(RuntimeError(f"local rank process {p.pid} exited with {p.returncode}"))

    def gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every rank's `values` (the same length everywhere), on rank 0 (others get [])."""
        t = torch.tensor(values, dtype=torch.long)
        parts = [torch.empty_like(t) for _ in range(self.world)] if self.rank == 0 else None
        self._call(dist.gather, t, parts, 0, nbytes=t.numel() * 8)
        return [p.tolist() for p in parts] if parts else []

    def close(self) -> None:
        """Stop the ranks (the driver), tear the group down.

        Order matters: the driver hosts the store, and a rank whose peer vanishes mid-teardown
        may abort ("terminate called"). So each rank tears its group down first and then says so
        in the store; the driver waits for that before it tears its own down."""
        if self.rank == 0:
            if not self.broken:
                try:
                    header = torch.zeros(HEADER_LEN, dtype=torch.long)
                    header[0] = OP_STOP
                    dist.broadcast(header, 0)
                    self.store.wait([_stopped_key(r) for r in range(1, self.world)], STOP_TIMEOUT)
                except RuntimeError as exc:   # a rank already gone, or one that did not answer
                    log.warning("tensor parallel: not every rank stopped cleanly (%s)", str(exc).splitlines()[0][:200])
            for p in self.workers:
                try:
                    p.wait(STOP_TIMEOUT.total_seconds())
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            self.workers = []
            if self.threads_before is not None:   # the cores are the process's again
                torch.set_num_threads(self.threads_before)
                self.threads_before = None
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except RuntimeError:
                pass
        if self.rank and not self.broken:
            try:
                self.store.set(_stopped_key(self.rank), "1")
            except RuntimeError:
                pass

    # ---- a worker's side -----------------------------------------------------------------------

    def recv_header(self) -> list[int]:
        header = torch.zeros(HEADER_LEN, dtype=torch.long)
        self._call(dist.broadcast, header, 0, nbytes=HEADER_LEN * 8)
        return header.tolist()

    def recv_ints(self, n: int) -> list[int]:
        t = torch.zeros(n, dtype=torch.long)
        self._call(dist.broadcast, t, 0, nbytes=8 * n)
        return t.tolist()

    def recv_packed(self, n: int) -> torch.Tensor:
        t = torch.empty(n, dtype=torch.long)
        self._call(dist.broadcast, t, 0, nbytes=8 * n)
        return t

    # ---------------------------------------------------------------------------------------------

    def _call(self, fn, *args, nbytes: int) -> None:
        if self.broken:
            raise UnavailableError(self.broken)
        t0 = time.perf_counter()
        try:
            fn(*args)
        except RuntimeError as exc:
            self._break(exc)
        s = self.stats
        s.calls += 1
        s.bytes += nbytes
        s.seconds += time.perf_counter() - t0

    def _break(self, exc: BaseException) -> None:
        self.broken = f"a tensor-parallel rank was lost ({str(exc).splitlines()[0][:200]}); this server cannot serve"
        log.error("%s", self.broken)
        raise UnavailableError(self.broken) from exc


def _stopped_key(rank: int) -> str:
    return f"weft/stopped/{rank}"


def model_fingerprint(model: torch.nn.Module, dtype: torch.dtype) -> list[int]:
    """What every rank's model must agree on: vocabulary, layers, hidden size, dtype."""
    c = model.config
    return [int(c.vocab_size), int(c.num_hidden_layers), int(c.hidden_size), list(DTYPE_CODES).index(dtype)]


DTYPE_CODES = (torch.float32, torch.bfloat16, torch.float16)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def start_group(config: EngineConfig) -> TPGroup:
    """The driver's group: joins the torchrun-style rendezvous when RANK is set (as rank 0), else
    starts ranks 1..N-1 on this machine, each with its share of the cores."""
    world = config.tensor_parallel_size
    rdv = Rendezvous.from_env(world)
    workers: list[subprocess.Popen] = []
    threads_before = torch.get_num_threads()
    if rdv is None:
        rdv = Rendezvous("127.0.0.1", free_port(), world, 0)
        threads = max(1, (os.cpu_count() or world) // world)
        torch.set_num_threads(threads)
        spec = json.dumps(dataclasses.asdict(config))
        for rank in range(1, world):
            child = env.child_environment(MASTER_ADDR=rdv.addr, MASTER_PORT=str(rdv.port), WORLD_SIZE=str(world),
                                          RANK=str(rank), LOCAL_RANK=str(rank), OMP_NUM_THREADS=str(threads))
            workers.append(subprocess.Popen([sys.executable, "-m", "service.engine.tp_worker", "--config-json", spec],
                                            env=child))
    elif rdv.rank != 0:
        raise ValueError(f"RANK={rdv.rank}: the server is rank 0; other ranks run `weft worker`")
    try:
        group = _join(rdv, workers, "nccl" if config.device.startswith("cuda") else "gloo")
    except Exception:
        for p in workers:
            p.kill()
            p.wait()
        torch.set_num_threads(threads_before)
        raise
    group.workers = workers
    group.threads_before = threads_before if workers else None
    log.info("tensor parallel: rank 0 of %d (%s:%d)", world, rdv.addr, rdv.port)
    return group


def _join(rdv: Rendezvous, workers: list[subprocess.Popen], backend: str) -> TPGroup:
    """Join the group on a helper thread, so that a local rank that dies before it joins (a bad
    model path, a crash on import) is reported instead of waited for."""
    box: dict[str, object] = {}

    def join() -> None:
        try:
            box["group"] = TPGroup(rdv, backend)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=join, name="weft-tp-join", daemon=True)
    thread.start()
    deadline = time.monotonic() + RENDEZVOUS_TIMEOUT_S
    while thread.is_alive():
        thread.join(0.1)
        dead = [p for p in workers if p.poll() is not None]
        if dead:
            raise ModelLoadError(f"tensor parallel: local rank process {dead[0].pid} exited with "
                                 f"{dead[0].returncode} before joining the group (its log is above)")
        if time.monotonic() > deadline:
            raise ModelLoadError(f"tensor parallel: not every rank joined {rdv.addr}:{rdv.port} within "
                                 f"{RENDEZVOUS_TIMEOUT_S:.0f}s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["group"]  # type: ignore[return-value]

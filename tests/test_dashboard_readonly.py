"""The dashboard's "any model" boxes (Attribution, Depth) read the model that was typed and nothing else:
no download and no network, nothing written (the workbench cache, the Hugging Face cache, the working
directory and the typed folders are unchanged, file by file), no file lying beside a typed .gguf is
read, and a spec that cannot be read is one line on the page, never a traceback."""

import json
import shutil
import socket
import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from conftest import ROOT
from test_families import _write_tiny_gguf

CACHED, ABSENT = "hf:someone/tiny-llama", "hf:someone/absent"


def tree(*roots: Path) -> dict:
    """Every path under ``roots`` with its size and modification time (folders: that they exist)."""
    out = {}
    for root in roots:
        for p in [root, *root.rglob("*")]:
            s = p.lstat()
            out[str(p)] = "folder" if p.is_dir() else (s.st_size, s.st_mtime_ns)
    return out


@pytest.fixture
def sandbox(tmp_path, monkeypatch, llama_dir):
    """An empty workbench cache (SmolLM2 not fetched), a Hugging Face cache holding one tiny Llama, a GGUF
    whose folder also holds a config.json and a tokenizer_config.json that must not be read (an unsupported
    family, a remote-code tokenizer), and every network look-up recorded and refused."""
    import huggingface_hub.constants

    import streamlit as st

    dirs = {name: tmp_path / name for name in ("cwd", "cache", "hub", "gguf", "results")}
    for d in dirs.values():
        d.mkdir()
    snapshot = dirs["hub"] / "models--someone--tiny-llama" / "snapshots" / ("0" * 40)
    shutil.copytree(llama_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    _write_tiny_gguf(dirs["gguf"] / "tiny.gguf", llama_dir)
    (dirs["gguf"] / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (dirs["gguf"] / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "auto_map": {"AutoTokenizer": ["evil.Tokenizer", None]}}))
    monkeypatch.chdir(dirs["cwd"])
    monkeypatch.setenv("WORKBENCH_CACHE", str(dirs["cache"]))
    monkeypatch.setenv("WORKBENCH_RESULTS", str(dirs["results"]))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(dirs["hub"]))
    network = []

    def refuse(*args, **kwargs):
        network.append(args[:2])
        raise OSError("the network is off in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    sys.path.insert(0, str(ROOT))
    st.cache_resource.clear()
    st.cache_data.clear()
    yield dirs, network
    sys.path.remove(str(ROOT))


def typed(page: str, box: str, spec: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / "dashboard" / f"{page}.py"), default_timeout=60)
    at.run()
    at.text_input(key=box).set_value(spec).run()
    if page == "depth":
        at.number_input[0].set_value(128).run()
    assert not at.exception, (page, spec, at.exception)
    return at


def test_any_model_boxes_are_read_only(sandbox):
    dirs, network = sandbox
    gguf = str(dirs["gguf"] / "tiny.gguf")
    before = tree(*dirs.values())
    for spec in (CACHED, gguf):
        at = typed("attribution", "attribution_spec", spec)
        assert not at.error, at.error[0].value if at.error else ""
        assert any("NMAE" in m.label for m in at.metric) and len(at.get("plotly_chart")) == 2
        at = typed("depth", "depth_spec", spec)
        assert spec in at.multiselect[0].value, [e.value for e in at.error]
    for spec, message in [(ABSENT, "run `hf download someone/absent` first"),
                          ("smollm2", "run `workbench fetch smollm2` first"),
                          (str(dirs["gguf"] / "missing.gguf"), "not found"),
                          ("no-such-model", "unknown model spec")]:
        for page, box in (("attribution", "attribution_spec"), ("depth", "depth_spec")):
            at = typed(page, box, spec)
            assert at.error and message in at.error[0].value, (page, spec, [e.value for e in at.error])
            assert "\n" not in at.error[0].value
    assert network == [], "a model box reached for the network"
    assert tree(*dirs.values()) == before, "a model box wrote a file"

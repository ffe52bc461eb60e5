"""Nothing a user could hand us runs code: pickled weights are read only as plain tensors, a checkpoint
index cannot send the reader outside its directory, damaged files are one-line errors."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import workbench
from workbench.cli import main


class _RunsCode:
    """Unpickling this creates a marker file: what a hostile pytorch_model.bin could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _copy_without_weights(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    return dst


def _one_line_error(capsys, says: str):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("workbench: error:") and says in err, err


def test_pytorch_model_bin_loads_plain_tensors_and_refuses_code(hf_dirs, tmp_path, capsys):
    src = hf_dirs["llama"]
    sd = load_file(str(src / "model.safetensors"))
    plain = _copy_without_weights(src, tmp_path / "plain")
    torch.save(sd, plain / "pytorch_model.bin")
    t = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(workbench.load(plain)(t), workbench.load(src)(t))

    hostile = _copy_without_weights(src, tmp_path / "hostile")
    marker = tmp_path / "pwned"
    torch.save({**sd, "lm_head.weight": _RunsCode(marker)}, hostile / "pytorch_model.bin")
    assert main(["dla", str(hostile), "--prompt", "And God said", "--answer", " unto"]) == 2
    _one_line_error(capsys, "not a plain tensor checkpoint")
    assert not marker.exists(), "the pickle ran code"

    not_a_dict = _copy_without_weights(src, tmp_path / "list")
    torch.save([sd["model.embed_tokens.weight"]], not_a_dict / "pytorch_model.bin")
    assert main(["dla", str(not_a_dict), "--prompt", "And God said", "--answer", " unto"]) == 2
    _one_line_error(capsys, "not a state dict of tensors")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors"])
def test_sharded_index_cannot_point_outside_its_directory(hf_dirs, tmp_path, capsys, shard):
    import json

    d = _copy_without_weights(hf_dirs["llama"], tmp_path / "sharded")
    shutil.copy(hf_dirs["llama"] / "model.safetensors", tmp_path / "outside.safetensors")
    names = load_file(str(hf_dirs["llama"] / "model.safetensors")).keys()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: shard for k in names}}))
    assert main(["dla", str(d), "--prompt", "And God said", "--answer", " unto"]) == 2
    _one_line_error(capsys, "outside its directory")


def test_sharded_index_inside_the_directory_loads(hf_dirs, tmp_path):
    import json

    from safetensors.torch import save_file

    d = _copy_without_weights(hf_dirs["llama"], tmp_path / "sharded")
    sd = load_file(str(hf_dirs["llama"] / "model.safetensors"))
    keys = sorted(sd)
    half = len(keys) // 2
    save_file({k: sd[k] for k in keys[:half]}, d / "a.safetensors")
    save_file({k: sd[k] for k in keys[half:]}, d / "b.safetensors")
    wm = {k: "a.safetensors" if i < half else "b.safetensors" for i, k in enumerate(keys)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    t = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(workbench.load(d)(t), workbench.load(hf_dirs["llama"])(t))


def test_damaged_hf_weights_are_one_line(hf_dirs, tmp_path, capsys):
    d = shutil.copytree(hf_dirs["llama"], tmp_path / "damaged")
    (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    assert main(["dla", str(d), "--prompt", "And God said", "--answer", " unto"]) == 2
    _one_line_error(capsys, "corrupt")

"""RMSNorm removal on a Hugging Face Llama-architecture model, through its own modules.

Each ``LlamaRMSNorm`` is swapped for a workbench ``Norm`` (same computation: x / sqrt(mean x² + ε) · γ),
so the schedule, calibration and frozen scales are those of our own models. The input norm of each
layer is split: ``input_layernorm`` becomes the identity and q_proj/k_proj (sharing one norm) and
v_proj each read the residual through their own norm — the Q/K and V paths are frozen at different
times. RMS-type norms do not center, so the frozen norm is x / σ · γ. At the end every frozen norm is
folded into the projections that read it (the final one into an untied lm_head) and the model is
saved as a stock Llama directory whose RMSNorms are exact identities (huge ε, gain 1/rsqrt(ε)).
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data import load_token_data
from ..hf import load_causal_lm
from ..errors import WorkbenchError
from ..norms import Affine, Norm
from ..norms.frozen import SpecialPositions
from ..norms.rmsnorm import RMSStandardize
from ..tokenizer import EOT
from .api import _device, check_out_dir, publish
from .finetune import RemovalConfig, config_record, control_copy, evaluate, finetune
from .fold import AffineMap, norm_as_affine
from .gpt2 import LN_FREE_EPS
from .schedule import NormSite, standard_schedule

N_CTX = 128


class NormedLinear(nn.Module):
    """A projection that reads the residual stream through its own norm."""

    def __init__(self, norm: Norm, linear: nn.Linear):
        super().__init__()
        self.norm = norm
        self.linear = linear

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.norm(x))


class _Logits(nn.Module):
    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, tokens: Tensor) -> Tensor:
        return self.hf(input_ids=tokens, use_cache=False).logits


def rms_as_norm(rms: nn.Module) -> Norm:
    w = rms.weight.detach().float()
    norm = Norm(RMSStandardize(float(getattr(rms, "variance_epsilon", getattr(rms, "eps", 1e-6)))),
                Affine(w.shape[0], bias=False))
    with torch.no_grad():
        norm.affine.w.copy_(w)
    return norm


def check_llama(hf: nn.Module) -> None:
    layers = getattr(getattr(hf, "model", None), "layers", None)
    ok = layers is not None and all(
        hasattr(l, "input_layernorm") and hasattr(l, "post_attention_layernorm") and hasattr(l, "self_attn")
        and all(hasattr(l.self_attn, p) for p in ("q_proj", "k_proj", "v_proj")) for l in layers)
    if not ok or not type(layers[0].input_layernorm).__name__.endswith("RMSNorm"):
        raise WorkbenchError(
            f"{type(hf).__name__} is not a Llama-architecture model with RMSNorm (input_layernorm, "
            "post_attention_layernorm, q/k/v_proj); remove-ln handles those, GPT-2 directories and workbench runs"
        )


class LlamaRemoval:
    def __init__(self, hf: nn.Module, tokenizer, n_ctx: int = N_CTX):
        check_llama(hf)
        self.tokenizer = tokenizer
        self.eot_id = tokenizer.token_to_id(EOT)
        self.n_ctx = n_ctx
        self.rms_cls = type(hf.model.layers[0].input_layernorm)
        ln2, qk, v = [], [], []
        for i, layer in enumerate(hf.model.layers):
            attn = layer.self_attn
            n_qk, n_v = rms_as_norm(layer.input_layernorm), rms_as_norm(layer.input_layernorm)
            attn.q_proj, attn.k_proj = NormedLinear(n_qk, attn.q_proj), NormedLinear(n_qk, attn.k_proj)
            attn.v_proj = NormedLinear(n_v, attn.v_proj)
            layer.input_layernorm = nn.Identity()
            layer.post_attention_layernorm = rms_as_norm(layer.post_attention_layernorm)
            ln2.append(NormSite(f"model.layers.{i}.post_attention_layernorm", layer.post_attention_layernorm))
            qk.append(NormSite(f"model.layers.{i}.input_layernorm[q,k]", n_qk))
            v.append(NormSite(f"model.layers.{i}.input_layernorm[v]", n_v))
        hf.model.norm = rms_as_norm(hf.model.norm)
        self.sites = standard_schedule(ln2, qk, v, NormSite("model.norm", hf.model.norm))
        self.final_norm = hf.model.norm
        self.hf = hf
        self.net = _Logits(hf)

    def shard_units(self) -> list[nn.Module]:
        return list(self.hf.model.layers)

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """A stock Llama whose norms are identities: frozen scales folded into q/k/v, gate/up, lm_head."""
        hf = copy.deepcopy(self.hf)
        d = hf.config.hidden_size

        def fold_into(linear: nn.Linear, m: AffineMap) -> None:
            linear.weight.copy_((linear.weight.double() * m.scale[None, :]).float())
            if linear.bias is not None or m.shift.abs().max() > 0:
                raise WorkbenchError("a Llama norm with a bias cannot be folded")

        gain = 1.0 / torch.rsqrt(torch.tensor(LN_FREE_EPS, dtype=torch.float32)).item()
        def identity_rms() -> nn.Module:
            n = self.rms_cls(d, eps=LN_FREE_EPS)
            n.weight.fill_(gain)
            return n

        for layer in hf.model.layers:
            attn = layer.self_attn
            qk, v = norm_as_affine(attn.q_proj.norm, d), norm_as_affine(attn.v_proj.norm, d)
            for name, m in (("q_proj", qk), ("k_proj", qk), ("v_proj", v)):
                lin = getattr(attn, name).linear
                fold_into(lin, m)
                setattr(attn, name, lin)
            mlp = norm_as_affine(layer.post_attention_layernorm, d)
            fold_into(layer.mlp.gate_proj, mlp)
            fold_into(layer.mlp.up_proj, mlp)
            layer.input_layernorm, layer.post_attention_layernorm = identity_rms(), identity_rms()
        final = norm_as_affine(hf.model.norm, d)
        hf.lm_head.weight = nn.Parameter((hf.lm_head.weight.detach().double() * final.scale[None, :]).float())
        hf.model.norm = identity_rms()
        hf.config.tie_word_embeddings = False
        hf.config.rms_norm_eps = LN_FREE_EPS
        hf.config.workbench_ln_free = True
        return hf.eval()


def remove_rmsnorm_hf(spec: str, out: str | Path, rc: RemovalConfig | None = None, corpus: str = "english",
                      device: str | None = None, progress: bool = True, n_ctx: int = N_CTX) -> dict[str, Any]:
    """RMSNorm removal on a Hugging Face Llama model (``smollm2``, a local directory, ``hf:NAME``)."""
    rc = rc or RemovalConfig(steps_per_ln=1, tokens_per_step=512)
    out = Path(out)
    check_out_dir(out)
    dev = _device(device)
    hf, hf_tok = load_causal_lm(str(spec))
    tok = hf_tok.backend_tokenizer
    if tok.token_to_id(EOT) is None:
        raise WorkbenchError(f"model {spec!r} has no {EOT} token; the removal data uses it as BOS")
    hf = hf.to(dev)
    data = load_token_data(corpus, tok.get_vocab_size(), tokenizer=tok)
    data.check_context(n_ctx)
    lr = rc.lr or 2e-5
    t0 = time.perf_counter()
    val = data.val_batches(rc.eval_batches, rc.eval_batch_size, n_ctx)
    adapter = LlamaRemoval(hf, tok, n_ctx)
    ce_original = evaluate(adapter.net, val, None, dev)
    control = control_copy(adapter) if rc.control else None
    positions = SpecialPositions(adapter.eot_id, rc.special_positions)
    run = finetune(adapter, data, rc, lr, dev, remove=True, positions=positions, progress=progress, label="remove-rmsnorm", val=val)
    ce_unfolded = evaluate(adapter.net, val, positions, dev)
    folded = adapter.fold()
    folded_net = _Logits(folded)
    ce_free = evaluate(folded_net, val, None, dev)
    with torch.no_grad():
        fold_diff = (folded_net(val[0].to(dev)) - adapter.net(val[0].to(dev))).abs().max().item()
    summary: dict[str, Any] = {
        "source": str(spec), "architecture": type(hf).__name__, "norm": "RMSNorm (pretrained)",
        "ce_original": ce_original, "ce_control": None, "ce_ln_free": ce_free, "ce_ln_free_before_fold": ce_unfolded,
        "fold_max_abs_logit_diff": fold_diff,
        "ce_before_special_off": run["schedule"][-1].get("ce_before"), "tokens_used": run["tokens"], "pretraining_tokens": None,
        "token_fraction": None, "steps": run["steps"], "final_steps": run["final_steps"], "skipped_steps": run["skipped_steps"], "batch_size": run["batch_size"], "n_ctx": n_ctx, "lr": lr,
        "schedule": run["schedule"], "config": config_record(rc), "corpus": corpus,
        "eval_tokens": sum(b.shape[0] * (b.shape[1] - 1) for b in val),
    }
    metrics = run["metrics"]
    if control is not None:
        crun = finetune(control, data, rc, lr, dev, remove=False, positions=SpecialPositions(adapter.eot_id, rc.special_positions),
                        progress=progress, label="control")
        summary["ce_control"] = evaluate(control.net, val, None, dev)
        summary["ce_ln_free_minus_control"] = ce_free - summary["ce_control"]
        by_step = {m["step"]: m["loss"] for m in crun["metrics"]}
        metrics = [{**m, "control_loss": by_step.get(m["step"])} for m in metrics]
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        import json

        from .. import io

        folded.cpu().save_pretrained(tmp)
        hf_tok.save_pretrained(tmp)
        io.atomic_write_text(tmp / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
        io.atomic_write_json(tmp / "summary.json", summary)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary

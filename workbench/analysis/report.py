"""One table across models: how exact DLA is, how well attribution patching tracks activation
patching, and how much confidence neurons act through the final norm's scale."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import WorkbenchError
from ..model import GPT
from .confidence import confidence_neurons, summarize, validation_tokens
from .dla import direct_logit_attribution
from .patching import patching
from .prompts import load_prompts, usable

def attribution_report(models: dict[str, GPT], corpus: str = "english", sequences: int = 16) -> pd.DataFrame:
    rows = []
    prompts = load_prompts()
    for name, model in models.items():
        row: dict = {"model": name, "norm": model.cfg.norm}
        nmae = []
        for p in prompts:
            if usable(model, p):
                try:
                    nmae.append(direct_logit_attribution(model, p.prompt, p.answer, p.contrast).nmae)
                except WorkbenchError:
                    break  # DLA undefined for this norm (Post-LN): leave the columns empty
        row.update(dla_prompts=len(nmae), dla_nmae_median=float(np.median(nmae)) if nmae else np.nan,
                   dla_nmae_mean=float(np.mean(nmae)) if nmae else np.nan)
        corr = [patching(model, p.prompt, p.corrupt, p.answer, p.contrast).correlation
                for p in prompts if usable(model, p, need_pair=True)]
        row.update(patch_pairs=len(corr), patch_correlation_mean=float(np.nanmean(corr)) if corr else np.nan,
                   patch_correlation_min=float(np.nanmin(corr)) if corr else np.nan)
        summary = summarize(confidence_neurons(model, validation_tokens(model, corpus, sequences)))
        cand = summary.get("null-space candidate", {})
        row.update(conf_null_share=cand.get("mean_null_share"), conf_entropy_effect=cand.get("mean_abs_entropy_effect"),
                   conf_share_via_norm_scale=cand.get("share_via_norm_scale"))
        rows.append(row)
    return pd.DataFrame(rows)

"""How exact DLA is on a norm-free model, on held-out text: the NMAE of DLA against each component's direct
effect on the next token's logit, window by window and position by position (issue 24: ≤ 1e-5 at positions ≥ 1).

    python analyses/dla_exactness.py runs/smol/S17p [--windows 4] [--positions 1,2,4,8,16,32,64,126] [--corpus english]
                                     [--float64]

In float32 a residual stream of ~10³ (SmolLM2's) leaves ~10⁻⁵ of rounding in each direct effect (a difference
of two logits); ``--float64`` runs the model in double precision, where what remains is DLA's own error.

The windows are remove-ln's own validation windows (the first ``--windows`` of them), so the positions
behind a sink prefix start at 1. Windows that overflow are counted, not measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import workbench
from workbench.analysis import dla_exactness
from workbench.batches import load_token_data
from workbench.errors import WorkbenchError


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("directory")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--positions", default="1,2,4,8,16,32,64,126", help="token positions, comma-separated")
    p.add_argument("--corpus", default="english")
    p.add_argument("--float64", action="store_true", help="the model in double precision (the sink prefix too)")
    a = p.parse_args()
    d = Path(a.directory)
    try:
        model = workbench.load(d)
    except WorkbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if a.float64:
        model = model.double()
        for b in model.blocks:  # the prefix's keys and values are plain attributes, not buffers
            for n in ("sink_k", "sink_v"):
                if getattr(b.attn, n, None) is not None:
                    setattr(b.attn, n, getattr(b.attn, n).double())
    n_ctx = json.loads((d / "summary.json").read_text())["n_ctx"] if (d / "summary.json").is_file() else 128
    data = load_token_data(a.corpus, model.cfg.d_vocab, tokenizer=model.tokenizer)
    windows = data.val_batches(1, a.windows, n_ctx)[0]
    t = dla_exactness(model, windows, [int(x) for x in a.positions.split(",")])
    ok = t[t.finite]
    by_pos = ok.groupby("pos").nmae.agg(["median", "max"])
    print(by_pos.to_string(float_format=lambda x: f"{x:.2e}"))
    print(f"{len(ok)} of {len(t)} (window, position) pairs finite; NMAE median {ok.nmae.median():.2e}, max "
          f"{ok.nmae.max():.2e}; largest |DLA sum − logit| {(ok.dla_sum - ok.logit).abs().max():.2e}")


if __name__ == "__main__":
    main()

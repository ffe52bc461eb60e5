import os
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the plain-PyTorch reference GPT lives there


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tests never read or write the user's tokenizer cache."""
    os.environ["WORKBENCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A folder corpus of five short 'works' cut from the bundled English text."""
    from workbench.corpus import load_corpus

    d = tmp_path_factory.mktemp("corpus")
    works = load_corpus("english").train[:5]
    for i, w in enumerate(works):
        (d / f"work{i}.txt").write_text(w.text[:40_000])
    return d


TINY_MODEL = dict(n_layers=2, d_model=32, n_heads=4, n_ctx=32, d_vocab=320)
TINY_TRAIN = dict(batch_size=4, eval_every=4, eval_batches=2, ckpt_every=4, warmup_steps=2)

"""Language Ranker on parallel text, synthetic languages and training mixtures with shares we set."""

from .aligned import Language, ParallelCorpus
from .parallel import load_parallel
from .ranker import layer_table, rank_languages, ranking_table, spearman
from .synthetic import FAMILIES, SyntheticLanguage

__all__ = ["FAMILIES", "Language", "ParallelCorpus", "SyntheticLanguage", "layer_table", "load_parallel",
           "rank_languages", "ranking_table", "spearman"]

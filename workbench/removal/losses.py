"""Auxiliary objectives of the removal fine-tune, each a formula on the activations a norm reads.

* ``aux_std_loss`` — the paper's per-position std loss at the final residual (Baroni et al. 2025).
* ``scale_spread`` — the spread of log per-token scale, averaged over norm sites (``--scale-loss``).
* ``mlp_scale_penalty`` — one-sided: only positions whose scale exceeds (1 + δ) times the site's rms
  scale are penalised (``--mlp-penalty W --penalty-delta δ``). A gated MLP answers a position k times
  above σ with an output ~k² larger once its norm is frozen, so the outliers, not the spread, are what
  must be gone before then.
* ``frozen_scale_penalty`` — the same one-sided penalty after the freeze, against the σ each MLP norm was
  frozen at (``--frozen-penalty W``): nothing else bounds the k² feedback then, and a rare token a few σ
  loud at one frozen gate is louder at the next (how S6's validation windows overflowed).
  ``--random-penalty W`` adds the same term on a window of uniformly random tokens each step: the rare
  tokens a corpus never holds are where the runaways that overflow a norm-free window start.
* ``kl_to_teacher`` — distillation (``--objective kl|mix``): KL(teacher ‖ model) per position. The
  teacher is the original with its norms live (the model tries to stay what it was instead of also
  adapting to the corpus), or with ``--teacher control`` the finished control (what the model would be
  had it kept its norms: the adaptation to the corpus included, as a full distribution per token).
* ``logit_anchor_loss`` — once ``ln_final`` is frozen at σ, nothing but the loss holds the logit
  scale (TaperNorm, arXiv 2602.10408): (log s_t − log σ)² over ordinary positions (``--logit-anchor W``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..errors import WorkbenchError
from ..norms.frozen import SpecialPositions
from .options import opt


@dataclass
class Losses:
    """The objective and the auxiliary losses' weights: the part of the removal method this module owns.
    Adding an objective is a field here, its formula below and its term in ``LossWatch.objective``."""

    objective: str = opt("ce", "what the model is fine-tuned on, removal and control alike: ce (next-token "
                               "cross-entropy on the corpus), kl (KL from the --teacher to the model), mix "
                               "(ce + --kl-weight × kl)")
    kl_weight: float = opt(1.0, "weight of the KL term under --objective mix")
    # The control has adapted to the corpus as the norm-free model should: a dense target for the same batches.
    teacher: str = opt("original", "whom --objective kl|mix distils from: original (its norms live; both arms "
                                   "distil) or control (the control fine-tunes first on ce, then the removal "
                                   "arm distils from it)")
    logit_anchor: float = opt(0.0, "weight of a loss pulling each token's final-residual scale to ln_final's "
                                   "frozen σ once it is frozen (0: off)")

    aux_loss: float = opt(0.0, "weight of the final-residual std-uniformity loss")
    # Teaches the model to stop relying on a few high-norm tokens before one σ replaces their scale.
    scale_loss: float = opt(0.0, "weight of a loss on the spread of log per-token scale at every norm")
    mlp_penalty: float = opt(0.0, "weight of a one-sided penalty on per-position scales above (1+δ)·σ at "
                                  "MLP-norm inputs not yet frozen")
    penalty_delta: float = opt(0.1, "δ of --mlp-penalty and --frozen-penalty")
    frozen_penalty: float = opt(0.0, "weight of the same one-sided penalty at MLP-norm inputs already frozen, "
                                     "on scales above (1+δ) times the σ each was frozen at (0: off)")
    # A mean over ~10⁴ positions hardly sees the one runaway token that overflows a window.
    penalty_pool: str = opt("mean", "how --mlp-penalty and --frozen-penalty pool a site's positions: mean, or max "
                                    "(the batch's loudest position per site, counted in full)")
    # About half of SmolLM2's vocabulary never occurs in the `english` corpus (52 %), and runaways that
    # overflow a norm-free window start at rare tokens, which a corpus batch hardly ever penalises.
    random_penalty: float = opt(0.0, "weight of --frozen-penalty's one-sided term (its δ and pooling) on one "
                                     "window of uniformly random tokens per step, removal arm only (0: off)")

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise WorkbenchError(f"unknown --objective {self.objective!r}; choose one of: {', '.join(OBJECTIVES)}")
        for name in ("aux_loss", "scale_loss", "mlp_penalty", "frozen_penalty", "kl_weight", "logit_anchor",
                     "random_penalty"):
            if getattr(self, name) < 0:
                raise WorkbenchError(f"--{name.replace('_', '-')} must be ≥ 0, got {getattr(self, name)}")
        if self.teacher not in TEACHERS:
            raise WorkbenchError(f"unknown --teacher {self.teacher!r}; choose one of: {', '.join(TEACHERS)}")
        if self.teacher == "control" and self.objective == "ce":
            raise WorkbenchError("--teacher control needs a distilling objective; add --objective kl (or mix)")
        if self.penalty_pool not in POOLS:
            raise WorkbenchError(f"--penalty-pool must be one of: {', '.join(POOLS)}; got {self.penalty_pool!r}")
        if not 0 <= self.penalty_delta < 1e6:
            raise WorkbenchError(f"--penalty-delta δ must be ≥ 0 (positions above (1 + δ)·σ are penalised), got "
                                 f"{self.penalty_delta}")

    @property
    def distils(self) -> bool:
        """Whether the objective needs a teacher's logits on every batch."""
        return self.objective != "ce"

    def teacher_of(self, remove: bool) -> str | None:
        """Whom an arm distils from: the removal arm (``remove``) or the control; None for cross-entropy."""
        if not self.distils or (self.teacher == "control" and not remove):
            return None
        return self.teacher

    def language_loss(self, ce: Tensor, kl: Tensor | None) -> Tensor:
        """The objective's language term from the batch's cross-entropy and KL to the teacher."""
        if self.objective == "ce":
            return ce
        if kl is None:
            raise WorkbenchError(f"--objective {self.objective} needs the original model's logits")
        return kl if self.objective == "kl" else ce + self.kl_weight * kl

    def watch(self, adapter) -> LossWatch:
        return LossWatch(adapter, aux=self.aux_loss, scale=self.scale_loss, mlp=self.mlp_penalty,
                         delta=self.penalty_delta, anchor=self.logit_anchor, frozen=self.frozen_penalty,
                         pool=self.penalty_pool, random=self.random_penalty)


OBJECTIVES = ("ce", "kl", "mix")
TEACHERS = ("original", "control")
POOLS = ("mean", "max")


def _pool(excess: Tensor, counted: Tensor, how: str) -> Tensor:
    """A site's penalty from its per-position excess²: the mean over the counted positions, or their max."""
    if how == "max":
        return (excess * counted).amax()
    return (excess * counted).sum() / counted.sum().clamp_min(1)


def kl_to_teacher(teacher: Float[Tensor, "batch pos vocab"], student: Float[Tensor, "batch pos vocab"]) -> Tensor:
    """Mean over positions of KL(p_teacher ‖ p_student) = Σ_v p_t (log p_t − log p_s), in nats, float32."""
    log_t = torch.log_softmax(teacher.float(), -1)
    log_s = torch.log_softmax(student.float(), -1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()


def logit_anchor_loss(x: Float[Tensor, "batch pos d"], sigma: Tensor, centers: bool,
                      keep: Bool[Tensor, "batch pos 1"]) -> Tensor:
    """Mean over the kept positions of (log s_t − log σ)²: each token's final-residual scale held at the
    frozen final norm's σ, so the logits keep the scale the live norm gave them."""
    k = keep.float()
    d = log_scale(x, centers) - torch.log(sigma.float())
    return (d.pow(2) * k).sum() / k.sum().clamp_min(1)


def token_scale(x: Float[Tensor, "batch pos d"], centers: bool) -> Float[Tensor, "batch pos 1"]:
    """Each position's norm scale sqrt(mean (x − mean x)²) (or sqrt(mean x²) without centering)."""
    x = x.float()
    xc = x - x.mean(-1, keepdim=True) if centers else x
    return xc.pow(2).mean(-1, keepdim=True).sqrt()


def aux_std_loss(x: Float[Tensor, "batch pos d"], positions: SpecialPositions) -> Tensor:
    """How far each ordinary token's std at the final residual is from their mean (squared, relative)."""
    s = token_scale(x, centers=True)
    keep = positions.ordinary().float()
    mean = (s * keep).sum() / keep.sum().clamp_min(1)
    return (((s / mean - 1).pow(2)) * keep).sum() / keep.sum().clamp_min(1)


def log_scale(x: Float[Tensor, "batch pos d"], centers: bool) -> Float[Tensor, "batch pos 1"]:
    """log of each position's norm scale: log sqrt(mean (x − mean x)²) (or of mean x² without centering)."""
    x = x.float()
    xc = x - x.mean(-1, keepdim=True) if centers else x
    return 0.5 * torch.log(xc.pow(2).mean(-1, keepdim=True) + 1e-12)


def scale_spread(log_scales: list[Tensor], keep: Bool[Tensor, "batch pos 1"]) -> Tensor:
    """Mean over norm sites of the variance of log scale over the kept (ordinary) positions."""
    k = keep.float()
    n = k.sum().clamp_min(1)
    out = []
    for ls in log_scales:
        mean = (ls * k).sum() / n
        out.append((((ls - mean) ** 2) * k).sum() / n)
    return torch.stack(out).mean()


def mlp_scale_penalty(scales: list[Float[Tensor, "batch pos 1"]], ordinary: Bool[Tensor, "batch pos 1"],
                      delta: float, sink: Bool[Tensor, "batch pos 1"] | None = None, pool: str = "mean") -> Tensor:
    """Mean over sites of mean over **every** position of relu(s_t / σ − (1 + δ))², σ = sqrt(mean s_t²)
    over the ordinary positions — the σ the site will be frozen at — held constant, so only the outliers
    are pushed down, not the scale as a whole. BOS and end-of-text tokens are included: they are the
    loudest positions, and after the special positions lose their own σ they are divided by this one —
    except a sink prefix's position 0 (``sink``), which is never divided by σ, so keeps its scale.
    ``pool="max"``: the loudest counted position's term instead of the mean."""
    k = ordinary.float()
    n = k.sum().clamp_min(1)
    counted = torch.ones_like(k) if sink is None else (~sink).float()
    out = []
    for s in scales:
        sigma = ((s.detach().pow(2) * k).sum() / n).sqrt().clamp_min(1e-12)
        out.append(_pool(torch.relu(s / sigma - (1 + delta)).pow(2), counted, pool))
    return torch.stack(out).mean()


def frozen_scale_penalty(scales: list[Float[Tensor, "batch pos 1"]], sigmas: list[Tensor], delta: float,
                         sink: Bool[Tensor, "batch pos 1"] | None = None, pool: str = "mean") -> Tensor:
    """Mean over frozen sites of mean (``pool="max"``: max) over every position (but a sink prefix's
    position 0, which keeps its live norm) of relu(s_t / σ_site − (1 + δ))², σ_site the constant the site
    divides by."""
    out = []
    for s, sigma in zip(scales, sigmas, strict=True):
        counted = torch.ones_like(s) if sink is None else (~sink).to(s.dtype)
        ratio = s / sigma.detach().float().clamp_min(1e-12)
        out.append(_pool(torch.relu(ratio - (1 + delta)).pow(2), counted, pool))
    return torch.stack(out).mean()


class LossWatch:
    """What the auxiliary losses read during one forward — the final residual (``aux``), every site's
    log scale (``scale``) and the scales of the MLP-norm inputs, still live (``mlp``) or frozen
    (``frozen``, with the σ each divides by) — and the objective they add to the language-model loss, each
    with its weight."""

    def __init__(self, adapter, aux: float = 0.0, scale: float = 0.0, mlp: float = 0.0, delta: float = 0.1,
                 anchor: float = 0.0, frozen: float = 0.0, pool: str = "mean", random: float = 0.0):
        self.weights = {"aux": aux, "scale": scale, "mlp": mlp, "anchor": anchor, "frozen": frozen, "random": random}
        self.pool = pool
        self.final_norm = adapter.final_norm  # its standardization is replaced when it is frozen
        self.delta = delta
        self.final: list[Tensor] = []
        self.log_scales: list[Tensor] = []
        self.mlp_scales: list[Tensor] = []
        self.frozen_scales: list[tuple[Tensor, Tensor]] = []
        self.handles = [adapter.final_norm.register_forward_pre_hook(self._final)]
        if scale > 0:
            # per token and residual-wide: a QK-norm's per-head scales are not spread over positions alike
            self.handles += [s.norm.register_forward_pre_hook(self._log_scale) for s in adapter.sites if s.kind != "qk"]
        if mlp > 0 or frozen > 0 or random > 0:
            self.handles += [s.norm.register_forward_pre_hook(self._mlp_scale) for s in adapter.sites if s.kind == "mlp"]

    def _final(self, mod, args) -> None:
        self.final.append(args[0])

    def _log_scale(self, mod, args) -> None:
        self.log_scales.append(log_scale(args[0], mod.standardize.centers))

    def _mlp_scale(self, mod, args) -> None:
        std = mod.standardize
        if not std.scale_frozen:
            if self.weights["mlp"] > 0:
                self.mlp_scales.append(token_scale(args[0], std.centers))
        elif self.weights["frozen"] > 0 or self.weights["random"] > 0:
            self.frozen_scales.append((token_scale(args[0], std.centers), std.ordinary_scale()))

    def objective(self, loss: Tensor, positions: SpecialPositions) -> Tensor:
        w = self.weights
        total = loss
        if w["aux"] > 0 and self.final:
            total = total + w["aux"] * aux_std_loss(self.final[-1], positions)
        if w["scale"] > 0 and self.log_scales:
            total = total + w["scale"] * scale_spread(self.log_scales, positions.ordinary())
        if w["mlp"] > 0 and self.mlp_scales:
            total = total + w["mlp"] * mlp_scale_penalty(self.mlp_scales, positions.ordinary(), self.delta,
                                                         positions.sink_mask, self.pool)
        if w["frozen"] > 0 and self.frozen_scales:
            total = total + w["frozen"] * self.frozen_term(positions)
        std = self.final_norm.standardize
        sigma = std.ordinary_scale()
        if w["anchor"] > 0 and self.final and sigma is not None:
            total = total + w["anchor"] * logit_anchor_loss(self.final[-1], sigma, std.centers, positions.ordinary())
        return total

    def frozen_term(self, positions: SpecialPositions) -> Tensor:
        """The one-sided penalty, unweighted, at the frozen MLP-norm inputs of the last forward (0 if none)."""
        if not self.frozen_scales:
            return torch.zeros(())
        scales, sigmas = zip(*self.frozen_scales)
        return frozen_scale_penalty(list(scales), list(sigmas), self.delta, positions.sink_mask, self.pool)

    def random_term(self, positions: SpecialPositions) -> Tensor:
        """``--random-penalty`` × the frozen term, for a forward on a random-token window."""
        return self.weights["random"] * self.frozen_term(positions)

    def clear(self) -> None:
        self.final.clear()
        self.log_scales.clear()
        self.mlp_scales.clear()
        self.frozen_scales.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


__all__ = ["LossWatch", "Losses", "OBJECTIVES", "TEACHERS", "aux_std_loss", "kl_to_teacher", "log_scale", "logit_anchor_loss", "mlp_scale_penalty", "scale_spread", "token_scale"]

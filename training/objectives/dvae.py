"""The tokenizer stage of BEiT: train a discrete VAE (``model.tokenizer.DiscreteVAE``) as DALL-E's
(Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", Section 2.1 and Appendix A.2), whose
tokens BEiT v1 predicts (Bao et al. 2021). No labels.

The loss is DALL-E's evidence lower bound, both terms per pixel: the reconstruction error of the
(normalised) pixels from the Gumbel-softmax relaxed codes, plus ``beta`` times the KL divergence
of the encoder's code distribution q(z | x) from the uniform prior over the ``V`` codes, per token
and divided by the pixels of a patch (DALL-E sums both over the image). The reconstruction is the
squared error (DALL-E used its logit-Laplace likelihood; the squared error of normalised pixels is
what the open re-implementations use and needs no pixel remapping).

Schedules, over optimizer steps (Appendix A.2: "annealed ... using a cosine schedule"):

* the relaxation temperature ``tau`` from ``tau_start`` (1) to ``tau_end`` (1/16) over
  ``tau_steps`` (DALL-E: the first 150,000 updates), then kept;
* the KL weight ``beta`` from 0 to ``kl_weight`` (6.6, "which promotes better codebook usage")
  over ``kl_warmup_steps`` (the first 5,000 updates), then kept.

The Gumbel noise of a micro-batch is drawn from ``(seed, step, slot)`` (``Objective.begin_micro_batch``:
the micro-batch's place in the global batch), not from a rank's generator: 1 rank x accumulation 2
and 2 ranks draw the same noise for the same samples, and a resumed run the straight run's.

Evaluation (no noise, hard tokens as BEiT uses them): ``eval_recon_mse`` is the squared error of
the reconstruction from the argmax tokens, ``eval_kl`` the KL per token, ``eval_loss`` their sum
with the final ``beta`` as in training, and the codebook usage over the whole eval split and every
rank (``model.tokenizer.codebook_usage``): ``eval_codebook_used`` (fraction of the codes used at
least once), ``eval_codebook_dead`` (codes never used) and ``eval_codebook_perplexity``. A run whose
final usage is under ``min_usage`` is a failed run (orchestration refuses to register it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from confkit import Checker
from model.tokenizer import DiscreteVAE, codebook_usage
from training.objectives.base import Objective, as_sums, valid_rows

#: The eval sums before the per-code counts.
_FIXED_KEYS = ("recon", "kl", "samples")


@dataclass(frozen=True, kw_only=True)
class DVAEObjectiveConfig:
    """DALL-E's dVAE objective; see the module docstring for the loss and the schedules. Defaults
    are DALL-E's (Appendix A.2). ``min_usage``: the fraction of the codebook the final evaluation
    must use for the run to count as a success (a tokenizer using 5 % of its codes gives BEiT
    almost nothing to predict)."""

    kind: Literal["dvae"] = "dvae"
    tau_start: float = 1.0
    tau_end: float = 1.0 / 16
    tau_steps: int = 150_000
    kl_weight: float = 6.6
    kl_warmup_steps: int = 5_000
    min_usage: float = 0.5

    def __post_init__(self) -> None:
        c = Checker(self)
        c.choice("kind", ("dvae",))
        if c.number("tau_start", gt=0) and c.number("tau_end", gt=0):
            c.require(self.tau_end <= self.tau_start,
                      f"tau_end={self.tau_end} must be <= tau_start={self.tau_start} (the temperature is annealed down)")
        c.int("tau_steps", ge=0, why=" (0: tau_end from the first step)")
        c.number("kl_weight", ge=0, why=" (DALL-E: 6.6)")
        c.int("kl_warmup_steps", ge=0, why=" (0: the full KL weight from the first step)")
        c.number("min_usage", ge=0, le=1, why=" (the fraction of the codebook a successful run uses)")
        c.done()

    def tau_at(self, step: int) -> float:
        """The Gumbel-softmax temperature at optimizer step ``step`` (cosine from start to end)."""
        return _cosine(self.tau_start, self.tau_end, step, self.tau_steps)

    def beta_at(self, step: int) -> float:
        """The KL weight at optimizer step ``step`` (cosine from 0 to ``kl_weight``)."""
        return _cosine(0.0, self.kl_weight, step, self.kl_warmup_steps)


def _cosine(start: float, end: float, step: int, steps: int) -> float:
    if steps <= 0 or step >= steps:
        return end
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * step / steps))


def kl_to_uniform(logits: Tensor) -> Tensor:
    """(B, V, h, w) logits -> (B,) mean over tokens of KL(q || uniform) = log V - H(q), in nats."""
    logq = logits.float().log_softmax(dim=1)
    neg_entropy = (logq.exp() * logq).sum(dim=1)  # (B, h, w)
    return (neg_entropy + math.log(logits.shape[1])).flatten(1).mean(dim=1)


class DVAEObjective(Objective):
    """The model is the dVAE itself (trained and exported whole); see the module docstring."""

    def __init__(self, cfg: DVAEObjectiveConfig) -> None:
        super().__init__(cfg)
        self.eval_keys = _FIXED_KEYS
        self._step, self._slot, self._seed = 0, 0, 0
        self._dvae: DiscreteVAE | None = None

    def num_classes(self, dataset_classes: int) -> int:
        return 0  # no labels: a tokenizer has no head

    def wrap(self, model: nn.Module) -> nn.Module:
        if not isinstance(model, DiscreteVAE):
            raise ValueError(f"the dVAE objective trains a model.tokenizer.DiscreteVAE, not {type(model).__name__}: "
                             "use a tokenizer recipe (dvae_tokenizer_*) or model.kind='dvae'")
        self._dvae = model
        self.eval_keys = _FIXED_KEYS + tuple(f"code{i}" for i in range(model.vocab_size))
        return model

    def begin_micro_batch(self, *, step: int, slot: int, seed: int) -> None:
        self._step, self._slot, self._seed = step, slot, seed

    def _noise(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """Gumbel(0, 1) noise of ``shape`` from (seed, step, slot) alone."""
        g = torch.Generator(device="cpu").manual_seed((self._seed * 1_000_003 + self._step) * 65_537 + self._slot)
        u = torch.rand(shape, generator=g).clamp_(1e-10, 1 - 1e-7)  # drawn on the CPU: the same on any device
        return (-(-u.log()).log()).to(device)

    def _pixels_per_token(self) -> int:
        assert self._dvae is not None
        return self._dvae.cfg.channels * self._dvae.patch_size ** 2

    def loss(self, module: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        images = batch[0]
        assert self._dvae is not None
        ps = self._dvae.patch_size
        shape = (images.shape[0], self._dvae.vocab_size, images.shape[-2] // ps, images.shape[-1] // ps)
        recon, logits = module(images, self.cfg.tau_at(self._step), noise=self._noise(shape, images.device))
        mse = F.mse_loss(recon.float(), images.float())
        kl = kl_to_uniform(logits).mean()
        return mse + self.cfg.beta_at(self._step) * kl / self._pixels_per_token()

    def eval_sums(self, module: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        assert self._dvae is not None
        valid = valid_rows(batch)
        counts = torch.zeros(self._dvae.vocab_size, dtype=torch.float64)
        if valid.sum() == 0:
            return torch.cat([as_sums([0, 0, 0]), counts])
        images = batch[0][valid]
        # No noise, hard codes: the reconstruction from the argmax tokens, which BEiT predicts.
        recon, logits = module(images, 1.0, hard=True, noise=torch.zeros((), device=images.device))
        mse = (recon.float() - images.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
        counts += torch.bincount(logits.argmax(dim=1).flatten().cpu(), minlength=logits.shape[1]).double()
        return torch.cat([as_sums([mse.sum(), kl_to_uniform(logits).sum(), len(images)]), counts])

    def eval_metrics(self, sums: Tensor) -> dict[str, float]:
        n = max(sums[2].item(), 1.0)
        recon, kl = sums[0].item() / n, sums[1].item() / n
        counts = sums[len(_FIXED_KEYS):]
        if self._dvae is not None:
            self._dvae.usage_counts = counts.clone()  # for the usage histogram (orchestration's sink)
        usage = codebook_usage(counts)
        return {"eval_loss": recon + self.cfg.kl_weight * kl / self._pixels_per_token(), "eval_recon_mse": recon,
                "eval_kl": kl, "eval_samples": sums[2].item(), "eval_codebook_used": usage["used"],
                "eval_codebook_dead": usage["dead"], "eval_codebook_perplexity": usage["perplexity"]}

"""The launch's rules for a tokenizer run (``model.kind="dvae"``, docs/tokenizer.md): it needs an
eval split (its codebook usage is measured there), its end-of-run summary line, its registry tags,
and the failure rule: a tokenizer whose final codebook usage is under
``train.objective.min_usage`` is a failed run, not registered.
"""

from __future__ import annotations

from typing import Any

from orchestration.experiment.config import Experiment


class CodebookUsageError(RuntimeError):
    """A tokenizer run ended using too little of its codebook (or was never measured)."""


def is_tokenizer(exp: Experiment) -> bool:
    return exp.model.kind == "dvae"


def eval_split_problem(exp: Experiment, eval_split: str | None, data_url: str) -> str | None:
    """One line when a tokenizer run would have no eval split to measure its codebook on."""
    if not is_tokenizer(exp) or eval_split is not None:
        return None
    asked = exp.eval.split
    why = f"the dataset has no {asked!r} split" if asked else "eval.split is none"
    return (f"--data {data_url}: a tokenizer run measures its codebook usage on an eval split and {why}; write the "
            "shards with a validation split (write_shards --val-fraction 0.05) or name one: --set eval.split=NAME")


def registry_tags(exp: Experiment) -> dict[str, Any]:
    """What BEiT checks a tokenizer against: vocabulary, patch and image size."""
    if not is_tokenizer(exp):
        return {}
    return {"vocab_size": exp.model.vocab_size, "patch_size": exp.model.patch_size, "image_size": exp.image_size,
            "tokenizer": "dvae"}


def usage_verdict(exp: Experiment, report: dict[str, Any]) -> tuple[bool, str]:
    """(passed, the summary line) of a finished tokenizer run's report (its final eval metrics)."""
    o = exp.train.objective
    vocab = exp.model.vocab_size
    used = report.get("eval_codebook_used")
    if used is None:
        return False, (f"[tokenizer] FAILED: no codebook usage was measured (no final evaluation); the run needs an "
                       f"eval split (eval.split={exp.eval.split!r})")
    dead = int(report.get("eval_codebook_dead", 0))
    line = (f"[tokenizer] codebook usage {used:.3f} ({vocab - dead}/{vocab} codes used, {dead} dead), perplexity "
            f"{report.get('eval_codebook_perplexity', float('nan')):.1f} of {vocab}, reconstruction mse "
            f"{report.get('eval_recon_mse', float('nan')):.4f} from hard tokens, over "
            f"{int(report.get('eval_samples', 0))} eval images")
    if used >= o.min_usage:
        return True, f"{line}: OK (train.objective.min_usage={o.min_usage})"
    return False, (f"{line}: FAILED, under train.objective.min_usage={o.min_usage}; the tokenizer is not registered. "
                   f"Codes die when the encoder commits early: raise train.objective.kl_weight (now {o.kl_weight}; "
                   f"DALL-E: 6.6) or train.objective.tau_steps (now {o.tau_steps}), lower train.optim.lr (now "
                   f"{exp.train.optim.lr:g}), train longer (train.schedule.total_steps), or use a smaller "
                   f"vocabulary (model.vocab_size={vocab}) for this much data")

"""#26, BEiT's tokenizer stage (docs/tokenizer.md): the dVAE objective's schedules, ZeRO-1 on 1 vs 2
processes and kill + resume (the rank-equivalence check every objective shares,
tests/test_training_dist.py), the documented digits commands through pretrain.py and Ray (the
tokenizer uses most of its codebook, is registered with its vocabulary and patch size, logs its
figures; a run that cannot use half its codebook fails and registers nothing), and the refusals
before Ray."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "tokenizer.md"
#: "Most of its codebook": the digits recipe measured 32/32 codes used (perplexity 20.4) on 359 eval images.
MIN_DIGITS_USAGE = 0.75


def test_temperature_and_kl_weight_follow_dalles_schedules() -> None:
    from training.objectives import DVAEObjectiveConfig

    cfg = DVAEObjectiveConfig()  # DALL-E's numbers (Appendix A.2)
    assert (cfg.tau_at(0), cfg.tau_at(150_000), cfg.tau_at(10**6)) == (1.0, 1 / 16, 1 / 16)
    assert cfg.tau_at(75_000) == pytest.approx((1 + 1 / 16) / 2)  # cosine: halfway at half time
    assert (cfg.beta_at(0), cfg.beta_at(5_000), cfg.beta_at(10**6)) == (0.0, 6.6, 6.6)
    assert 0 < cfg.beta_at(1_000) < cfg.beta_at(4_000) < 6.6


@pytest.mark.integration
def test_zero1_two_processes_match_one_and_resume_exactly(tmp_path: Path) -> None:
    """2 ranks == 1 rank x accumulation 2 (losses to 1e-5, weights to fp32 round-off; the temperature,
    KL weight and Gumbel noise depend on the optimizer step and the micro-batch's place, not on the
    rank's generator), the loss goes down, and a run killed at step 5 and resumed is loss for loss
    the straight one."""
    from test_training_dist import _ranks_agree_and_resume_exactly, _spawn, _tail, _wait

    runs = {world: (_spawn("dvae", tmp_path, world, tmp_path / f"dvae{world}.log"), tmp_path / f"dvae{world}.log")
            for world in (2, 1)}
    for world, (procs, log) in runs.items():
        assert _wait(procs, log) == [0] * world, _tail(log)
    w1 = _ranks_agree_and_resume_exactly(tmp_path, "dvae", 1)
    assert {k.split(".")[0] for k in w1} == {"encoder", "codebook", "decoder"}


def _documented_commands() -> list[list[str]]:
    text = DOC.read_text()
    block = text[text.index("## Running it"):].split("```")[1]
    return [shlex.split(line) for line in block.strip().splitlines()]


@pytest.mark.integration
def test_documented_digits_run_uses_its_codebook_and_a_run_with_dead_codes_fails(tmp_path: Path) -> None:
    """docs/tokenizer.md's commands as written (local folders for /tmp): the tokenizer trains through
    pretrain.py on Ray (2 workers), ends with the usage summary line, uses most of its codebook, is
    registered with vocab_size / patch_size / image_size and logs its reconstructions and usage
    histogram. Then the same recipe with a vocabulary of 16384 (more codes than the 5744 tokens of
    the eval split: at most 35 % usable) ends FAILED under min_usage 0.5: exit 4, an error naming
    what to change, nothing registered."""

    from pipeline import demo_data, write_shards

    commands = _documented_commands()
    assert [c[1] if c[1] != "-m" else c[2] for c in commands] == [
        "pipeline.demo_data", "pipeline.write_shards", "orchestration/pretrain.py", "orchestration/pretrain.py"], commands
    local = {a: str(tmp_path / Path(a).name) for c in commands for a in c if a.startswith("/tmp/")}
    for argv in commands[:2]:
        {"pipeline.demo_data": demo_data.main, "pipeline.write_shards": write_shards.main}[argv[2]](
            [local.get(a, a) for a in argv[3:]])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--storage", str(tmp_path / "runs"), "--tracking-uri", uri]
    good = [local.get(a, a) for a in commands[2][2:]] + common
    # Stage 2 as documented, shortened: BEiT on the registered tokenizer's tokens.
    beit = [local.get(a, a) for a in commands[3][2:]] + common + [
        "--set", "train.schedule.total_steps=20", "--set", "train.schedule.warmup_steps=2",
        "--set", "train.eval_every=20", "--set", "train.checkpoint.every=0"]
    dead = good + ["--set", "model.vocab_size=16384", "--set", "train.schedule.total_steps=2",
                   "--set", "train.schedule.warmup_steps=0", "--run-name", "dead"]
    out = tmp_path / "driver.json"
    proc = subprocess.run([sys.executable, __file__, str(out), json.dumps([good, beit, dead])], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    rcs = json.loads(out.read_text())
    assert rcs == [0, 0, 4], log[-4000:]

    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[tokenizer]")]
    assert len(lines) == 2 and lines[0].endswith("OK (train.objective.min_usage=0.5)"), lines
    results = [json.loads(ln.split(" ", 1)[1]) for ln in proc.stdout.splitlines() if ln.startswith("VITSCALE_RESULT ")]
    result = results[0]
    m = result["metrics"]
    print(f"digits tokenizer: codebook usage {m['eval_codebook_used']:.3f} ({32 - int(m['eval_codebook_dead'])}/32), "
          f"perplexity {m['eval_codebook_perplexity']:.1f}, recon mse {m['eval_recon_mse']:.4f}")
    assert m["eval_codebook_used"] >= MIN_DIGITS_USAGE and m["eval_codebook_perplexity"] > 8, m
    assert result["model_name"] == "dvae-v32p4-digits" and result["model_version"] == 1
    beit_result = results[1]
    assert beit_result["model_name"] == "beit-mu-digits", beit_result
    bm = beit_result["metrics"]
    assert bm["step"] == 20 and 0 <= bm["eval_mim_acc"] <= 1 and bm["eval_loss"] > 0, bm

    from orchestration import tracking

    # tracking.client sets the registry URI too: MlflowClient(uri) alone would read the registry an
    # earlier test module left as mlflow's global one (seen in the full suite).
    c = tracking.client(uri)
    version = c.get_model_version("dvae-v32p4-digits", "1")
    assert {k: version.tags[k] for k in ("vocab_size", "patch_size", "image_size", "objective")} == {
        "vocab_size": "32", "patch_size": "4", "image_size": "16", "objective": "dvae"}
    run_id = result["run_id"]
    steps = [a.path for a in c.list_artifacts(run_id, "reconstruction")]
    figures = {a.path.rsplit("/", 1)[1] for a in c.list_artifacts(run_id, steps[-1])}
    assert figures == {"reconstruction.png", "codebook_usage.png"}, figures

    tokenizer = tracking.load_model("models:/dvae-v32p4-digits/1", uri=uri)
    assert (tokenizer.vocab_size, tokenizer.patch_size, tokenizer.image_size) == (32, 4, 16)
    # Served (the registered pyfunc), it answers every patch's visual token, as tokenize() does on
    # the eval transform of its recipe.
    import mlflow
    import pandas as pd
    import torch

    from orchestration.experiment import get_recipe
    from pipeline.decode import decode_eval

    pyfunc = mlflow.pyfunc.load_model("models:/dvae-v32p4-digits/1")  # the URIs tracking.client set
    images = [p.read_bytes() for p in sorted((tmp_path / "digits16-raw").rglob("*.jpg"))[:3]]
    served = pyfunc.predict(pd.DataFrame({"image": images}))
    assert list(served.columns) == ["tokens"], served.columns
    pre = get_recipe("dvae_tokenizer_digits").data.preprocess
    mean, std = torch.tensor(pre.mean).view(3, 1, 1), torch.tensor(pre.std).view(3, 1, 1)
    for data, tokens in zip(images, served["tokens"], strict=True):
        x = torch.from_numpy(decode_eval(data, size=16, crop_pct=pre.eval_crop_pct)).permute(2, 0, 1).float() / 255
        assert list(tokens) == tokenizer.tokenize(((x - mean) / std)[None])[0].tolist(), tokens

    assert "FAILED, under train.objective.min_usage=0.5" in lines[1] and "16384" in lines[1], lines[1]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: [tokenizer]")]
    assert errors and "raise train.objective.kl_weight" in errors[0] and "smaller vocabulary" in errors[0], errors
    failed = [r for r in c.search_runs([r.info.experiment_id for r in [c.get_run(run_id)]])
              if r.info.run_name == "dead"]
    assert len(failed) == 1 and failed[0].info.status == "FAILED"
    assert not c.search_model_versions("name='dvae-v16384p4-digits'")


def test_bad_tokenizer_settings_fail_before_ray(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A patch size that is not a power of two, an image size that is not a multiple of it and a run
    without eval split: one error line each from the dry run (nothing started); a tokenizer model
    under another objective is refused by the Experiment itself."""
    from orchestration import pretrain
    from pipeline import write_dataset
    from pipeline.demo_data import make_digits_folder

    make_digits_folder(tmp_path / "src", image_size=16, limit=100)
    data = str(tmp_path / "ds")
    write_dataset(tmp_path / "src", data, samples_per_shard=100, val_fraction=0.25, progress=False)
    base = ["--recipe", "dvae_tokenizer_digits", "--data", data, "--storage", str(tmp_path / "runs"), "--dry-run"]

    def errors(*sets: str) -> list[str]:
        rc = pretrain.main(base + [a for s in sets for a in ("--set", s)])
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert (rc == 2) == bool(lines), (rc, lines)
        return lines

    assert errors() == []
    assert any("patch_size=6 must be a power of two" in ln for ln in errors("model.patch_size=6")), errors(
        "model.patch_size=6")
    assert any("image_size=18 must be a multiple of patch_size=4" in ln for ln in errors("image_size=18"))
    assert any("eval.split=none: a tokenizer run measures its codebook usage" in ln
               for ln in errors("eval.split=none"))
    from dataclasses import replace

    from orchestration.experiment import get_recipe
    from training.objectives import MAEConfig

    exp = get_recipe("dvae_tokenizer_digits")
    with pytest.raises(ValueError, match="a dVAE tokenizer .* trains with the dVAE objective"):
        replace(exp, train=replace(exp.train, objective=MAEConfig()))


if __name__ == "__main__":  # the driver: pretrain.main on each argv in one process (one private Ray)
    from orchestration import pretrain

    codes = [pretrain.main(argv) for argv in json.loads(sys.argv[2])]
    Path(sys.argv[1]).write_text(json.dumps(codes))

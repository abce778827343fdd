"""Slow accuracy test (#25): DeiT's hard distillation from a convnet teacher helps a data-starved ViT.

Real path end to end, without Ray or MLflow: scikit-learn digits at 16 px -> shards, half held
out (898 images) -> the recipe ``deit_teacher_digits`` (timm's ``test_resnet`` from the zoo, on
the whole train split of 899; trained by ``build_run`` as a Ray worker does, exported as a run
exports it), then ``deit_mu_distilled_digits`` (the mu ViT with a distillation token on the
first 90 train images, the teacher loaded from that export by ``orchestration.launch.teacher``)
and its control ``vit_mu_digits_few`` (the same ViT without token or teacher), same data, steps
and seed. The training runs in a subprocess so that the test process never holds a DeepSpeed
process group.

Measured (``python tests/test_distill_digits.py DIR SEED``, a 2-core machine; teacher / plain /
distilled student held-out top-1):

    seed  teacher  plain  distilled (cls / dist)  margin
       0     99.2   80.0       89.3 (88.5 / 89.6)  +9.4
       1     99.1   86.1       87.6 (86.6 / 87.8)  +1.6
       2     99.0   82.5       90.2 (87.6 / 91.3)  +7.7
       3     99.1   84.5       89.3 (87.1 / 90.0)  +4.8
       4     98.7   81.8       89.1 (86.6 / 89.9)  +7.2
       5     98.6   83.0       88.5 (87.5 / 89.2)  +5.6
       6     98.8   86.3       87.5 (86.5 / 87.5)  +1.2
       7     99.0   82.2       89.5 (86.7 / 89.2)  +7.3
    mean     98.9   83.3       88.9 (87.2 / 89.3)  +5.6

Every seed gains, by 1.2 to 9.4 points (the ViT alone varies more from seed to seed than the
distilled one). The test runs seed 0 (about a minute; ``OMP_NUM_THREADS=1`` keeps it
reproducible) and asserts a gain of at least MARGIN = 1 point, below the smallest one measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARGIN = 0.01  # the smallest gain measured over 8 seeds was 0.0122 (seed 6)


def _fit(exp: Any, work: Path, key: str, export: Path | None = None) -> dict[str, float]:
    """Train ``exp`` on this process (rank 0 of 1) as a Ray worker would; optionally export it."""
    import dataclasses

    from orchestration.launch.build import build_run
    from training.checkpoint import export_weights

    trainer, _ = build_run(exp, rank=0, world=1, checkpoint_url=str(work / f"ck_{key}"), checkpoint_key=key)
    result = trainer.fit()
    if export is not None:
        cfg = json.dumps(dataclasses.asdict(trainer.model.cfg))
        export_weights(trainer.engine, export, metadata={"vitscale.config": cfg, "vitscale.objective": "classification"})
    return result


def distil_digits(work: Path, seed: int) -> dict[str, Any]:
    """Shards, the teacher, the distilled student and the plain one; their held-out metrics."""
    from orchestration.experiment import apply_overrides, get_recipe
    from pipeline import write_dataset
    from pipeline.demo_data import make_digits_folder

    url = str(work / "ds")
    make_digits_folder(work / "src", image_size=16)
    write_dataset(work / "src", url, samples_per_shard=300, val_fraction=0.5, seed=0, progress=False)
    sets = [f"data.source.url={url}", f"train.seed={seed}", f"data.seed={seed}"]
    t0 = time.monotonic()
    teacher = _fit(apply_overrides(get_recipe("deit_teacher_digits"), sets), work, "teacher", work / "teacher.safetensors")
    t1 = time.monotonic()
    student = apply_overrides(get_recipe("deit_mu_distilled_digits"), sets)
    student = replace(student, train=replace(student.train, objective=replace(
        student.train.objective, teacher=str(work / "teacher.safetensors"))))
    distilled = _fit(student, work, "distilled")
    t2 = time.monotonic()
    plain = _fit(apply_overrides(get_recipe("vit_mu_digits_few"), sets), work, "plain")
    t3 = time.monotonic()
    return {"seed": seed, "teacher": teacher["eval_top1"], "plain": plain["eval_top1"],
            "distilled": distilled["eval_top1"], "cls": distilled["eval_top1_cls"],
            "dist": distilled["eval_top1_dist"], "teacher_in_student_eval": distilled["eval_top1_teacher"],
            "margin": distilled["eval_top1"] - plain["eval_top1"], "eval_samples": plain["eval_samples"],
            "seconds": {"teacher": t1 - t0, "distilled": t2 - t1, "plain": t3 - t2}}


@pytest.mark.slow
def test_hard_distillation_from_a_convnet_beats_the_same_vit_alone(tmp_path: Path) -> None:
    # one thread: the loader's worker has the other core, and the result does not depend on the
    # machine's core count (the order of float reductions does)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, __file__, str(tmp_path), "0"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "result.json").read_text())
    print(f"distillation on digits: {r} in {time.monotonic() - t0:.0f}s")
    assert r["eval_samples"] >= 890  # the whole held-out split, each image once
    assert r["teacher"] > r["plain"] + 0.05, r  # a convnet teacher that is better than the ViT alone
    assert r["teacher_in_student_eval"] == pytest.approx(r["teacher"])  # the export is the trained teacher
    assert r["margin"] >= MARGIN, r


def _documented_commands() -> list[list[str]]:
    """The commands of docs/distillation.md's first bash block ("Running it"), as argv lists."""
    import shlex

    text = (ROOT / "docs" / "distillation.md").read_text()
    block = text.split("## Running it", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line.split("#", 1)[0]) for line in lines if line.strip()]


def test_the_documented_digits_commands_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """docs/distillation.md's commands as written (local paths for /tmp and s3://, pretrain.py with
    --dry-run and a local MLflow store): the shards, the teacher, the student distilling from the
    registered teacher (``models:/deit-teacher-digits/latest`` pinned to its version), the control;
    and the student recipe's own ``@champion`` teacher once the alias is set."""
    from model import TimmSpec, build_network
    from orchestration import pretrain, tracking
    from pipeline import demo_data, write_shards

    commands = _documented_commands()
    assert [c[1] if c[1] != "-m" else c[2] for c in commands] == [
        "pipeline.demo_data", "pipeline.write_shards", "orchestration/pretrain.py", "orchestration/pretrain.py",
        "orchestration/pretrain.py"], commands
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    local = {"/tmp/digits16": str(tmp_path / "digits16"), "s3://vitscale/digits-16": str(tmp_path / "digits-16")}
    resolved: dict[str, dict[str, Any]] = {}
    for argv in commands:
        argv = [local.get(a, a) for a in argv]
        if argv[1] == "-m":
            {"pipeline.demo_data": demo_data.main, "pipeline.write_shards": write_shards.main}[argv[2]](argv[3:])
            continue
        capsys.readouterr()
        rc = pretrain.main(argv[2:] + ["--dry-run", "--storage", str(tmp_path / "runs"), "--tracking-uri", uri])
        out = capsys.readouterr()
        assert rc == 0, out.err
        exp = json.loads(out.out[out.out.index("{"):])
        resolved[exp["name"]] = exp
        if exp["name"] == "deit_teacher_digits":  # what the teacher's run would register
            teacher = build_network(TimmSpec(name="test_resnet").config(num_classes=10, image_size=16))
            run_id = tracking.start_run("teachers", run_name="deit_teacher_digits", uri=uri)
            tracking.log_and_register_model(teacher, run_id=run_id, name="deit-teacher-digits", tags={}, uri=uri)
    assert set(resolved) == {"deit_teacher_digits", "deit_mu_distilled_digits", "vit_mu_digits_few"}
    student = resolved["deit_mu_distilled_digits"]
    assert student["train.objective.teacher"] == "models:/deit-teacher-digits/1"
    assert student["model.distilled"] is True and student["data.source.limit_samples"] == 90
    assert resolved["vit_mu_digits_few"]["data.source.limit_samples"] == 90
    tracking.client(uri).set_registered_model_alias("deit-teacher-digits", "champion", "1")
    rc = pretrain.main(["--recipe", "deit_mu_distilled_digits", "--data", local["s3://vitscale/digits-16"],
                        "--storage", str(tmp_path / "runs"), "--tracking-uri", uri, "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and json.loads(out[out.index("{"):])["train.objective.teacher"] == "models:/deit-teacher-digits/1"


if __name__ == "__main__":
    out = Path(sys.argv[1])
    res = distil_digits(out, int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    (out / "result.json").write_text(json.dumps(res))
    print(json.dumps(res))

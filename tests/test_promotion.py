"""Aliases and promotion (issue #27): every tool that takes a model takes ``models:/NAME@ALIAS``;
``evaluate.py ... --promote champion`` moves the alias only when the candidate's metric beats the
current champion's (measured the same way, in the same command), and records both numbers.

Two registered models on a digits dataset: v1 sees nothing (zero patch embedding: every image
gives the same features, so few-shot accuracy is chance), v2 is a random ViT (random features of
digits separate the classes well above chance).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from orchestration import evaluate, tracking, visualize

IMAGE = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from model import create_model
    from pipeline import write_dataset
    from pipeline.demo_data import make_digits_folder

    tmp = tmp_path_factory.mktemp("promote")
    url = str(tmp / "digits")
    write_dataset(make_digits_folder(tmp / "src", image_size=IMAGE, limit=300), url, samples_per_shard=200,
                  val_fraction=0.3, seed=0, progress=False)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    torch.manual_seed(0)
    blind = create_model("mu/4", num_classes=10, image_size=IMAGE).eval()
    with torch.no_grad():
        blind.patch_embed.proj.weight.zero_()
        blind.patch_embed.proj.bias.zero_()
    seeing = create_model("mu/4", num_classes=10, image_size=IMAGE).eval()
    run_id = tracking.start_run("promote-test", run_name="src", uri=uri)
    for m in (blind, seeing):
        tracking.log_and_register_model(m, run_id=run_id, name="vit-p", tags={}, uri=uri)
    tracking.client(uri).set_registered_model_alias("vit-p", "champion", "1")
    return {"url": url, "uri": uri, "tmp": tmp}


def _fewshot(setup: dict[str, Any], model: str, *extra: str) -> int:
    return evaluate.main(["fewshot", "--model", model, "--data", f"digits={setup['url']}", "--shots", "5",
                          "--device", "cpu", "--tracking-uri", setup["uri"], *extra])


def test_promote_moves_the_alias_only_for_a_better_version(setup: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    c = tracking.client(setup["uri"])
    assert _fewshot(setup, "models:/vit-p/2", "--promote", "champion", "--metric", "fewshot/digits/5shot") == 0
    out = capsys.readouterr().out
    assert "evaluating the current champion models:/vit-p/1" in out and ": promoted" in out
    assert str(c.get_model_version_by_alias("vit-p", "champion").version) == "2"
    tags = c.get_model_version("vit-p", "2").tags
    assert tags["promote.champion.metric"] == "fewshot/digits/5shot" and tags["promote.champion.champion_version"] == "1"
    new, old = float(tags["promote.champion.value"]), float(tags["promote.champion.champion_value"])
    assert new > old and old < 0.25 and tags["promote.champion.decision"] == "promoted"

    # The worse version does not take the alias back; its numbers are recorded all the same.
    assert _fewshot(setup, "models:/vit-p/1", "--promote", "champion") == 0  # one number: --metric not needed
    assert "kept champion on version 2" in capsys.readouterr().out
    assert str(c.get_model_version_by_alias("vit-p", "champion").version) == "2"
    tags1 = c.get_model_version("vit-p", "1").tags
    assert float(tags1["promote.champion.value"]) == pytest.approx(old, abs=1e-6)
    assert float(tags1["promote.champion.champion_value"]) == pytest.approx(new, abs=1e-6)
    assert tags1["promote.champion.decision"] == "kept champion on version 2"


def test_promote_needs_one_metric_and_a_registered_model(setup: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    rc = evaluate.main(["fewshot", "--model", "models:/vit-p/2", "--data", f"digits={setup['url']}", "--shots", "1,5",
                        "--tracking-uri", setup["uri"], "--promote", "champion"])
    err = capsys.readouterr().err
    assert rc == 2 and "choose one with --metric" in err and "fewshot/digits/5shot" in err
    rc = evaluate.main(["fewshot", "--model", str(setup["tmp"] / "x.safetensors"), "--data", setup["url"],
                        "--tracking-uri", setup["uri"], "--promote", "champion"])
    assert rc == 2 and "--promote needs a registered --model" in capsys.readouterr().err


def test_every_model_tool_takes_an_alias(setup: dict[str, Any], tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    uri = setup["uri"]
    tracking.client(uri).set_registered_model_alias("vit-p", "staging", "2")
    # evaluate.py
    assert _fewshot(setup, "models:/vit-p@staging") == 0
    assert "fewshot/digits/5shot" in capsys.readouterr().out
    # visualize.py
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype("uint8")).save(tmp_path / "x.jpg")
    assert visualize.main(["--model", "models:/vit-p@staging", "--tracking-uri", uri, "--image",
                           str(tmp_path / "x.jpg"), "--out", str(tmp_path / "out")]) == 0
    # finetune.py's --from: resolved to the version the alias points at, loaded from there
    src = tracking.resolve_model_source("models:/vit-p@staging", uri)
    assert src["uri"] == "models:/vit-p/2" and src["version"] == 2
    x = torch.randn(1, 3, IMAGE, IMAGE)
    torch.testing.assert_close(tracking.load_model("models:/vit-p@staging", uri)(x),
                               tracking.load_model("models:/vit-p/2", uri)(x))
    with pytest.raises(LookupError, match="has no alias 'nope'"):
        tracking.resolve_model_source("models:/vit-p@nope", uri)

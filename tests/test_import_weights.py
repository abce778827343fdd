"""Importing the paper's checkpoints (issue #27): ``.npz`` in the layouts Google released (classic
google-research/vision_transformer, big_vision with ``params/`` and stacked blocks) and timm
safetensors, compared logit for logit with timm's own loaders of the same files; bad files
(pickles, missing or misshaped arrays) are refused naming the problem; the registry import
records lineage and serves.

The ``.npz`` files are written here from a random timm model in exactly the Flax layout (HWIO
kernels, (D, heads, head_dim) attention kernels), then read by
``timm.models.vision_transformer._load_weights`` (the reference) and by ``model.npz`` (ours).
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

from model.npz import CheckpointError, load_npz, read_npz

D, H, P, IMG, DEPTH, MLP, CLASSES = 32, 2, 8, 32, 2, 64, 7


def _timm_model(**kw: object) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(img_size=IMG, patch_size=P, embed_dim=D, depth=DEPTH, num_heads=H, mlp_ratio=MLP / D,
                          num_classes=CLASSES, **kw).eval()
    with torch.no_grad():  # timm zero-initialises the head and cls/pos: make every weight count
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _to_flax(m: torch.nn.Module, layout: str) -> dict[str, np.ndarray]:
    """A timm ViT's weights in the Flax layout ``layout`` ("classic", "big_vision", "stacked")."""
    sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    classic = layout == "classic"
    pre = "" if classic else "params/"
    names = (("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3") if classic else
             ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"))
    ln1, att, ln2, mlp = names
    out = {f"{pre}embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
           f"{pre}embedding/bias": sd["patch_embed.proj.bias"],
           f"{pre}Transformer/encoder_norm/scale": sd["norm.weight"], f"{pre}Transformer/encoder_norm/bias": sd["norm.bias"],
           f"{pre}head/kernel": sd["head.weight"].T, f"{pre}head/bias": sd["head.bias"]}
    if "cls_token" in sd:
        out[f"{pre}cls"] = sd["cls_token"]
    out[f"{pre}Transformer/posembed_input/pos_embedding" if classic else f"{pre}pos_embedding"] = sd["pos_embed"]
    blocks = []
    for i in range(DEPTH):
        b = f"blocks.{i}."
        q, k, v = np.split(sd[b + "attn.qkv.weight"], 3)
        qb, kb, vb = np.split(sd[b + "attn.qkv.bias"], 3)
        blocks.append({
            f"{ln1}/scale": sd[b + "norm1.weight"], f"{ln1}/bias": sd[b + "norm1.bias"],
            f"{ln2}/scale": sd[b + "norm2.weight"], f"{ln2}/bias": sd[b + "norm2.bias"],
            **{f"{att}/{n}/kernel": w.T.reshape(D, H, D // H) for n, w in (("query", q), ("key", k), ("value", v))},
            **{f"{att}/{n}/bias": w.reshape(H, D // H) for n, w in (("query", qb), ("key", kb), ("value", vb))},
            f"{att}/out/kernel": sd[b + "attn.proj.weight"].T.reshape(H, D // H, D), f"{att}/out/bias": sd[b + "attn.proj.bias"],
            f"{mlp}/Dense_0/kernel": sd[b + "mlp.fc1.weight"].T, f"{mlp}/Dense_0/bias": sd[b + "mlp.fc1.bias"],
            f"{mlp}/Dense_1/kernel": sd[b + "mlp.fc2.weight"].T, f"{mlp}/Dense_1/bias": sd[b + "mlp.fc2.bias"],
        })
    if layout == "stacked":
        for key in blocks[0]:
            out[f"{pre}Transformer/encoderblock/{key}"] = np.stack([blk[key] for blk in blocks])
    else:
        for i, blk in enumerate(blocks):
            out.update({f"{pre}Transformer/encoderblock_{i}/{k}": v for k, v in blk.items()})
    return out


def _timm_reference(path: Path, **kw: object) -> torch.nn.Module:
    """timm's own loader of the same file, into a fresh timm model of the same shape."""
    from timm.models.vision_transformer import VisionTransformer, _load_weights

    m = VisionTransformer(img_size=IMG, patch_size=P, embed_dim=D, depth=DEPTH, num_heads=H, mlp_ratio=MLP / D,
                          num_classes=CLASSES, **kw).eval()
    with torch.no_grad():
        _load_weights(m, str(path))
    return m


# (layout, timm kwargs): the class-token model (posemb over cls + patches), big_vision's class
# token without a position (no_embed_class) and its global-average-pool model, flat and stacked.
CASES = [
    ("classic", {}),
    ("big_vision", {"no_embed_class": True}),
    ("big_vision", {"class_token": False, "global_pool": "avg", "fc_norm": False}),
    ("stacked", {"no_embed_class": True}),
    ("stacked", {"class_token": False, "global_pool": "avg", "fc_norm": False}),
]


@pytest.mark.parametrize(("layout", "kw"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_npz_import_matches_timm_loader(tmp_path: Path, layout: str, kw: dict) -> None:
    path = tmp_path / "vit.npz"
    np.savez(path, **_to_flax(_timm_model(**kw), layout))
    ref = _timm_reference(path, **kw)
    ours, info = load_npz(path)
    assert info["layout"] == ("classic" if layout == "classic" else "big_vision")
    assert info["stacked"] == (layout == "stacked") and info["prefix"] == ("" if layout == "classic" else "params/")
    cfg = ours.cfg
    assert (cfg.width, cfg.depth, cfg.heads, cfg.mlp_dim, cfg.patch_size, cfg.image_size, cfg.num_classes) == \
        (D, DEPTH, H, MLP, P, IMG, CLASSES)
    assert cfg.pool == ("gap" if kw.get("class_token") is False else "cls")
    x = torch.randn(3, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_timm_safetensors_import_matches_timm_loader(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from timm.models import load_checkpoint
    from timm.models.vision_transformer import VisionTransformer

    from orchestration.tracking.importer import read_checkpoint

    src = _timm_model()
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    ref = VisionTransformer(img_size=IMG, patch_size=P, embed_dim=D, depth=DEPTH, num_heads=H, mlp_ratio=MLP / D,
                            num_classes=CLASSES).eval()
    load_checkpoint(ref, str(path))
    # A timm state dict does not store the head count: the shape's paper variant (mu/8) gives it.
    ours, info = read_checkpoint(path)
    assert info["format"] == "timm-safetensors" and ours.cfg.heads == H and ours.cfg.variant == "mu/8"
    with pytest.raises(CheckpointError, match="--variant S/8 does not match the file: width 32 in the file, 384"):
        read_checkpoint(path, variant="S/8")
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_bad_files_are_refused_naming_the_problem(tmp_path: Path) -> None:
    arrays = _to_flax(_timm_model(), "classic")
    broken = dict(arrays)
    del broken["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"]
    np.savez(tmp_path / "missing.npz", **broken)
    with pytest.raises(CheckpointError, match=r"missing array 'Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel'"):
        load_npz(tmp_path / "missing.npz")
    bad = dict(arrays, **{"Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel": np.zeros((2, 16, 31),
                                                                                                           np.float32)})
    np.savez(tmp_path / "shape.npz", **bad)
    with pytest.raises(CheckpointError, match=r"'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel' "
                                              r"has shape \(2, 16, 31\), expected \(2, 16, 32\)"):
        load_npz(tmp_path / "shape.npz")
    with pytest.raises(CheckpointError, match="--variant B/16 does not match the checkpoint: width 32"):
        np.savez(tmp_path / "ok.npz", **arrays)
        load_npz(tmp_path / "ok.npz", variant="B/16")
    # An object array would be unpickled by numpy (allow_pickle=True): ours refuses it, naming it.
    np.savez(tmp_path / "obj.npz", **arrays, evil=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match=r"array 'evil' holds Python objects"):
        read_npz(tmp_path / "obj.npz")
    # A pickle, and a PyTorch checkpoint (a zip holding data.pkl), are refused before being read.
    (tmp_path / "w.npz").write_bytes(pickle.dumps({"embedding/kernel": [1.0]}))
    with pytest.raises(CheckpointError, match="is a pickle file"):
        read_npz(tmp_path / "w.npz")
    torch.save({"x": torch.zeros(2)}, tmp_path / "w.pth")
    from orchestration.tracking.importer import read_checkpoint

    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(tmp_path / "w.pth")
    (tmp_path / "zip.npz").write_bytes((tmp_path / "w.pth").read_bytes())
    with pytest.raises(CheckpointError, match="PyTorch .pickle. checkpoint"):
        read_npz(tmp_path / "zip.npz")


def test_augreg_names_become_tags() -> None:
    from orchestration.tracking.importer import parse_augreg_name

    tags = parse_augreg_name("B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-"
                             "res_384.npz")
    assert tags == {"augreg.model": "B_16", "augreg.variant": "B/16", "augreg.pretrain_dataset": "i21k",
                    "augreg.pretrain_epochs": "300", "augreg.pretrain_lr": "0.001", "augreg.pretrain_aug": "medium1",
                    "augreg.pretrain_wd": "0.1", "augreg.pretrain_do": "0.0", "augreg.pretrain_sd": "0.0",
                    "augreg.finetune_dataset": "imagenet2012", "augreg.finetune_steps": "20k",
                    "augreg.finetune_lr": "0.01", "augreg.finetune_res": "384"}
    assert parse_augreg_name("Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz")["augreg.variant"] == "Ti/16"
    assert parse_augreg_name("ViT-B_16.npz") == {}


@pytest.mark.integration
def test_import_cli_registers_with_lineage_and_serves(tmp_path: Path) -> None:
    """The CLI on an AugReg-named big_vision file: a registered pyfunc whose prediction equals
    timm's model on the same image, with the file's sha256 and AugReg settings as tags."""
    import hashlib
    import io

    import mlflow
    import pandas as pd
    from PIL import Image

    from orchestration import tracking
    from pipeline.decode import decode_eval

    kw = {"no_embed_class": True}
    name = "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.03-res_224.npz"
    path = tmp_path / name
    np.savez(path, **_to_flax(_timm_model(**kw), "stacked"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "classes.txt").write_text("\n".join(f"class {i}" for i in range(CLASSES)))
    out = subprocess.run([sys.executable, "orchestration/import_weights.py", str(path), "--name", "vit-imported",
                          "--classes", str(tmp_path / "classes.txt"), "--crop-pct", "0.875", "--tracking-uri", uri],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "models:/vit-imported/1"
    mv = tracking.client(uri).get_model_version("vit-imported", "1")
    assert mv.tags["source_file"] == name and mv.tags["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert mv.tags["source_format"] == "npz-big_vision" and mv.tags["source_stacked_blocks"] == "True"
    assert mv.tags["augreg.pretrain_aug"] == "light1" and mv.tags["augreg.finetune_res"] == "224"

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(1).random((45, 60, 3)) * 255).astype("uint8")).save(buf, "PNG")
    pyfunc = mlflow.pyfunc.load_model("models:/vit-imported/1")
    got = pyfunc.predict(pd.DataFrame({"image": [buf.getvalue()]}), params={"top_k": 3}).iloc[0]
    ref = _timm_reference(path, **kw)
    x = torch.from_numpy(decode_eval(buf.getvalue(), size=IMG, crop_pct=0.875)).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        p = ref((x / 255 - 0.5) / 0.5).softmax(-1)[0]
    top = p.topk(3)
    assert list(got["classes"]) == [f"class {i}" for i in top.indices.tolist()]
    np.testing.assert_allclose(got["probabilities"], top.values.numpy(), atol=1e-5)
    assert tracking.client(uri).get_run(mv.run_id).data.tags["source_file"] == name

    bad = subprocess.run([sys.executable, "orchestration/import_weights.py", str(tmp_path / "classes.txt"), "--name",
                          "x", "--tracking-uri", uri], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not an .npz" in bad.stderr

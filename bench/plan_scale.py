"""The scale simulation of docs/planning.md: ViT-B/16, L/16 and H/14 on ImageNet-21k and JFT-300M at
8, 64 and 512 GPUs, as ``orchestration/plan.py`` plans them (no GPU needed: nothing is run).

    .venv/bin/python bench/plan_scale.py [--gpu h100] [--gpus 8,64,512] [--storage-gbs 1.0] [--json OUT]

Prints one markdown table (the one in docs/planning.md) and, per row, what limits it first.
ViT-H/14 on ImageNet-21k has no recipe of its own: it is ``vit_h14_jft`` with the I21k dataset and
90 of its epochs (the B/16 and L/16 I21k recipes' length).
"""

from __future__ import annotations

if __package__ in (None, ""):
    import sys
    from pathlib import Path as _P

    sys.path.insert(0, str(_P(__file__).resolve().parents[1]))

import argparse
import json
from typing import Any

from orchestration.experiment import apply_overrides, get_recipe
from orchestration.experiment.recipes import I21K_IMAGES, PAPER_BATCH
from orchestration.planning import default_facts, get_device, plan
from orchestration.planning.devices import S3_GET_PER_PREFIX
from orchestration.planning.report import duration

RUNS = [  # (label, recipe, overrides)
    ("B/16 I21k", "vit_b16_i21k", []),
    ("L/16 I21k", "vit_l16_i21k", []),
    ("H/14 I21k", "vit_h14_jft", ["dataset_name=i21k", "train.objective.loss=softmax",
                                  f"train.schedule.total_steps={round(90 * I21K_IMAGES / PAPER_BATCH)}"]),
    ("B/16 JFT", "vit_b16_jft", []),
    ("L/16 JFT", "vit_l16_jft", []),
    ("H/14 JFT", "vit_h14_jft", []),
]


def limits(d: dict[str, Any]) -> str:
    """What gives out first in this plan, in the order a person would hit it."""
    m, c, data, ck = d["memory"], d["compute"], d["data"], d["checkpoint"]
    out = []
    if not m["fits"]:
        out.append("memory")
    if c["exposed_comm_s"] > 0.25 * c["step_s"]:
        out.append(f"collectives {c['exposed_comm_s'] / c['step_s'] * 100:.0f} % of the step")
    if d["micro_batch"] < 32:
        out.append(f"micro batch {d['micro_batch']} (MFU measured at 256)")
    if data["shards_per_loader_worker"] < 4:
        out.append(f"{data['shards_per_loader_worker']:.1f} shards per loader worker")
    if data["s3_requests_per_s"] > 0.5 * S3_GET_PER_PREFIX:
        out.append(f"S3 {data['s3_requests_per_s']:,.0f} GET/s (limit {S3_GET_PER_PREFIX:,} per prefix)")
    if data["decode_cores_per_node"] > data["cpus_per_node"]:
        out.append("decode cores")
    if ck["share"] > 0.02:
        out.append(f"checkpoint {ck['share'] * 100:.1f} % of the run")
    return "; ".join(out) or "nothing: compute-bound"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", default="h100")
    ap.add_argument("--gpus", default="8,64,512")
    ap.add_argument("--storage-gbs", type=float, default=1.0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    device = get_device(a.gpu)
    rows = []
    print("| run | GPUs | micro x accum | ZeRO / ckpt | GB per GPU | step | img/s | run | GPU-hours | data Gbit/s "
          "per node | decode cores per node | shards per rank | S3 GET/s | checkpoint: GB, save s, share of the run, GB/h | "
          "collectives not hidden | gives out first |")
    print("|" + "---|" * 16)
    for label, recipe, sets in RUNS:
        exp = apply_overrides(get_recipe(recipe), sets)
        for gpus in (int(g) for g in a.gpus.split(",")):
            d = plan(exp, device, gpus=gpus, data=default_facts(exp.dataset_name), storage_gbs=a.storage_gbs).to_dict()
            m, c, data, ck = d["memory"], d["compute"], d["data"], d["checkpoint"]
            rows.append({"run": label, **d})
            print(f"| {label} | {gpus} | {d['micro_batch']} x {d['grad_accum']} | {d['zero_stage']} / "
                  f"{'on' if d['activation_checkpointing'] else 'off'} | {m['peak'] / 1e9:.1f}"
                  f"{'' if m['fits'] else ' (no fit)'} | {c['step_s'] * 1e3:,.0f} ms | {c['images_per_s']:,.0f} | "
                  f"{duration(c['run_s'])} | {d['cost']['gpu_hours']:,.0f} | "
                  f"{data['bytes_per_s_per_node'] * 8 / 1e9:,.1f} | {data['decode_cores_per_node']:,.1f} | "
                  f"{data['shards_per_rank']:,.0f} | {data['s3_requests_per_s']:,.0f} | {ck['bytes'] / 1e9:,.1f}, "
                  f"{ck['save_s']:,.1f}, {ck['share'] * 100:.2f} %, {ck['traffic_bytes_per_hour'] / 1e9:,.0f} | "
                  f"{c['exposed_comm_s'] * 1e3:,.0f} ms | {limits(d)} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

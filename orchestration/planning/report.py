"""The plan as a person reads it: one block per question, the verdict first."""

from __future__ import annotations

from typing import Any


def gb(x: float) -> str:
    return f"{x / 1e9:,.1f} GB" if x >= 1e8 else f"{x / 1e6:,.1f} MB"


def duration(s: float) -> str:
    if s < 1:
        return f"{s * 1e3:,.0f} ms"
    if s < 120:
        return f"{s:,.1f} s"
    if s < 7200:
        return f"{s / 60:,.1f} min"
    if s < 3 * 86400:
        return f"{s / 3600:,.1f} h"
    return f"{s / 86400:,.1f} days"


def render(d: dict[str, Any]) -> str:
    """Text of a plan dict (``Plan.to_dict()``)."""
    m, c, data, ck, cost = d["memory"], d["compute"], d["data"], d["checkpoint"], d["cost"]
    fits = "fits" if m["fits"] else "DOES NOT FIT"
    ckpt = "on" if d["activation_checkpointing"] else "off"
    lines = [
        f"plan: {d['recipe']} ({d['model']}, {d['objective']}, {d['image_size']} px, {d['params'] / 1e6:,.1f}M "
        f"params) on {d['gpus']} x {d['device_title']} ({d['nodes']} node{'s' * (d['nodes'] > 1)})",
        f"  batch {d['global_batch']} = micro {d['micro_batch']} x accum {d['grad_accum']} x {d['gpus']} GPUs; "
        f"{d['precision']}, ZeRO-{d['zero_stage']}, offload {d['offload']}, activation checkpointing {ckpt}",
        "",
        f"memory per GPU: {gb(m['peak'])} of {gb(m['usable'])} usable ({gb(m['card'])} card): {fits}",
        f"  weights {gb(m['weights'])}, gradients {gb(m['gradients'])}, fp32 master {gb(m['master_weights'])}, "
        f"optimizer moments {gb(m['optimizer_moments'])}, fp32 gradients at the step {gb(m['fp32_gradients_at_step'])}, "
        f"buckets {gb(m['buckets'])}",
        f"  activations at micro {d['micro_batch']}: {gb(m['activations'])} without checkpointing, "
        f"{gb(m['activations_checkpointed'])} with it",
    ]
    if m["host_per_node_offload"]:
        lines.append(f"  host memory per node for the offloaded states: {gb(m['host_per_node_offload'])}")
    for f in d["fixes"]:
        lines.append(f"  fix: {f['command']}  -> {gb(f['peak'])} per GPU, {duration(f['step_s'])}/step, "
                     f"{f['gpu_hours']:,.0f} GPU-hours")
    for f in d["speedups"]:
        lines.append(f"  faster and still fits: {f['command']}  -> {gb(f['peak'])} per GPU, "
                     f"{duration(f['step_s'])}/step, {f['gpu_hours']:,.0f} GPU-hours")
    if not m["fits"] and not d["fixes"]:
        lines.append("  no single change found that fits: use a card with more memory or a smaller model")
    mfu = f"MFU {c['mfu'] * 100:.1f} %" if c["mfu"] is not None else "achieved FLOP/s"
    lines += [
        "",
        f"time: {duration(c['step_s'])}/step ({duration(c['compute_s'])} compute, {duration(c['exposed_comm_s'])} of "
        f"{duration(c['comm_s'])} collectives not hidden), {c['images_per_s']:,.0f} images/s; "
        f"{c['total_steps']:,} steps ({c['epochs']:,.1f} epochs) in {duration(c['run_s'])}",
        f"  {c['flops_per_image'] / 1e9:,.1f} GFLOP per image, {c['tflops_per_device']:,.1f} TFLOP/s per device "
        f"({mfu}: {c['mfu_source']})",
        "",
        f"data: {data['bytes_per_s'] / 1e9:,.2f} GB/s in all, {data['bytes_per_s_per_node'] * 8 / 1e9:,.1f} Gbit/s "
        f"per node; {data['decode_cores_per_node']:,.1f} decode cores per node (the recipe gives "
        f"{data['cpus_per_node']}); epoch {duration(data['epoch_s'])}",
        f"  {data['shards']:,} shards, {data['shards_per_rank']:,.1f} per rank, "
        f"{data['shards_per_loader_worker']:,.1f} per loader worker; {data['s3_requests_per_s']:,.0f} S3 GET/s",
        f"  ({data['images']:,} images, {data['sample_bytes'] / 1e3:,.1f} KB per sample: {data['source']}; decode: "
        f"{data['decode_source']})",
        "",
        f"checkpoint: {gb(ck['bytes'])} (model file {gb(ck['model_file_bytes'])}, optimizer partitions "
        f"{gb(ck['optimizer_files_bytes'])}), {duration(ck['save_s'])} per save at {ck['storage_gbs_per_node']:g} "
        f"GB/s per node",
        f"  every {ck['every']:,} steps: {ck['share'] * 100:.2f} % of the run; every {ck['every_for_2pct']:,} steps "
        f"keeps it under 2 %",
        "",
        f"cost: {cost['gpu_hours']:,.0f} GPU-hours" + (f" = {cost['total']:,.0f} at {cost['price_per_gpu_hour']:g} "
                                                         "per GPU-hour" if cost["total"] is not None else ""),
    ]
    lines += [f"note: {n}" for n in d["notes"]]
    return "\n".join(lines)

"""Prediction over a whole dataset split on Ray Data: one Parquet file per input shard, resumable.

``orchestration/predict.py`` runs :func:`run_predict`. The unit of work, of output and of resume is
the shard: a Ray Data actor pool (one GPU per actor where there are GPUs) takes shard numbers, and
each actor reads its shard with the loader's own readers (``Meta.rows``: the shard's rows file
checked against ``index.parquet``; ``pipeline.stream.iter_runs``: ranged reads with retries, the
shard's size checked, and its whole sha256 where images have no digests), checks every image against its recorded sha256
(a mismatch stops the job, as in the loader: tampered data is never predicted), predicts it
(:class:`~orchestration.serving.predictor.Predictor`, the servers' code) and writes::

    <out>/_job.json                  what the predictions are of: model version, dataset version, split, top_k
    <out>/<shard>.parquet            key, classes, probabilities[, embedding], error (one row per sample)
    <out>/_done/<shard>.json         written after the Parquet file: the shard is finished
    <out>/_summary.json              totals and every bad sample (shard, key, reason), at the end

A rerun with the same arguments skips the shards whose ``_done`` marker exists, so a crash
costs at most the shards that were in flight, and (outputs being a function of the shard and the
model only) the files equal those of one uninterrupted run. A rerun with other arguments into
the same ``--out`` is refused. A sample that does not decode (corrupt, truncated, a decompression
bomb) gets its ``error`` and no prediction; the others are still predicted.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline import format as fmt
from pipeline.storage import open_storage, url_join

JOB_FILE = "_job.json"
DONE_DIR = "_done"
SUMMARY_FILE = "_summary.json"


@dataclass(frozen=True, kw_only=True)
class PredictConfig:
    """One prediction job; everything an actor needs (it gets nothing else)."""

    model_uri: str  # pinned: models:/NAME/VERSION, runs:/..., or a local model folder
    data_url: str
    split: str
    out_url: str
    dataset_version: str  # pinned at start, so a re-published dataset cannot mix into a resumed job
    top_k: int = 5
    embedding: bool = False
    tracking_uri: str | None = None  # only when it holds no secret; else the actors' environment has it
    batch_size: int = 64
    max_actors: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0

    def job(self) -> dict[str, Any]:
        """What decides the output's content (a rerun must agree on all of it)."""
        return {"model": self.model_uri, "data": self.data_url, "dataset_version": self.dataset_version,
                "split": self.split, "top_k": self.top_k, "embedding": self.embedding}


def output_name(shard: str) -> str:
    """``shards/val-000003.tar`` -> ``val-000003.parquet``."""
    return shard.rsplit("/", 1)[-1].removesuffix(".tar") + ".parquet"


def done_name(shard: str) -> str:
    return f"{DONE_DIR}/{output_name(shard).removesuffix('.parquet')}.json"


def load_predictor(cfg: PredictConfig, **kw: Any) -> Any:
    """The job's Predictor: the model's folder downloaded once into a temp dir (or read in place)."""
    from pathlib import Path

    import mlflow

    from orchestration.serving.predictor import Predictor

    if not cfg.model_uri.startswith(("models:/", "runs:/")):
        return Predictor.from_dir(Path(cfg.model_uri), **kw)
    if cfg.tracking_uri:
        mlflow.set_tracking_uri(cfg.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=cfg.model_uri, dst_path=tmp)
        return Predictor.from_dir(Path(local), where=cfg.model_uri, **kw)


class ShardPredictor:
    """A Ray Data actor: shard numbers in, one summary row per shard out (the Parquet is written here)."""

    def __init__(self, cfg: PredictConfig) -> None:
        from pipeline.loader.meta import load_meta

        self.cfg = cfg
        self.predictor = load_predictor(cfg, batch_size=cfg.batch_size, decode_threads=max(1, int(cfg.num_cpus)))
        self.meta = load_meta(cfg.data_url, cfg.split, version=cfg.dataset_version)
        self.storage = open_storage(self.meta.root_url)
        self.out = open_storage(cfg.out_url)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        rows: dict[str, list[Any]] = {"shard": [], "samples": [], "bad": [], "seconds": []}
        for s in batch["shard"].tolist():
            t0 = time.perf_counter()
            name, n, bad = self.predict_shard(int(s))
            for k, v in (("shard", name), ("samples", n), ("bad", json.dumps(bad)), ("seconds", time.perf_counter() - t0)):
                rows[k].append(v)
        return rows

    def predict_shard(self, s: int) -> tuple[str, int, list[dict[str, str]]]:
        """Predict every sample of shard ``s`` and write its Parquet file and ``_done`` marker."""
        from pipeline.stream import Run, Truncated, iter_runs

        meta, cfg = self.meta, self.cfg
        name = meta.shard_names[s]
        shard_rows = meta.rows(s, self.storage)  # checked against index.parquet's rows_sha256
        n = int(meta.shard_start[s + 1] - meta.shard_start[s])
        ids = np.arange(meta.shard_start[s], meta.shard_start[s + 1])
        local = np.arange(n)
        # One hash per image, as in the loader (pipeline.loader.dataset.samples_checked): the whole-shard
        # sha256 only where the images are not checked one by one.
        whole = n == len(shard_rows) and meta.shard_sha256 is not None and (
            shard_rows.digests is None or not meta.verify_samples)
        run = Run(name, ids, offsets=shard_rows.offsets[:n], sizes=shard_rows.sizes[:n],
                  expect_bytes=None if meta.shard_bytes is None else int(meta.shard_bytes[s]),
                  expect_sha256=meta.shard_sha256_hex(s) if whole else None, index=s, rows=shard_rows, local=local)
        keys, results = [], []
        pending: list[Any] = []
        for _, data, rows, k in iter_runs(self.storage, [run], prefetch=1):
            keys.append(rows.key(k))
            if isinstance(data, Truncated):
                pending.append(_Bad("truncated: the shard ends inside this member"))
            else:
                self._verify(data, rows, k, name)
                pending.append(data)
            if len(pending) >= cfg.batch_size:
                results += self._predict(pending)
                pending = []
        results += self._predict(pending)  # iter_runs has checked the shard (size, whole sha256 if due) by now
        table = _table(keys, results, cfg.embedding)
        self.out.write_bytes(output_name(name), _parquet(table, cfg, name))
        bad = [{"shard": name, "key": key, "error": r["error"]} for key, r in zip(keys, results, strict=True)
               if "error" in r]
        self.out.write_bytes(done_name(name), json.dumps({"shard": name, "samples": n, "bad": bad}).encode())
        return name, n, bad

    def _verify(self, data: bytes, rows: Any, k: int, shard: str) -> None:
        # The loader's check (pipeline.loader.dataset): a sample whose bytes differ from the sha256 its
        # rows file records was modified after publishing; predicting it would hide that.
        if self.meta.verify_samples and rows.digests is not None and \
                hashlib.sha256(data).digest() != rows.digests[k].tobytes():
            raise fmt.IntegrityError(
                f"sample {rows.key(k)} in shard {url_join(self.meta.root_url, shard)} does not match the sha256 "
                f"recorded in its rows file ({fmt.rows_key(shard)}): the shard was modified after publishing; "
                f"{fmt.REWRITE_HINT}")

    def _predict(self, items: list[Any]) -> list[dict[str, Any]]:
        if not items:
            return []
        good = [i for i, x in enumerate(items) if not isinstance(x, _Bad)]
        res = self.predictor.predict([items[i] for i in good], top_k=self.cfg.top_k,
                                     return_embedding=self.cfg.embedding, strict=False)
        out: list[dict[str, Any]] = [{"error": x.error} if isinstance(x, _Bad) else {} for x in items]
        for i, r in zip(good, res, strict=True):
            out[i] = r
        return out


@dataclass(frozen=True)
class _Bad:
    error: str


def _table(keys: list[str], results: list[dict[str, Any]], embedding: bool) -> Any:
    import pyarrow as pa

    cols: dict[str, Any] = {
        "key": pa.array(keys, pa.string()),
        "classes": pa.array([r.get("classes") for r in results], pa.list_(pa.string())),
        "probabilities": pa.array([r.get("probabilities") for r in results], pa.list_(pa.float32())),
    }
    if embedding:
        cols["embedding"] = pa.array([r.get("embedding") for r in results], pa.list_(pa.float32()))
    cols["error"] = pa.array([r.get("error") for r in results], pa.string())
    return pa.table(cols)


def _parquet(table: Any, cfg: PredictConfig, shard: str) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = {b"vitscale.predict": json.dumps({**cfg.job(), "shard": shard}).encode()}
    sink = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata(meta), sink, compression="zstd")
    return sink.getvalue().to_pybytes()


# ------------------------------------------------------------------------------------- driver
def check_job(cfg: PredictConfig) -> bool:
    """Write ``_job.json`` into ``--out``, or check the one there matches (False: a fresh job).

    Raises ValueError when ``--out`` holds another job's predictions."""
    out = open_storage(cfg.out_url)
    want = cfg.job()
    if out.exists(JOB_FILE):
        have = json.loads(out.read_bytes(JOB_FILE))
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if diff:
            raise ValueError(f"--out {cfg.out_url} holds predictions of another job ("
                             + ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
                             + "); use another --out, or delete it to start over")
        return True
    out.write_bytes(JOB_FILE, json.dumps(want, indent=2).encode())
    return False


def run_predict(cfg: PredictConfig, *, echo: Any = print) -> dict[str, Any]:
    """Predict every shard of the split not yet done (Ray must be connected); returns the summary."""
    import ray

    from pipeline.loader.meta import load_meta

    meta = load_meta(cfg.data_url, cfg.split, version=cfg.dataset_version)
    out = open_storage(cfg.out_url)
    resumed = check_job(cfg)
    names = list(meta.shard_names)
    done = {k for k in out.list(DONE_DIR) if k.endswith(".json")}
    pending = [s for s, name in enumerate(names) if done_name(name) not in done]
    total = int(meta.num_samples)
    echo(f"[predict] {cfg.data_url} split {cfg.split} (version {meta.version}): {len(names)} shards, {total} images; "
         f"{len(names) - len(pending)} already done{' (resumed)' if resumed else ''}; model {cfg.model_uri}")
    t0, images, busy, finished = time.perf_counter(), 0, 0.0, len(names) - len(pending)
    if pending:
        from ray.data import ActorPoolStrategy

        ds = ray.data.from_items([{"shard": s} for s in pending], override_num_blocks=len(pending))
        res = ds.map_batches(ShardPredictor, fn_constructor_args=(cfg,), batch_size=1, batch_format="numpy",
                             compute=ActorPoolStrategy(min_size=1, max_size=max(1, cfg.max_actors)),
                             num_gpus=cfg.num_gpus, num_cpus=cfg.num_cpus)
        for row in res.iter_rows():
            finished += 1
            images += int(row["samples"])
            busy += float(row["seconds"])
            rate = images / max(time.perf_counter() - t0, 1e-9)
            echo(f"[predict] {row['shard']}: {row['samples']} images, {len(json.loads(row['bad']))} bad; "
                 f"{finished}/{len(names)} shards, {rate:.1f} images/s")
    summary = _summarise(cfg, names, out)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary["images_this_run"] = images
    summary["actor_seconds"] = round(busy, 3)  # summed per-shard time of the actors (steady-state rate)
    out.write_bytes(SUMMARY_FILE, json.dumps(summary, indent=2).encode())
    return summary


def _summarise(cfg: PredictConfig, names: list[str], out: Any) -> dict[str, Any]:
    """Totals and every bad sample, from the ``_done`` markers (small: no prediction is re-read)."""
    samples, bad = 0, []
    for name in names:
        info = json.loads(out.read_bytes(done_name(name)))
        samples += int(info["samples"])
        bad += info["bad"]
    return {**cfg.job(), "shards": len(names), "samples": samples, "predicted": samples - len(bad),
            "bad": len(bad), "bad_samples": bad, "outputs": [url_join(cfg.out_url, output_name(n)) for n in names],
            "config": {k: v for k, v in asdict(cfg).items() if k != "tracking_uri"}}

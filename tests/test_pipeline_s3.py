"""pipeline/ against a real S3 endpoint (moto server on 127.0.0.1), incl. injected connection resets."""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import (
    DataConfig,
    IOConfig,
    SourceConfig,
    StorageError,
    build_loader,
    open_storage,
    write_dataset,
)
from pipeline import format as fmt
from pipeline.demo_data import decode_index, make_index_folder

pytestmark = pytest.mark.integration

N_IDS = 300


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 in front of the S3 server that resets connections mid-response.

    After a request whose line contains ``match`` (e.g. ``b"/shards/"``) it forwards
    ``cut_after`` bytes of the response, then resets both sides (RST) - ``cuts_left`` times
    (``None``: every time). Threads per connection, at most ``max_conns`` at once.
    """

    def __init__(self, upstream_port: int, *, cut_after: int, match: bytes = b"/shards/",
                 cuts_left: int | None = 1, max_conns: int = 64) -> None:
        self.upstream_port, self.cut_after, self.match = upstream_port, cut_after, match
        self.cuts_left, self.cuts = cuts_left, 0
        self.lock = threading.Lock()
        self.sem = threading.BoundedSemaphore(max_conns)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.sem.acquire()
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    @staticmethod
    def _reset(*socks: socket.socket) -> None:
        for s in socks:
            try:  # linger 0: RST on close; shutdown first wakes the other pump thread's recv
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        except OSError:
            client.close()
            self.sem.release()
            return
        state = {"armed": False, "sent": 0}

        def up() -> None:  # client -> server; arm on matching requests
            try:
                while data := client.recv(65536):
                    if b"GET " in data:
                        state["armed"] = self.match in data.split(b"\r\n", 1)[0]
                        state["sent"] = 0
                    upstream.sendall(data)
            except OSError:
                pass
            finally:
                try:
                    upstream.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        t = threading.Thread(target=up, daemon=True)
        t.start()
        try:
            while data := upstream.recv(65536):
                if state["armed"]:
                    with self.lock:
                        cut = (self.cuts_left is None or self.cuts_left > 0) and \
                            state["sent"] + len(data) > self.cut_after
                        if cut:
                            if self.cuts_left is not None:
                                self.cuts_left -= 1
                            self.cuts += 1
                    if cut:
                        client.sendall(data[: max(0, self.cut_after - state["sent"])])
                        self._reset(client, upstream)
                        return
                    state["sent"] += len(data)
                client.sendall(data)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                try:
                    s.close()
                except OSError:
                    pass
            self.sem.release()

    def close(self) -> None:
        self.closed = True
        self.sock.close()


@pytest.fixture(scope="module")
def id_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_index_folder(tmp_path_factory.mktemp("ids_s3") / "src", n=N_IDS, num_classes=7, image_size=48)


@pytest.fixture()
def s3_ds(s3_bucket: str, id_src: Path) -> str:
    url = f"s3://{s3_bucket}/datasets/ids"
    write_dataset(id_src, url, samples_per_shard=64, val_fraction=0.1, workers=2, progress=False)
    return url


@pytest.fixture()
def proxy(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[CuttingProxy]:
    p = CuttingProxy(int(s3_endpoint.rsplit(":", 1)[1]), cut_after=20_000)
    monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
    yield p
    p.close()


def _vurl(url: str) -> str:
    """The published version's folder of the dataset at ``url`` (pipeline.format layout)."""
    from pipeline.format import resolve

    return resolve(url).root_url


def _table(url: str, key: str) -> list[dict]:
    return pq.read_table(pa.BufferReader(open_storage(_vurl(url)).read_bytes(key))).to_pylist()


def test_roundtrip_s3_bytes_labels_and_eval_loader(s3_ds: str, id_src: Path) -> None:
    st = open_storage(_vurl(s3_ds))
    keys = st.list()
    assert "index.parquet" in keys and "dataset.json" in keys and any(k.startswith("shards/train-") for k in keys)
    classes = json.loads(st.read_bytes("classes.json"))
    rows = fmt.read_samples(fmt.resolve(s3_ds)).to_pylist()
    assert len(rows) == N_IDS
    for r in rows:
        src = Path(r["src"])
        assert st.open_range(r["shard"], r["offset"], r["offset"] + r["size"]).read() == src.read_bytes()
        assert classes[r["label"]] == src.parent.name
    # eval over 2 ranks x 2 workers straight from S3: every sample exactly once, labels right
    label_of = {int(Path(r["src"]).stem): r["label"] for r in rows}
    got = []
    for rank in range(2):
        ld = build_loader(DataConfig(source=SourceConfig(url=s3_ds, split="train"), train=False, image_size=16, batch_size=16, io=IOConfig(num_workers=2)), rank=rank, world_size=2)
        for x, y, valid in ld:
            ids = decode_index(x.numpy())[valid.numpy()]
            assert y[valid].tolist() == [label_of[i] for i in ids]
            got += ids.tolist()
    assert sorted(got) == sorted(i for i, r in zip(label_of, rows, strict=True) if r["split"] == "train")
    # writer re-run against S3 resumes every shard
    info = write_dataset(id_src, s3_ds, samples_per_shard=64, val_fraction=0.1, workers=1, progress=False)
    assert info["summary"]["shards_written"] == 0 and info["summary"]["shards_resumed"] == len(
        _table(s3_ds, "index.parquet"))


def test_connection_reset_mid_shard_loses_and_duplicates_nothing(s3_ds: str, s3_endpoint: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = DataConfig(source=SourceConfig(url=s3_ds), image_size=16, batch_size=8, io=IOConfig(num_workers=2, shuffle_buffer=16, read_backoff_s=0.01))
    clean = [decode_index(b[0].numpy()) for b in build_loader(cfg, rank=0, world_size=1)]
    p = CuttingProxy(int(s3_endpoint.rsplit(":", 1)[1]), cut_after=20_000, cuts_left=2)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        ld = build_loader(cfg, rank=0, world_size=1)
        cut = [decode_index(b[0].numpy()) for b in ld]
    finally:
        p.close()
    assert p.cuts == 2, "the proxy never cut a shard stream: test is not exercising resume"
    assert len(cut) == len(clean) and all(np.array_equal(a, b) for a, b in zip(clean, cut, strict=True))
    assert ld.stats().get("skipped", 0) == 0


def test_range_reader_resumes_and_gives_up_naming_the_shard(s3_ds: str, proxy: CuttingProxy) -> None:
    st = open_storage(_vurl(s3_ds))
    shard = _table(s3_ds, "index.parquet")[0]["shard"]
    whole = st.read_bytes(shard)  # one cut, resumed transparently
    assert proxy.cuts == 1
    proxy.cuts_left = None  # now every shard GET is cut
    with st.open_range(shard, 100, retries=2, backoff=0.01) as f:
        with pytest.raises(StorageError, match=shard.replace(".", r"\.")):
            f.read()
    proxy.cuts_left = 0
    with st.open_range(shard, 12345) as f:  # mid-shard start, clean connection
        assert f.read() == whole[12345:]
    cfg = DataConfig(source=SourceConfig(url=s3_ds), image_size=16, batch_size=8, io=IOConfig(num_workers=0, read_retries=1, read_backoff_s=0.01))
    proxy.cuts_left = None
    with pytest.raises(StorageError, match=r"shards/train-\d+\.tar"):
        list(build_loader(cfg, rank=0, world_size=1))

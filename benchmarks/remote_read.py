"""Reading shards from an S3-compatible server: streamed, through the verified local cache, and locally.

    python benchmarks/remote_read.py [--rows 400] [--length 256] [--k 64]

Starts moto's S3 server on 127.0.0.1 (a Python server: it shows the overhead of this tool's remote path
on a fast link, not the throughput of a real object store), writes the same synthetic k = 64 shards there
and to a local folder, and prints decoded positions per second for each way of reading, side by side.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import median_seconds, print_table  # noqa: E402

from amid_pipeline.shards.manifest import Header, write_manifest  # noqa: E402
from amid_pipeline.shards.reader import ShardReader  # noqa: E402
from amid_pipeline.shards.schema import TeacherRow  # noqa: E402
from amid_pipeline.shards.storage import configure  # noqa: E402
from amid_pipeline.shards.writer import ShardWriter  # noqa: E402

VOCAB = 49152


def synthetic_rows(count: int, length: int, k: int, seed: int = 0) -> list[TeacherRow]:
    """Rows with every position stored; top-k log-probabilities descending, as a teacher gives them."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        ids = rng.integers(0, VOCAB, length).astype(np.int32)
        steps = rng.exponential(0.4, (length - 1, k)).astype(np.float32)
        steps[:, 0] += rng.exponential(1.0, length - 1).astype(np.float32)
        topk = rng.integers(0, VOCAB, (length - 1, k)).astype(np.int32)
        rows.append(TeacherRow(sample_id=f"row-{i}", input_ids=ids, positions=np.arange(length - 1, dtype=np.int32),
                               loss_mask=np.ones(length - 1, bool), topk_ids=topk, topk_logprobs=-np.cumsum(steps, axis=1),
                               target_logprob=-steps[:, 0], target_rank=np.ones(length - 1, np.int32)))
    return rows


def write(location: str, rows: list[TeacherRow], k: int) -> None:
    header = Header(teacher={"name_or_path": "synthetic"}, tokenizer={"fingerprint": "0" * 64, "vocab_size": VOCAB},
                         model_vocab_size=VOCAB, k=k, backend={"name": "synthetic"})
    with ShardWriter(location, header=header, rows_per_file=100, rows_per_group=25) as writer:
        for row in rows:
            writer.add(row)
    write_manifest(location, header, writer.committed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--k", type=int, default=64)
    args = parser.parse_args()

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3fs.S3FileSystem(endpoint_url=endpoint).mkdir("bench")
    rows = synthetic_rows(args.rows, args.length, args.k)
    positions = sum(len(r.positions) for r in rows)
    with tempfile.TemporaryDirectory() as tmp:
        configure(storage_options={"endpoint_url": endpoint})
        write(f"{tmp}/local", rows, args.k)
        write("s3://bench/shards", rows, args.k)

        def read(location: str) -> None:
            assert sum(len(row.positions) for row in ShardReader(location)) == positions

        def cold_cache() -> None:
            configure(storage_options={"endpoint_url": endpoint}, cache_dir=tempfile.mkdtemp(dir=tmp))
            read("s3://bench/shards")

        timings = {"local folder": median_seconds(lambda: read(f"{tmp}/local"))}
        configure(storage_options={"endpoint_url": endpoint})
        timings["S3, streamed row groups"] = median_seconds(lambda: read("s3://bench/shards"))
        timings["S3, cache cold (download + sha256)"] = median_seconds(cold_cache)
        configure(storage_options={"endpoint_url": endpoint}, cache_dir=f"{tmp}/cache")
        timings["S3, cache warm"] = median_seconds(lambda: read("s3://bench/shards"))
    server.stop()
    local = timings["local folder"]
    print_table(f"Reading {positions:,} positions (k = {args.k}, {args.rows} rows in {args.rows // 100} files) from moto's S3 server",
                ["source", "seconds", "positions/s", "time vs local"],
                [[name, seconds, f"{positions / seconds:,.0f}", seconds / local] for name, seconds in timings.items()])


if __name__ == "__main__":
    main()

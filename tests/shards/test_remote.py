"""Shard directories on remote storage: a real S3-compatible HTTP server (moto, on 127.0.0.1) and a
fault-injecting fsspec filesystem for transient errors."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from typer.testing import CliRunner

from amid_pipeline.capture.config import CaptureConfig
from amid_pipeline.capture.run import run_capture
from amid_pipeline.cli import app
from amid_pipeline.config import load_config
from amid_pipeline.shards import storage
from amid_pipeline.shards.manifest import load_manifest
from amid_pipeline.shards.reader import ShardReader
from amid_pipeline.shards.schema import FormatError
from amid_pipeline.shards.storage import StorageError, configure
from tests.helpers import ROOT, assert_same_rows, random_rows, rows_by_id, synthetic_header, write_shards

runner = CliRunner()


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server in its own process on a free 127.0.0.1 port (kept out of this process: vLLM's module
    scan trips over flask's context proxies)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            break
        except urllib.error.HTTPError:  # it answers: up
            break
        except OSError:
            if server.poll() is not None:
                raise RuntimeError("moto server did not start")
            time.sleep(0.05)
    else:
        raise RuntimeError(f"moto server not answering on {endpoint}")
    yield endpoint
    server.terminate()
    server.wait(10)


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """A fresh bucket on the local S3 server; returns (bucket URL, s3fs filesystem for direct inspection)."""
    import s3fs

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    configure(storage_options={"endpoint_url": s3_endpoint}, backoff=0.01)
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    bucket = f"shards-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    yield f"s3://{bucket}", fs
    configure()


@pytest.fixture
def pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    with open(ROOT / "data" / "jargon" / "train.jsonl") as source:
        path.write_text("".join(line for line, _ in zip(source, range(14))))
    return path


def capture_settings(tiny_models, pairs, output) -> list[str]:
    return ["cache-teacher", "--teacher", str(tiny_models["teacher"]), "--dataset", str(pairs), "--output", output,
            "--backend", "hf", "--k", "8", "--max-length", "64", "--rows-per-file", "4", "--dtype", "float32",
            "--no-progress"]


def capture(tiny_models, pairs, output):
    return run_capture(load_config(CaptureConfig, None, {
        "teacher": str(tiny_models["teacher"]), "dataset": str(pairs), "output": str(output), "backend": "hf", "k": 8,
        "max_length": 64, "rows_per_file": 4, "dtype": "float32", "progress": False}))


def test_capture_verify_combine_and_distill_through_an_s3_server(s3, s3_endpoint, tiny_models, pairs, tmp_path):
    bucket, fs = s3
    options = ["--storage-options", f"endpoint_url={s3_endpoint}"]
    result = runner.invoke(app, [*options, *capture_settings(tiny_models, pairs, f"{bucket}/run")])
    assert result.exit_code == 0, result.output
    stored = sorted(path.split("/", 1)[1] for path in fs.find(bucket))
    assert stored == ["run/README.md", *(f"run/data/part-w00000-0000{i}.parquet" for i in range(4)), "run/manifest.json",
                      "run/progress.w00000-of-00001.jsonl", "run/tokenizer/tokenizer.json",
                      "run/tokenizer/tokenizer_config.json"]  # the teacher tokenizer's copy (format 1.4)
    local = tmp_path / "local"
    capture(tiny_models, pairs, local)
    assert_same_rows(rows_by_id(f"{bucket}/run"), rows_by_id(local))
    assert "license:" in fs.cat_file(f"{bucket}/run/README.md").decode()  # the dataset card travels with the data

    result = runner.invoke(app, [*options, "verify", f"{bucket}/run"])
    assert result.exit_code == 0 and "OK 4 files" in result.output, result.output
    result = runner.invoke(app, [*options, "inspect", f"{bucket}/run", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["rows"] == 14, result.output

    # a second capture run on S3 and the local one, combined into a view on S3 (no data copied)
    assert runner.invoke(app, [*options, *capture_settings(tiny_models, pairs, f"{bucket}/again")]).exit_code == 0
    result = runner.invoke(app, [*options, "combine", f"{bucket}/view", f"{bucket}/run", f"{bucket}/again", str(local),
                                 "--duplicates", "drop"])
    assert result.exit_code == 0 and "rows dropped as duplicates  28" in result.output, result.output
    names = [record.name for record in load_manifest(f"{bucket}/view").files]
    assert names == [f"../run/data/part-w00000-0000{i}.parquet" for i in range(4)]
    assert runner.invoke(app, [*options, "verify", f"{bucket}/view"]).exit_code == 0

    result = runner.invoke(app, [*options, "distill", "--shards", f"{bucket}/view", "--student",
                                 str(tiny_models["student"]), "--output", str(tmp_path / "student"), "--max-steps", "2", "--num-data-workers", "2",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "student" / "model" / "config.json").exists()

    fs.pipe_file(f"{bucket}/run/data/part-w00000-00002.parquet", b"PAR1 not really")  # damaged after publishing
    result = runner.invoke(app, [*options, "verify", f"{bucket}/run"])
    assert result.exit_code == 1 and "data/part-w00000-00002.parquet: size 15 bytes" in result.output


def test_a_failed_upload_leaves_no_manifest_and_the_rerun_resumes(s3, tiny_models, pairs, tmp_path, monkeypatch):
    bucket, fs = s3
    commit = storage.Store.commit

    def fail_third_file(self, staging, name):
        if name.endswith("-00002.parquet"):
            raise PermissionError(f"denied: {name}")
        return commit(self, staging, name)

    monkeypatch.setattr(storage.Store, "commit", fail_third_file)
    with pytest.raises(PermissionError):
        capture(tiny_models, pairs, f"{bucket}/run")
    stored = sorted(path.rsplit("/", 1)[1] for path in fs.find(bucket))
    assert stored == ["part-w00000-00000.parquet", "part-w00000-00001.parquet", "progress.w00000-of-00001.jsonl",
                      "tokenizer.json", "tokenizer_config.json"]
    with pytest.raises(FormatError, match="no manifest.json"):
        load_manifest(f"{bucket}/run")
    monkeypatch.setattr(storage.Store, "commit", commit)
    summary = capture(tiny_models, pairs, f"{bucket}/run")
    assert summary.resumed_chunks == 2
    capture(tiny_models, pairs, tmp_path / "reference")
    assert_same_rows(rows_by_id(f"{bucket}/run"), rows_by_id(tmp_path / "reference"))


def test_remote_cache_keeps_verified_copies_and_refuses_changed_files(s3, s3_endpoint, tmp_path):
    bucket, fs = s3
    rows = random_rows(10, k=8, vocab=100, seed=5)
    write_shards(f"{bucket}/run", rows, synthetic_header(encoding="float32"))
    configure(storage_options={"endpoint_url": s3_endpoint}, cache_dir=str(tmp_path / "cache"), backoff=0.01)
    expected = {row.sample_id: row for row in rows}
    assert_same_rows(rows_by_id(f"{bucket}/run"), expected)
    manifest = load_manifest(f"{bucket}/run")
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*.parquet"))
    assert cached == sorted(f"{record.sha256}.parquet" for record in manifest.files)
    fs.rm(f"{bucket}/run/data", recursive=True)  # served from the cache from now on
    assert_same_rows(rows_by_id(f"{bucket}/run"), expected)

    write_shards(f"{bucket}/other", random_rows(10, k=8, vocab=100, seed=7), synthetic_header(encoding="float32"))
    record = load_manifest(f"{bucket}/other").files[0]
    fs.pipe_file(f"{bucket}/other/{record.name}", fs.cat_file(f"{bucket}/other/{load_manifest(f'{bucket}/other').files[1].name}"))
    with pytest.raises(storage.IntegrityError, match=rf"other/{record.name}: sha256 .* \(changed or corrupted since it was recorded"):
        list(ShardReader(f"{bucket}/other"))
    assert not list((tmp_path / "cache").rglob("*.tmp"))


class FlakyFileSystem(MemoryFileSystem):
    """In-memory files whose operations fail with ConnectionError: every ``every``-th call, or always."""

    protocol = "flaky"
    store: dict = {}
    pseudo_dirs = [""]
    every = 3
    calls = 0

    @classmethod
    def _strip_protocol(cls, path):
        return MemoryFileSystem._strip_protocol(str(path).removeprefix("flaky://"))

    @classmethod
    def _maybe_fail(cls) -> None:
        cls.calls += 1
        if cls.every == 1 or cls.calls % cls.every == 0:
            raise ConnectionError("connection reset by peer")

    def cat_file(self, path, start=None, end=None, **kwargs):
        self._maybe_fail()
        return super().cat_file(path, start, end, **kwargs)

    def put_file(self, lpath, rpath, **kwargs):
        self._maybe_fail()
        return super().put_file(lpath, rpath, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        self._maybe_fail()
        opened = super()._open(path, mode, **kwargs)
        return FlakyReads(opened.getvalue()) if mode == "rb" else opened


class FlakyReads(io.BytesIO):
    bytes_read = 0

    def read(self, *args):
        FlakyFileSystem._maybe_fail()
        data = super().read(*args)
        FlakyReads.bytes_read += len(data)
        return data


@pytest.fixture
def flaky():
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    FlakyFileSystem.store.clear()
    FlakyFileSystem.every, FlakyFileSystem.calls, FlakyReads.bytes_read = 3, 0, 0
    configure(backoff=0.0, attempts=4)
    yield FlakyFileSystem
    configure()


def test_transient_errors_are_retried_then_reported_by_file_name(flaky, tmp_path):
    rows = random_rows(15, k=8, vocab=100, seed=6)
    write_shards("flaky://bucket/run", rows, synthetic_header(encoding="float32"), rows_per_file=5, rows_per_group=2)  # writes retried too
    assert flaky.calls > 10  # failures really happened along the way
    assert_same_rows(rows_by_id("flaky://bucket/run"), {row.sample_id: row for row in rows})

    flaky.every = 1  # the network is down: every attempt fails
    with pytest.raises(StorageError, match=r"flaky://bucket/run/manifest.json: ConnectionError: .* \(failed 4 times\)"):
        load_manifest("flaky://bucket/run")
    result = runner.invoke(app, ["--retries", "2", "inspect", "flaky://bucket/run"])
    assert result.exit_code == 1 and "failed 2 times" in result.output and "Traceback" not in result.output


def test_remote_reads_stream_row_groups_instead_of_whole_files(flaky):
    flaky.every = 10**9  # no failures here
    rows = random_rows(500, k=8, vocab=100, seed=8, max_len=80)
    write_shards("flaky://bucket/run", rows, synthetic_header(encoding="float32"), rows_per_file=500, rows_per_group=10)
    (record,) = load_manifest("flaky://bucket/run").files
    FlakyReads.bytes_read = 0
    first = next(iter(ShardReader("flaky://bucket/run")))
    assert first.sample_id == rows[0].sample_id
    assert record.bytes > 400_000 and FlakyReads.bytes_read < record.bytes / 4  # tail with the footer + one row group


def test_unknown_protocols_are_one_line_errors():
    result = runner.invoke(app, ["inspect", "nope://bucket/shards"])
    assert result.exit_code == 1 and "nope://bucket/shards: Protocol not known: nope" in result.output
    assert "Traceback" not in result.output


def test_two_workers_write_one_s3_directory_and_overwrite_clears_it(s3, tiny_models, pairs, tmp_path):
    bucket, fs = s3
    base = {"teacher": str(tiny_models["teacher"]), "dataset": str(pairs), "output": f"{bucket}/run", "backend": "hf",
            "k": 8, "max_length": 64, "rows_per_file": 4, "dtype": "float32", "progress": False, "num_workers": 2}
    run_capture(load_config(CaptureConfig, None, {**base, "worker_index": 1}))
    with pytest.raises(FormatError, match=r"workers \[0\] of 2 have not finished"):
        load_manifest(f"{bucket}/run")
    assert not fs.exists(f"{bucket}/run/README.md")
    run_capture(load_config(CaptureConfig, None, {**base, "worker_index": 0}))
    assert fs.exists(f"{bucket}/run/README.md")  # written by the worker that completed the directory
    capture(tiny_models, pairs, tmp_path / "single")
    assert_same_rows(rows_by_id(f"{bucket}/run"), rows_by_id(tmp_path / "single"))
    with pytest.raises(ValueError, match="written with other settings .*k: 8 there, 4 now"):
        run_capture(load_config(CaptureConfig, None, {**base, "worker_index": 0, "k": 4}))
    run_capture(load_config(CaptureConfig, None, {**base, "num_workers": 1, "k": 4, "overwrite": True}))
    assert load_manifest(f"{bucket}/run").k == 4
    assert not any("w00001" in path for path in fs.find(f"{bucket}/run"))  # the old run is gone

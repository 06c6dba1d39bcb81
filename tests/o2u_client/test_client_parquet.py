"""Parquet end to end against a real server: a job on a Parquet file of embeddings (the digits as
64-d rows with string keys, several row groups) scores like its .npz twin, and its scores export
as a typed Parquet file whose metadata records the job that produced them."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from o2u_client import Client, Job
from tests.server_testing import TINY_CONFIG


def test_a_parquet_dataset_scores_and_exports(client: Client, data_root: Path, finished_job: Job) -> None:
    with np.load(data_root / "digits.npz") as archive:
        x, y = archive["x"].astype(np.float32), archive["y"]
    n, d = x.shape
    keys = [f"row-{i:04d}" for i in range(n)]
    table = pa.table(
        {
            "key": keys,
            "label": pa.array(y.astype(np.int64)),
            "features": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d),
        }
    )
    path = data_root / f"digits-{uuid.uuid4().hex[:8]}.parquet"
    pq.write_table(table, path, row_group_size=64)
    job = client.wait(client.submit(path.as_uri(), config=TINY_CONFIG).job_id, timeout=300)
    assert job.state == "SUCCEEDED", job.error
    scores = list(client.scores(job.job_id))
    assert sorted(s.key for s in scores) == keys
    npz_scores = {s.sample_id: s.score for s in client.scores(finished_job.job_id)}
    assert {s.sample_id: s.score for s in scores} == npz_scores, "same samples and seed, same scores"

    destination = data_root / "exports" / f"{uuid.uuid4().hex}.parquet"
    result = client.export(job.job_id, destination.as_uri())
    assert result.rows_written == n
    exported = pq.read_table(destination)
    assert exported.num_rows == n
    assert exported.column("rank").to_pylist() == list(range(1, n + 1))
    assert exported.schema.field("noise_probability").type == pa.float64()
    assert set(exported.column("key").to_pylist()) == set(keys)
    # The file says what produced its scores: the job, its dataset, and the job's run info.
    metadata = {key.decode(): value.decode() for key, value in exported.schema.metadata.items()}
    assert metadata["o2u.job_id"] == job.job_id
    assert metadata["o2u.dataset_uri"] == path.as_uri()
    run_info = json.loads(metadata["o2u.run_info"])
    assert job.run_info is not None
    assert (run_info["seed"], run_info["device"], run_info["engine_version"], run_info["dataset_digest"]) == (
        job.run_info.seed,
        job.run_info.device,
        job.run_info.engine_version,
        job.run_info.dataset_digest,
    )
    assert json.loads(run_info["resolved_config_json"]) == dict(job.run_info.resolved_config)

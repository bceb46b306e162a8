"""Volume snapshots in an S3-compatible object store: moto's S3 server (a real HTTP server
speaking S3, signatures and all) on loopback, a real agent and Docker Engine. A snapshot put
into the bucket is the volume's tar (read back with boto3, not with pleaco's client); it is
listed; restored into another app's volume it holds the data; bad keys, a missing bucket and
an unreachable store are clear errors that change nothing."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentproc import AgentProcess, docker_client, free_port
from conftest import HELLO
from test_volumes import Factory, cli, docker_volumes, one_running, sh

from pleaco.stacks.config import VolumeSettings
from pleaco.stacks.s3 import ObjectStore, ObjectStoreError, SnapshotNotFound

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

AK, SK, BUCKET = "pleacotest", "pleacotestsecret", "snaps"


@pytest.fixture
def s3() -> Iterator[tuple[str, Any]]:
    """moto's S3 server on a loopback port with the bucket made; its URL and a boto3 client."""
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=url, aws_access_key_id=AK, aws_secret_access_key=SK,
                          region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield url, client
    finally:
        server.stop()


def settings(url: str, bucket: str = BUCKET) -> VolumeSettings:
    return VolumeSettings(s3_endpoint=url, s3_bucket=bucket, s3_access_key=AK, s3_secret_key=SK)


def test_the_client_puts_gets_and_lists(s3: tuple[str, Any], tmp_path: Path) -> None:
    url, boto = s3
    store = ObjectStore(settings(url))
    src = tmp_path / "a.tar"
    src.write_bytes(b"x" * 300_000)
    assert store.put("pleaco/app/v/1.tar", src) == 300_000
    assert store.put("pleaco/app/v/2 with space.tar", src) == 300_000
    assert boto.get_object(Bucket=BUCKET, Key="pleaco/app/v/2 with space.tar")["Body"].read() == src.read_bytes()
    assert [s.key for s in store.list("pleaco/app/v/")] == ["pleaco/app/v/1.tar", "pleaco/app/v/2 with space.tar"]
    assert store.list("pleaco/other/") == []
    out = tmp_path / "b.tar"
    assert store.get("pleaco/app/v/1.tar", out) == 300_000 and out.read_bytes() == src.read_bytes()
    with pytest.raises(SnapshotNotFound, match=r"no snapshot .pleaco/nope\.tar."):
        store.get("pleaco/nope.tar", out)
    with pytest.raises(ObjectStoreError, match="NoSuchBucket"):
        ObjectStore(settings(url, "missing-bucket")).put("k", src)
    with pytest.raises(ObjectStoreError, match="cannot reach the object store"):
        ObjectStore(settings(f"http://127.0.0.1:{free_port()}")).list("")


def test_snapshot_to_the_store_and_restore_from_it(agents: Factory, s3: tuple[str, Any]) -> None:
    url, boto = s3
    env = {"PLEACO_VOLUMES_S3_ENDPOINT": url, "PLEACO_VOLUMES_S3_BUCKET": BUCKET,
           "PLEACO_VOLUMES_S3_ACCESS_KEY": AK, "PLEACO_VOLUMES_S3_SECRET_KEY": SK}
    a: AgentProcess = agents(env=env)
    done = cli(a, "apps", "deploy", "db", "--image", HELLO, "--port", "8080", "--volume", "data:/data")
    assert done.returncode == 0, done.stderr
    sh(one_running(a, "db", 1), "echo kept > /data/note && mkdir -p /data/sub && echo deep > /data/sub/f")

    done = cli(a, "volumes", "snapshot", "db", "data", "--s3")
    assert done.returncode == 0, done.stderr
    key = done.stdout.split(" as ")[1].split(" ")[0]
    assert key.startswith("pleaco/db/data/") and key.endswith(".tar")
    # What the bucket holds, read with boto3: the volume's files.
    body = boto.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        names = {m.name.removeprefix("./") for m in tar.getmembers()}
        assert {"note", "sub/f"} <= names
        note = tar.extractfile(next(m for m in tar.getmembers() if m.name.removeprefix("./") == "note"))
        assert note is not None and note.read() == b"kept\n"
    listed = json.loads(cli(a, "volumes", "snapshots", "db", "data", "--json").stdout)
    assert [s["key"] for s in listed] == [key] and listed[0]["bytes"] == len(body)

    # Into a new app's volume, before its first replica; then it starts with the data.
    a.client.deploy("copy", {"image": HELLO, "port": 8080, "replicas": 0, "volumes": ["data:/data"]})
    done = cli(a, "volumes", "restore", "copy", "data", "--s3", key)
    assert done.returncode == 0, done.stderr
    a.client.scale("copy", 1)
    cid = one_running(a, "copy")
    assert sh(cid, "cat /data/note /data/sub/f") == "kept\ndeep\n"

    # A key that is not there: 404 naming it, the volume untouched. A running app: 409.
    a.client.scale("copy", 0)
    done = cli(a, "volumes", "restore", "copy", "data", "--s3", "pleaco/copy/data/none.tar")
    assert done.returncode != 0 and "no snapshot 'pleaco/copy/data/none.tar'" in done.stderr
    done = cli(a, "volumes", "restore", "db", "data", "--s3", key)
    assert done.returncode != 0 and "scale it to 0" in done.stderr
    a.client.scale("copy", 1)
    assert sh(one_running(a, "copy"), "cat /data/note") == "kept\n"
    assert sorted(docker_volumes(a, "copy")) == [f"pleaco-copy.data.{a.node_id[:12]}"]
    # The secret key is nowhere in what the API or the log gives out.
    assert SK not in cli(a, "volumes", "ls", "--json").stdout and SK not in a.log_tail(10_000)
    assert docker_client().ping()


def test_without_a_store_the_verbs_say_what_to_configure(agents: Factory) -> None:
    a = agents()
    a.client.deploy("db", {"image": HELLO, "port": 8080, "replicas": 0, "volumes": ["data:/data"]})
    for args in (["snapshot", "db", "data", "--s3"], ["snapshots", "db", "data"],
                 ["restore", "db", "data", "--s3", "k.tar"]):
        done = cli(a, "volumes", *args)
        assert done.returncode != 0 and "volumes.s3_endpoint" in done.stderr, (args, done.stderr)

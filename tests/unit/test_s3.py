"""The object store client's signing and settings, without a store: AWS's own documented
example, botocore's signer on keys that need encoding, and [volumes] s3_* validation."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from pleaco.stacks.config import VolumeSettings
from pleaco.stacks.s3 import EMPTY_SHA256, ObjectStore, ObjectStoreNotConfigured, _error_of, sign_v4

AK, SK = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
WHEN = datetime.datetime(2013, 5, 24, tzinfo=datetime.UTC)


def test_signature_matches_the_aws_documented_example() -> None:
    # "GET Object" in AWS's Signature Version 4 examples for S3 (sig-v4-header-based-auth).
    h = sign_v4("GET", "examplebucket.s3.amazonaws.com", "/test.txt", {}, {"Range": "bytes=0-9"}, EMPTY_SHA256,
                access_key=AK, secret_key=SK, region="us-east-1", now=WHEN)
    assert h["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")
    assert h["x-amz-date"] == "20130524T000000Z"


@pytest.mark.parametrize("key", ["pleaco/db/data/20261130T051200Z.tar", "a b/ü+x=y.tar", "odd~key-._!*'()"])
def test_signature_matches_botocore_on_keys_and_queries(key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    botocore_auth = pytest.importorskip("botocore.auth")
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    monkeypatch.setattr(botocore_auth, "get_current_datetime", lambda: WHEN.replace(tzinfo=None))
    store = ObjectStore(VolumeSettings(s3_endpoint="http://127.0.0.1:9000", s3_bucket="snaps", s3_access_key=AK,
                                       s3_secret_key=SK, s3_region="eu-west-3"))
    path = store._path(key)
    query = {"list-type": "2", "prefix": key}
    ours = sign_v4("PUT", "127.0.0.1:9000", path, query, {"content-type": "application/x-tar"}, EMPTY_SHA256,
                   access_key=AK, secret_key=SK, region="eu-west-3", now=WHEN)
    req = AWSRequest(method="PUT", url=f"http://127.0.0.1:9000{path}", params=query,
                     headers={"content-type": "application/x-tar", "x-amz-content-sha256": EMPTY_SHA256})
    botocore_auth.S3SigV4Auth(Credentials(AK, SK), "s3", "eu-west-3").add_auth(req)
    assert ours["authorization"] == req.headers["Authorization"]


def test_keys_are_prefix_app_volume_time() -> None:
    store = ObjectStore(VolumeSettings(s3_endpoint="https://s3.example.test/base/", s3_bucket="snaps",
                                       s3_access_key=AK, s3_secret_key=SK, s3_prefix="prod/"))
    key = store.key_for("db", "data", datetime.datetime(2026, 11, 30, 5, 12, tzinfo=datetime.UTC))
    assert key == "prod/db/data/20261130T051200Z.tar"
    assert store._path(key) == "/base/snaps/prod/db/data/20261130T051200Z.tar"
    assert store.tls and store.host == "s3.example.test"
    vhost = ObjectStore(VolumeSettings(s3_endpoint="https://s3.example.test", s3_bucket="snaps", s3_access_key=AK,
                                       s3_secret_key=SK, s3_path_style=False))
    assert (vhost.host, vhost._path("k")) == ("snaps.s3.example.test", "/k")


def test_no_store_configured_is_a_conflict_naming_the_settings() -> None:
    with pytest.raises(ObjectStoreNotConfigured, match=r"volumes\.s3_endpoint") as exc:
        ObjectStore(VolumeSettings())
    assert exc.value.status == 409


@pytest.mark.parametrize(("changes", "problem"), [
    ({"s3_endpoint": "ftp://x"}, "volumes.s3_endpoint"),
    ({"s3_endpoint": "http://"}, "volumes.s3_endpoint"),
    ({"s3_bucket": "Bad_Bucket"}, "volumes.s3_bucket"),
    ({"s3_bucket": "ab"}, "volumes.s3_bucket"),
    ({"s3_secret_key": ""}, "volumes.s3_secret_key"),
    ({"s3_access_key": ""}, "volumes.s3_access_key"),
    ({"s3_prefix": "/abs"}, "volumes.s3_prefix"),
    ({"s3_timeout": 0.0}, "volumes.s3_timeout"),
])
def test_bad_store_settings_are_named(changes: dict[str, Any], problem: str) -> None:
    good: dict[str, Any] = {"s3_endpoint": "http://127.0.0.1:9000", "s3_bucket": "snaps", "s3_access_key": AK,
                            "s3_secret_key": SK}
    assert VolumeSettings(**good).validate() == []
    problems = VolumeSettings(**{**good, **changes}).validate()
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_error_documents_are_read_and_garbage_is_not() -> None:
    doc = b"<?xml version='1.0'?><Error><Code>NoSuchBucket</Code><Message>The bucket does not exist</Message></Error>"
    assert _error_of(doc) == ("NoSuchBucket", "The bucket does not exist")
    assert _error_of(b"<html>bad gateway") == ("", "")

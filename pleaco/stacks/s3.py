"""Volume snapshots kept in an S3-compatible object store (AWS S3, MinIO, Garage, Ceph RGW).

Three calls are all a snapshot target needs: put an object from a file, get one into a file,
list the objects under a prefix. They are plain HTTP requests signed with AWS Signature
Version 4, written here on the standard library (``http.client``, ``hmac``) rather than
pulling in boto3 and its dozen dependencies for three requests. The calls block: the API
runs them in a thread (a snapshot is a file of any size on the node's disk).

The body of a put is signed with its SHA-256 (the file is hashed first), not sent as
``UNSIGNED-PAYLOAD``: over plain HTTP to a store on the LAN that is the only integrity check
the store makes. Errors come back as the store's own code and message (``NoSuchBucket``,
``SignatureDoesNotMatch``...), wrapped in :class:`ObjectStoreError` (502: the store, not the
caller, refused) or :class:`SnapshotNotFound` (404).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import http.client
import shutil
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pleaco import errors
from pleaco.stacks.config import VolumeSettings

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
CHUNK = 1 << 20
# Characters S3 leaves as they are in a canonical URI and query (RFC 3986 unreserved).
_UNRESERVED = "-_.~"


class ObjectStoreError(errors.PleacoError, RuntimeError, code="s3_error", status=502):
    """The object store could not be reached or refused the request (its code and message)."""


class ObjectStoreNotConfigured(errors.Conflict, RuntimeError, code="s3_not_configured"):
    """A snapshot to or from the object store was asked for, and [volumes] names none."""


class SnapshotNotFound(errors.NotFound, LookupError, code="snapshot_not_found"):
    """No object by that key in the bucket."""


@dataclass(frozen=True)
class StoredSnapshot:
    key: str
    size: int
    last_modified: str  # as the store gives it (ISO 8601)


def _quote(text: str, safe: str = "") -> str:
    return urllib.parse.quote(text, safe=_UNRESERVED + safe)


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def sign_v4(method: str, host: str, path: str, query: Mapping[str, str], headers: Mapping[str, str],
            payload_sha256: str, *, access_key: str, secret_key: str, region: str, now: datetime.datetime,
            service: str = "s3") -> dict[str, str]:
    """The headers that sign a request with AWS Signature Version 4 (``Authorization``,
    ``x-amz-date``, ``x-amz-content-sha256``, ``host``), to send with ``headers``.
    ``path`` is already URI-encoded (S3 does not encode it twice)."""
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    signed = {k.lower(): " ".join(v.strip().split()) for k, v in headers.items()}
    signed.update({"host": host, "x-amz-date": amz_date, "x-amz-content-sha256": payload_sha256})
    names = sorted(signed)
    canonical_query = "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(query.items()))
    canonical = "\n".join([method, path, canonical_query, "".join(f"{n}:{signed[n]}\n" for n in names),
                           ";".join(names), payload_sha256])
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(("AWS4" + secret_key).encode(), day), region), service), "aws4_request")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return {**{k: v for k, v in signed.items() if k != "host"},
            "authorization": f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={';'.join(names)}, "
                             f"Signature={signature}"}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class ObjectStore:
    """One bucket of an S3-compatible store, as ``[volumes]`` names it."""

    def __init__(self, settings: VolumeSettings) -> None:
        if not settings.s3_endpoint:
            raise ObjectStoreNotConfigured("no object store is configured: set volumes.s3_endpoint, s3_bucket, "
                                           "s3_access_key and s3_secret_key in the agent's config (pleaco.toml "
                                           "[volumes]) on the node that holds the volume")
        url = urllib.parse.urlsplit(settings.s3_endpoint)
        self.endpoint = settings.s3_endpoint
        self.tls = url.scheme == "https"
        self.bucket = settings.s3_bucket
        self.path_style = settings.s3_path_style
        self.host = url.netloc if self.path_style else f"{self.bucket}.{url.netloc}"
        self.base = url.path.rstrip("/")
        self.region = settings.s3_region
        self.access_key = settings.s3_access_key
        self.secret_key = settings.s3_secret_key
        self.prefix = settings.s3_prefix
        self.timeout = settings.s3_timeout

    def key_for(self, app: str, volume: str, stamp: datetime.datetime) -> str:
        """Where a new snapshot of a volume goes: ``PREFIX/APP/VOLUME/20261130T051200Z.tar``."""
        return f"{self.prefix}{app}/{volume}/{stamp.strftime('%Y%m%dT%H%M%SZ')}.tar"

    def _path(self, key: str = "") -> str:
        bucket = f"/{_quote(self.bucket)}" if self.path_style else ""
        return f"{self.base}{bucket}/{_quote(key, '/')}"

    def _request(self, method: str, key: str, *, query: Mapping[str, str] | None = None,
                 body: Path | None = None, sha256: str = EMPTY_SHA256,
                 headers: Mapping[str, str] | None = None) -> http.client.HTTPResponse:
        query = dict(query or {})
        path = self._path(key)
        all_headers = sign_v4(method, self.host, path, query, dict(headers or {}), sha256,
                              access_key=self.access_key, secret_key=self.secret_key, region=self.region,
                              now=datetime.datetime.now(datetime.UTC))
        target = path + ("?" + "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(query.items())) if query else "")
        conn_cls = http.client.HTTPSConnection if self.tls else http.client.HTTPConnection
        conn = conn_cls(self.host, timeout=self.timeout)
        try:
            if body is None:
                conn.request(method, target, headers=all_headers)
            else:
                with open(body, "rb") as f:
                    all_headers["content-length"] = str(body.stat().st_size)
                    conn.request(method, target, body=f, headers=all_headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise ObjectStoreError(f"cannot reach the object store at {self.endpoint}: {exc}") from None
        if resp.status >= 300:
            text = resp.read(64 << 10)
            conn.close()
            code, message = _error_of(text)
            if resp.status == 404 and code in ("NoSuchKey", ""):
                raise SnapshotNotFound(f"no snapshot {key!r} in bucket {self.bucket!r} at {self.endpoint}")
            raise ObjectStoreError(f"the object store at {self.endpoint} refused {method} of "
                                   f"{key or 'the bucket'!r} in bucket {self.bucket!r}: {resp.status} "
                                   f"{code or resp.reason}{': ' + message if message else ''}")
        return resp

    def put(self, key: str, path: Path) -> int:
        """Upload the file at ``path`` as ``key``; its size."""
        resp = self._request("PUT", key, body=path, sha256=file_sha256(path),
                             headers={"content-type": "application/x-tar"})
        resp.read()
        resp.close()
        return path.stat().st_size

    def get(self, key: str, dest: Path) -> int:
        """Download ``key`` into the file at ``dest``; its size."""
        resp = self._request("GET", key)
        try:
            with open(dest, "wb") as f:
                shutil.copyfileobj(resp, f, CHUNK)
        except (OSError, http.client.HTTPException) as exc:
            raise ObjectStoreError(f"reading {key!r} from the object store at {self.endpoint} failed: {exc}") from None
        finally:
            resp.close()
        return dest.stat().st_size

    def list(self, prefix: str) -> list[StoredSnapshot]:
        """Every object under ``prefix``, oldest key first (ListObjectsV2, page by page)."""
        out: list[StoredSnapshot] = []
        token = ""
        while True:
            query = {"list-type": "2", "prefix": prefix, **({"continuation-token": token} if token else {})}
            resp = self._request("GET", "", query=query)
            text = resp.read()
            resp.close()
            try:
                root = ET.fromstring(text)
            except ET.ParseError as exc:
                raise ObjectStoreError(f"the object store at {self.endpoint} sent a listing that is not XML: "
                                       f"{exc}") from None
            ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
            for item in root.iter(f"{ns}Contents"):
                out.append(StoredSnapshot(key=item.findtext(f"{ns}Key", ""),
                                          size=int(item.findtext(f"{ns}Size", "0") or 0),
                                          last_modified=item.findtext(f"{ns}LastModified", "")))
            token = root.findtext(f"{ns}NextContinuationToken", "")
            if root.findtext(f"{ns}IsTruncated", "false") != "true" or not token:
                return sorted(out, key=lambda s: s.key)


def _error_of(text: bytes) -> tuple[str, str]:
    """The code and message of an S3 error document (empty when there is none)."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        return "", ""
    return (root.findtext("Code") or "").strip(), (root.findtext("Message") or "").strip()[:300]

"""``s3://bucket/prefix`` sources (boto3: paginated listing, parallel downloads with
retries, size checks; credentials from the standard AWS chain, never logged)."""

from __future__ import annotations

import hashlib
import logging
import re
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from components.config import IngestConfig
from components.data.layout import (
    is_hidden,
)
from components.data.sources.base import _Entry, _Limits, _safe_member_name, _UniqueNames
from components.errors import DataError

log = logging.getLogger(__name__)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix/")``."""
    rest = uri.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise DataError(f"{uri}: expected s3://bucket/prefix")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def make_s3_client(cfg: IngestConfig) -> Any:
    """A boto3 S3 client: credentials from the standard AWS chain, botocore retries."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": cfg.s3_retry_mode, "total_max_attempts": cfg.s3_max_attempts},
        max_pool_connections=max(10, cfg.s3_workers),
        connect_timeout=cfg.s3_timeout_s,
        read_timeout=cfg.s3_timeout_s,
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=cfg.s3_endpoint_url, region_name=cfg.s3_region, config=config
    )


def _s3_error(uri: str, action: str, exc: Exception) -> DataError:
    """A one-line error; never includes credentials (botocore messages carry none)."""
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return DataError(
            f"{uri}: no AWS credentials found (set AWS_PROFILE or "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or an instance role)"
        )
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return DataError(f"{uri}: {action} failed ({err.get('Code', '?')}: {exc})")
    return DataError(f"{uri}: {action} failed ({exc})")


class _S3Source:
    def __init__(self, uri: str, cfg: IngestConfig, client: Any | None) -> None:
        self.cfg, self.uri = cfg, uri.rstrip("/")
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.client = client if client is not None else make_s3_client(cfg)

    def entries(self) -> list[_Entry]:
        from botocore.exceptions import BotoCoreError, ClientError

        limits, names, out = _Limits(self.cfg, self.uri), _UniqueNames(self.uri), []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket,
            Prefix=self.prefix,
            PaginationConfig={"PageSize": self.cfg.s3_page_size},
        )
        try:
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(self.prefix) :]
                    if not key or key.endswith("/"):
                        continue  # "folder" marker objects
                    rel = _safe_member_name(key, self.uri)
                    limits.add(rel, obj["Size"])
                    names.add(rel)
                    if not is_hidden(rel):
                        out.append(_Entry(rel, obj["Size"], obj.get("ETag"), origin=key))
        except (ClientError, BotoCoreError) as exc:
            raise _s3_error(self.uri, "listing", exc) from None
        if not out:
            raise DataError(f"{self.uri}: no objects under this prefix")
        return out

    def _get(self, entry: _Entry) -> bytes:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionClosedError,
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
        )

        key = self.prefix + entry.where
        uri = f"s3://{self.bucket}/{key}"
        # botocore retries failed requests; a body cut off mid-stream is retried here.
        for attempt in range(1, self.cfg.s3_max_attempts + 1):
            try:
                kwargs = {"IfMatch": entry.ref} if entry.ref else {}
                response = self.client.get_object(Bucket=self.bucket, Key=key, **kwargs)
                data = response["Body"].read()
                break
            except (
                ResponseStreamingError,
                IncompleteReadError,
                ReadTimeoutError,
                ConnectionClosedError,
            ) as exc:
                if attempt == self.cfg.s3_max_attempts:
                    raise _s3_error(uri, f"download (after {attempt} attempts)", exc) from None
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code in ("PreconditionFailed", "412"):
                    raise DataError(f"{uri}: changed while being ingested; run again") from None
                raise _s3_error(uri, "download", exc) from None
            except BotoCoreError as exc:
                raise _s3_error(uri, "download", exc) from None
        if len(data) != entry.size:
            raise DataError(f"{uri}: got {len(data):,} bytes, the listing said {entry.size:,}")
        etag = (entry.ref or "").strip('"')
        encryption = response.get("ServerSideEncryption", "")
        plain_md5 = (
            re.fullmatch(r"[0-9a-f]{32}", etag)
            and not encryption.startswith("aws:kms")
            and "SSECustomerAlgorithm" not in response
        )  # else the ETag is no MD5
        if plain_md5 and hashlib.md5(data, usedforsecurity=False).hexdigest() != etag:
            raise DataError(f"{uri}: content does not match its ETag (corrupted download)")
        return data

    def read(self, entries: list[_Entry]) -> Iterator[tuple[_Entry, bytes]]:
        window = 4 * self.cfg.s3_workers
        with ThreadPoolExecutor(self.cfg.s3_workers, thread_name_prefix="s3-get") as pool:
            pending: deque[tuple[_Entry, Future[bytes]]] = deque()
            todo = iter(entries)
            try:
                for entry in todo:
                    pending.append((entry, pool.submit(self._get, entry)))
                    if len(pending) >= window:
                        done, future = pending.popleft()
                        yield done, future.result()
                while pending:
                    done, future = pending.popleft()
                    yield done, future.result()
            finally:
                for _, future in pending:
                    future.cancel()

    def close(self) -> None:
        pass

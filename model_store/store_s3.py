"""The S3 store: the local store's layout and operations on an S3-compatible object store (AWS S3, MinIO, Ceph
RGW, R2 ...), for several servers on several machines sharing one bank (docs/store.md, docs/scale-out.md).

- Blobs are content-addressed (`<prefix>/blobs/<sha256>.safetensors`), written create-only (`If-None-Match: *`)
  and verified against their name on every read; each process keeps a verified local cache of those it read.
- The index is one object (`<prefix>/index.json`) changed only by compare-and-swap (`If-Match: <etag>`): on 412
  or 409 the change is read again, checked again and retried with a bounded backoff. There is no lock.
- A purge first publishes an index that no longer names the doomed blobs and lists them under `deleting`, then
  deletes them, then publishes an index without that list. A put whose blob is listed waits for the purge (or
  finishes a purge that died, after `STALE_DELETION_SECONDS`); a put makes sure its blob is there after reading
  the index its swap is based on. So a concurrent put and purge never leave an index naming a deleted blob.

Credentials come from boto3's usual sources (the AWS_* variables, ~/.aws, an instance role) and are never logged;
the endpoint from `CLIPBANK_S3_ENDPOINT_URL`. boto3 is the `[scale]` extra, imported only here.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

from .digest import bytes_digest
from .errors import REWRITE, BundleNotFound, StoreDamaged, StoreError, StoreNotWritable, StoreUnavailable
from .files import read_regular
from .s3_errors import OPERATOR_HINTS
from .s3_errors import error_code as _code
from .s3_errors import error_status as _status
from .said_once import SaidOnce
from .settings import cache_root, check_s3_endpoint, env_value
from .store import atomic_write, encode_index, parse_index
from .store_base import BlobBeingDeleted, Edit, Store, Unchanged, purge_plan
from .store_index import StoreIndex, next_generation

log = logging.getLogger("clipbank.store")
CAS_SECONDS = 30.0  # how long a change keeps retrying a contended index, or waits for a purge's deletion
STOPPED_PURGE_SECONDS = 60.0  # ... this old, it has stopped: a put is told when it can land, not made to wait
STALE_DELETION_SECONDS = 300.0  # a purge's `deleting` entry this old belongs to a purge that died: finish it
# A call is sent once and retried S3_ATTEMPTS times, after a jittered sleep of up to 1 s, then 2 s. An endpoint that
# accepts connections but does not answer fails a call in about (S3_ATTEMPTS + 1) x S3_READ_SECONDS (a 503
# store_unavailable), not minutes; the read timeout is per socket read, so a large blob is not cut short.
# botocore's "legacy" retries, not "standard": standard spends a quota on retries that only 2xx answers refill, and
# a polling server's answers are 304s: a server that had lived through an outage never retried again (measured).
S3_CONNECT_SECONDS, S3_READ_SECONDS, S3_ATTEMPTS = 5.0, 10.0, 2
# botocore's errors for a request sent whose answer never came (a refused connection is not one: nothing was sent)
ANSWER_LOST = frozenset({"ReadTimeoutError", "ConnectionClosedError", "ProtocolError"})
STRAY_SECONDS = 3600.0  # a blob no index names, this old, is a killed writer's: a purge deletes it


class S3Store(Store):
    """`s3://bucket/prefix` through a boto3 S3 client (any S3-compatible endpoint with conditional writes)."""

    def __init__(self, bucket: str, prefix: str, client: Any, cache_dir: str | os.PathLike) -> None:
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.location = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._s3 = client
        self.cache = Path(cache_dir)
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a traceback at start, after the backbone had loaded
            raise StoreError(
                f"the S3 store's local blob cache {str(self.cache)!r} cannot be made ({type(e).__name__}: "
                f"{e.strerror or e}): set CLIPBANK_S3_CACHE_DIR to a writable folder"
            ) from None
        self._cached: tuple[str, StoreIndex] | None = None
        self._say = SaidOnce(log, 600)  # the same failure to reach the store: an error once in 10 minutes

    @classmethod
    def from_url(cls, url: str, environ: Mapping[str, str] | None = None) -> S3Store:
        """The store at `s3://bucket/prefix`; endpoint `CLIPBANK_S3_ENDPOINT_URL` (default: AWS), local cache
        `CLIPBANK_S3_CACHE_DIR` (default: ~/.cache/clipbank/s3/<bucket>-<hash of the location>)."""
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise StoreError(f"store {url!r}: an S3 store is s3://bucket or s3://bucket/prefix")
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise StoreError("an s3:// store needs boto3: pip install 'clipbank[scale]'") from None
        endpoint = env_value("S3_ENDPOINT_URL", environ)
        check_s3_endpoint(endpoint)
        config = Config(
            connect_timeout=S3_CONNECT_SECONDS,
            read_timeout=S3_READ_SECONDS,
            retries={"max_attempts": S3_ATTEMPTS, "mode": "legacy"},
        )
        client = boto3.client("s3", endpoint_url=endpoint, config=config)
        tag = hashlib.sha256(f"{endpoint}|{url}".encode()).hexdigest()[:12]
        cache = env_value("S3_CACHE_DIR", environ) or os.path.join(cache_root(environ), "s3", f"{bucket}-{tag}")
        return cls(bucket, prefix, client, cache)

    def without_location(self, text: str) -> str:
        """`text` as it is: `s3://bucket/prefix` is no path of the server (shown by its last part, "the object
        store prod could not find its bucket" hid the bucket, the one thing to check: an outside check)."""
        return text

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _blob_key(self, bundle_id: str) -> str:
        return self._key(f"blobs/{bundle_id}.safetensors")

    def locked(self):
        """No lock on S3: every change is a compare-and-swap of the index, checked again on each retry."""
        return nullcontext()

    # ----------------------------------------------------------------------------------------- reading

    def index(self) -> StoreIndex:
        return self._get_index()[1]

    def exists(self) -> bool:
        """Whether the prefix holds a store (its index): a new one is made by the first change."""
        return self._get_index()[0] is not None

    def _get_index(self) -> tuple[str | None, StoreIndex]:
        """(etag, index) of the index object; a conditional GET when one is cached, so a poll costs a 304."""
        cached, floor = self._cached, self._seen_generation
        try:
            extra = {"IfNoneMatch": cached[0]} if cached else {}
            answer = self._s3.get_object(Bucket=self.bucket, Key=self._key("index.json"), **extra)
            data, etag = answer["Body"].read(), answer["ETag"]
        except Exception as e:
            status = _status(e)
            if status == 304 and cached is not None:
                return cached
            if _code(e) == "NoSuchBucket":
                raise self._unavailable("find its bucket", e) from None
            if status == 404 or _code(e) in ("NoSuchKey", "404"):
                self._cached = None
                self._no_index_but_blobs()
                self._index_gone()
                return None, StoreIndex()
            raise self._unavailable("read the index", e) from None
        index = self._seen(parse_index(data, self.location), floor)
        self._cached = (etag, index)
        return etag, index

    def _no_index_but_blobs(self) -> None:
        """StoreDamaged when the index is missing but bundles are stored: a lost index is not an empty store (its
        generations would restart, and the next purge would delete every bundle). A store's first change writes
        the index before any blob, so only a lost index leaves blobs without one."""
        try:
            listed = self._s3.list_objects_v2(Bucket=self.bucket, Prefix=self._key("blobs/"), MaxKeys=1)
        except Exception as e:
            raise self._unavailable("list the blobs", e) from None
        if listed.get("KeyCount", len(listed.get("Contents", []))):
            raise StoreDamaged(
                f"{self.location}: the store's index.json is missing but its blobs/ hold bundles: restore index.json "
                "from a backup (or move blobs/ away to start an empty store)"
            )

    def _read_blob(self, bundle_id: str) -> bytes:
        cached = self.cache / f"{bundle_id}.safetensors"
        try:
            data = read_regular(cached)  # a pipe in the cache hung every read
            if bytes_digest(data) == bundle_id:
                return data
            log.warning("cached blob %s does not hash to its name; fetched again", bundle_id[:12])
        except FileNotFoundError:
            pass
        except OSError as e:  # the cache is only a cache: the object store has the blob
            log.warning("cached blob %s cannot be read (%s); fetched again", bundle_id[:12], e)
        data = self.fetch_blob(bundle_id)
        if bytes_digest(data) == bundle_id:  # a damaged object is not cached; `read` reports it
            try:
                atomic_write(cached, data)
            except OSError as e:  # a full or read-only cache disk costs a fetch next time, never the blob
                log.warning("blob %s could not be cached in %s: %s", bundle_id[:12], self.cache, e)
        return data

    def fetch_blob(self, bundle_id: str) -> bytes:
        """The object's bytes, past the local cache."""
        try:
            return self._s3.get_object(Bucket=self.bucket, Key=self._blob_key(bundle_id))["Body"].read()
        except Exception as e:
            if _status(e) == 404 or _code(e) == "NoSuchKey":
                raise BundleNotFound(f"bundle {bundle_id[:12]} is missing from the store" + REWRITE) from None
            raise self._unavailable(f"read blob {bundle_id[:12]}", e) from None

    def _blob_intact(self, bundle_id: str) -> bool:
        try:  # the object itself: this process's cached copy may be whole while the store's is not
            return bytes_digest(self.fetch_blob(bundle_id)) == bundle_id
        except BundleNotFound:
            return False

    # ----------------------------------------------------------------------------------------- changing

    def _write_blob(self, bundle_id: str, data: bytes, replace: bool = False) -> None:
        """Create-only unless `replace`: an object already there has these bytes (its name is their digest; reads
        verify it), or is a damaged copy that `restore` replaces."""
        condition = {} if replace else {"IfNoneMatch": "*"}
        try:
            self._s3.put_object(Bucket=self.bucket, Key=self._blob_key(bundle_id), Body=data, **condition)
        except Exception as e:
            if _status(e) not in (412, 409):  # there already, or a concurrent create of the same bytes
                raise self._unavailable(f"write blob {bundle_id[:12]}", e, writing=True) from None

    def _change(self, edit: Edit, blob: tuple[str, bytes] | None = None) -> StoreIndex:
        """Publish `edit(index)` with generation + 1 by compare-and-swap, retrying on contention for up to
        CAS_SECONDS; the edit runs again on the index each retry reads, so its checks always see the latest."""
        deadline, attempt, verified = time.monotonic() + CAS_SECONDS, 0, False
        while True:
            etag, index = self._get_index()
            if etag is None and blob is not None:  # a new store: its index first, so no blob is ever without one
                self._publish(None, index)
                continue
            try:
                new = next_generation(edit(index), self._known_id)
            except BlobBeingDeleted:
                if blob is None:
                    raise
                self._wait_for_deletion(index, blob[0], deadline, attempt)
                attempt += 1
                continue
            if blob is not None:
                # Only now, after reading the index this swap is based on: a purge that deleted the blob
                # earlier is seen here, and one that starts later must publish first, which fails this swap.
                self._ensure_blob(*blob, verify=not verified)
                verified = True
            if self._publish(etag, new):
                return new
            attempt = _backoff(attempt, deadline, "the store index kept changing under this change")

    def _ensure_blob(self, bundle_id: str, data: bytes, verify: bool = True) -> None:
        """Write the blob unless the bucket holds it already, whole: a damaged object of that name (a leftover no
        version names) is replaced, not trusted. `verify`: read an object of the right size to check its digest
        (a put does once: its retries after contention only look that the object is still there)."""
        try:
            head = self._s3.head_object(Bucket=self.bucket, Key=self._blob_key(bundle_id))
        except Exception as e:
            if _status(e) != 404:
                raise self._unavailable(f"look up blob {bundle_id[:12]}", e) from None
            self._write_blob(bundle_id, data)
            return
        if head.get("ContentLength") != len(data) or (verify and not self._blob_intact(bundle_id)):
            log.warning("blob %s in the bucket is damaged: written again", bundle_id[:12])
            self._write_blob(bundle_id, data, replace=True)

    def _publish(self, etag: str | None, index: StoreIndex) -> bool:
        """Write the index if it is still `etag` (None: if there is none yet); False if another writer won."""
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            answer = self._s3.put_object(
                Bucket=self.bucket, Key=self._key("index.json"), Body=encode_index(index), **condition
            )
        except Exception as e:
            if _status(e) in (412, 409):
                return self._landed(index)
            if type(e).__name__ in ANSWER_LOST:  # sent, then no answer: the write may have landed all the same
                raise self._unavailable("confirm the index write; it may have landed: GET /tasks says", e) from None
            raise self._unavailable("write the index", e, writing=True) from None
        self._cached = (answer["ETag"], self._seen(index, None))
        return True

    def _landed(self, index: StoreIndex) -> bool:
        """After a 412: whether the index is this very write. The client retries a write whose answer was lost (a
        503 after S3 applied it), and the retry's condition then fails on its own first attempt's ETag."""
        try:
            answer = self._s3.get_object(Bucket=self.bucket, Key=self._key("index.json"))
            data, etag = answer["Body"].read(), answer["ETag"]
        except Exception:
            return False  # the next attempt reads the index again and decides
        if data != encode_index(index):
            return False
        self._cached = (etag, self._seen(index, None))
        return True

    def _wait_for_deletion(self, index: StoreIndex, bundle_id: str, deadline: float, attempt: int) -> None:
        """A purge is deleting this blob: finish the deletion if that purge died, else wait for it."""
        age = time.time() - index.deleting[bundle_id]
        if age > STALE_DELETION_SECONDS:
            log.warning("finishing the deletion of blob %s, left by a purge that stopped", bundle_id[:12])
            self._finish_deletions([bundle_id])
        elif (
            age > STOPPED_PURGE_SECONDS
        ):  # a live purge deletes in seconds: this one stopped (an outside check waited 30 s a
            left = math.ceil(STALE_DELETION_SECONDS - age)  # try, 5 minutes long, told to retry in 1 s)
            error = StoreUnavailable(
                f"blob {bundle_id[:12]} has been in a purge's deletion for {age:.0f} s: that purge stopped (a live "
                f"one takes seconds); the next change to meet it finishes it in {left} s, and this can be sent again "
                "then"
            )
            error.retry_after = left  # type: ignore[attr-defined]  (the API's Retry-After)
            raise error
        else:
            _backoff(attempt, deadline, f"blob {bundle_id[:12]} stayed in a purge's deletion")

    def sweep(self) -> dict[str, int]:
        """Delete blobs no version names that were written over STRAY_SECONDS ago (a killed writer's; a newer one
        may be a put in flight), as any purge does, without purging a task (`clipbank store clean`)."""
        return {"temp_files": 0, "unreferenced_blobs": self._delete(None)[1]}

    def _purge(self, task: str, deactivate: bool = False) -> int:
        return self._delete(task, deactivate)[0]

    def _delete(self, task: str | None, deactivate: bool = False) -> tuple[int, int]:
        """(versions purged, blobs deleted): `task`'s versions (None: none) and the strays."""
        strays = self._stray_blobs()
        doomed: list[str] = []
        gone_versions: list[int] = []

        def edit(index: StoreIndex) -> StoreIndex:
            kept, gone = purge_plan(index, task, deactivate) if task is not None else (index, [])
            named = {v.bundle_id for _, v in index.records()}
            stale = [b for b, t in index.deleting.items() if time.time() - t > STALE_DELETION_SECONDS]
            doomed[:] = sorted({v.bundle_id for v in gone} | (strays - named) | set(stale))
            gone_versions[:] = [v.version for v in gone]
            if not doomed and kept == index:  # every version kept (other tasks use their experts): no new generation
                raise Unchanged
            now = time.time()
            return replace(kept, deleting={**kept.deleting, **{b: now for b in doomed if b not in stale}})

        try:
            self._change(edit)  # no index names them now, and no put may until the deletion is done
        except Unchanged:
            pass
        self._finish_deletions(doomed)
        return len(gone_versions), len(doomed)

    def _finish_deletions(self, bundle_ids: list[str]) -> None:
        for bundle_id in bundle_ids:
            try:
                self._s3.delete_object(Bucket=self.bucket, Key=self._blob_key(bundle_id))
            except Exception as e:
                if _status(e) != 404:
                    raise self._unavailable(f"delete blob {bundle_id[:12]}", e) from None
            (self.cache / f"{bundle_id}.safetensors").unlink(missing_ok=True)
        if bundle_ids:
            done = set(bundle_ids)
            self._change(lambda ix: replace(ix, deleting={b: t for b, t in ix.deleting.items() if b not in done}))

    def _stray_blobs(self) -> set[str]:
        """Blobs older than STRAY_SECONDS (whether or not an index names them: the purge's edit decides)."""
        cutoff = time.time() - STRAY_SECONDS
        return {name for name, modified in self._listed() if modified < cutoff}

    def _listed(self) -> list[tuple[str, float]]:
        """(name without `.safetensors`, unix time last written) of every blob object."""
        out = []
        try:
            pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key("blobs/"))
            for page in pages:
                for item in page.get("Contents", []):
                    name = item["Key"].rsplit("/", 1)[-1]
                    if name.endswith(".safetensors"):
                        out.append((name.removesuffix(".safetensors"), item["LastModified"].timestamp()))
        except Exception as e:
            raise self._unavailable("list the blobs", e) from None
        return out

    def blob_names(self) -> list[str]:
        """Every blob object's name (`clipbank store check`: what the bucket holds, not this machine's cache)."""
        return [name for name, _ in self._listed()]

    def raw_index(self) -> bytes | None:
        """The index object's bytes as stored (None: there is none), for `clipbank store check`."""
        try:
            return self._s3.get_object(Bucket=self.bucket, Key=self._key("index.json"))["Body"].read()
        except Exception as e:
            if _code(e) == "NoSuchBucket":
                raise self._unavailable("find its bucket", e) from None
            if _status(e) == 404 or _code(e) in ("NoSuchKey", "404"):
                return None
            raise self._unavailable("read the index", e) from None

    def _unavailable(self, doing: str, e: Exception, writing: bool = False) -> StoreError:
        """A StoreError (503) naming what failed; the exception's own text goes to the log only, once in a while
        for the same failure (an endpoint down logged an error at every poll, every 2-4 s). `writing`: a write of
        a change, before its index is written, which the bucket refused (403: these credentials may read but not
        write) is StoreNotWritable, which no retry heals."""
        self._say(logging.ERROR, f"store {self.location}: could not {doing}: {type(e).__name__}: {e}")
        if writing and _code(e) in ("AccessDenied", "AllAccessDisabled"):  # not a 403 of expired or skewed keys
            return StoreNotWritable(
                f"the object store {self.location} refused to {doing} ({_code(e) or 403}); nothing was changed: the "
                "store is not writable for this server (its credentials or the bucket's policy), and sending it "
                "again will not help until it is"
            )
        hint = OPERATOR_HINTS.get(_code(e) or "", "")
        return StoreUnavailable(
            f"the object store {self.location} could not {doing} ({_code(e) or type(e).__name__}){hint}"
        )


def _backoff(attempt: int, deadline: float, why: str) -> int:
    """Sleep before retry `attempt` + 1 (exponential, jittered, at most 1 s); StoreError once past `deadline`."""
    pause = min(0.02 * 2**attempt, 1.0) * random.uniform(0.5, 1.5)
    if time.monotonic() + pause > deadline:
        raise StoreUnavailable(f"{why} for {CAS_SECONDS:.0f}s; try again")
    time.sleep(pause)
    return attempt + 1

"""A node's local replica storage.

Layout: ``<root>/files/<sha256 of name>/<version>`` plus ``<version>.meta`` (JSON: name, size,
checksum, mtime). The directory is a hash of the name, so no name can escape ``root`` and every
valid name fits the file system's 255-byte component limit.
A replica becomes visible only after it is complete: written to ``<root>/tmp``, fsynced, checksum
verified, then ``os.replace``d into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from sdfs.names import validate_name

HASH = "sha256"


def new_hasher() -> hashlib._Hash:
    return hashlib.new(HASH)


def file_checksum(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = new_hasher()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class ReplicaInfo:
    name: str
    version: int
    size: int
    checksum: str
    mtime: float

    def as_list(self) -> list[object]:
        return [self.name, self.version, self.size, self.checksum]


class StoreError(Exception):
    pass


class PartialWrite:
    """An in-progress replica: sequential chunks into a temp file, hashed as they arrive."""

    def __init__(self, store: LocalStore, name: str, version: int, size: int, checksum: str) -> None:
        self.store, self.name, self.version, self.size, self.checksum = store, name, version, size, checksum
        self.tmp = store.tmp_dir / f"{uuid.uuid4().hex}.part"
        self.fh = open(self.tmp, "wb")  # noqa: SIM115 - closed in finish()/abort()
        self.hasher = new_hasher()
        self.written = 0
        self.touched = time.monotonic()

    def write(self, offset: int, data: bytes) -> None:
        if offset != self.written:
            raise StoreError(f"out-of-order chunk at {offset}, expected {self.written}")
        if self.written + len(data) > self.size:
            raise StoreError("more data than the declared size")
        self.fh.write(data)
        self.hasher.update(data)
        self.written += len(data)
        self.touched = time.monotonic()

    def finish(self) -> ReplicaInfo:
        try:
            if self.written != self.size:
                raise StoreError(f"short write: {self.written} of {self.size} bytes")
            if self.hasher.hexdigest() != self.checksum:
                raise StoreError("checksum mismatch")
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            return self.store.commit(self.tmp, self.name, self.version, self.size, self.checksum)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if not self.fh.closed:
            self.fh.close()
        self.tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.files_dir = self.root / "files"
        self.tmp_dir = self.root / "tmp"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)  # leftovers of a crash are never replicas
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def _dir(self, name: str) -> Path:
        validate_name(name)
        return self.files_dir / hashlib.sha256(name.encode()).hexdigest()

    def path(self, name: str, version: int) -> Path:
        if not isinstance(version, int) or version < 1:
            raise StoreError(f"bad version {version!r}")
        return self._dir(name) / str(version)

    def begin(self, name: str, version: int, size: int, checksum: str) -> PartialWrite:
        validate_name(name)
        if size < 0:
            raise StoreError("negative size")
        return PartialWrite(self, name, version, size, checksum)

    def commit(self, tmp: Path, name: str, version: int, size: int, checksum: str) -> ReplicaInfo:
        final = self.path(name, version)
        final.parent.mkdir(parents=True, exist_ok=True)
        info = ReplicaInfo(name, version, size, checksum, time.time())
        meta_tmp = self.tmp_dir / f"{uuid.uuid4().hex}.meta"
        with open(meta_tmp, "w") as fh:
            json.dump({"size": size, "checksum": checksum, "mtime": info.mtime, "name": name}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        os.replace(meta_tmp, final.with_suffix(".meta"))
        _fsync_dir(final.parent)  # the renames themselves survive a crash
        return info

    def has(self, name: str, version: int) -> bool:
        try:
            return self.path(name, version).with_suffix(".meta").exists()
        except (StoreError, ValueError):
            return False

    def info(self, name: str, version: int) -> ReplicaInfo | None:
        try:
            meta = json.loads(self.path(name, version).with_suffix(".meta").read_text())
        except (OSError, ValueError, StoreError):
            return None
        return ReplicaInfo(name, version, int(meta["size"]), str(meta["checksum"]), float(meta["mtime"]))

    def read(self, name: str, version: int, offset: int, length: int) -> tuple[bytes, bool]:
        info = self.info(name, version)
        if info is None:
            raise StoreError(f"no replica of {name} v{version} here")
        with open(self.path(name, version), "rb") as fh:
            fh.seek(offset)
            data = fh.read(length)
        return data, offset + len(data) >= info.size

    def drop(self, name: str, version: int = 0) -> int:
        """Delete one version (or all with 0); return how many were removed."""
        d = self._dir(name)
        if not d.exists():
            return 0
        removed = 0
        for meta in list(d.glob("*.meta")):
            v = int(meta.stem)
            if version in (0, v):
                meta.unlink(missing_ok=True)
                (d / str(v)).unlink(missing_ok=True)
                removed += 1
        if not any(d.iterdir()):
            d.rmdir()
        return removed

    def list(self) -> list[ReplicaInfo]:
        out = []
        for d in self.files_dir.iterdir():
            for meta in d.glob("*.meta"):
                try:
                    name = str(json.loads(meta.read_text())["name"])
                    info = self.info(name, int(meta.stem))
                except (OSError, ValueError, KeyError):
                    continue  # not ours or damaged: never list it as a replica
                if info is not None:
                    out.append(info)
        return sorted(out, key=lambda i: (i.name, i.version))

    def used_bytes(self) -> int:
        return sum(i.size for i in self.list())

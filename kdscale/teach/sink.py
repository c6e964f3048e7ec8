"""A companion shard being written (:mod:`kdscale.teach.writer`): under ``.tmp``, renamed when
complete, kept as a resumable ``.partial`` when stopped."""

from __future__ import annotations

import os

from kdscale.data.teacher_outputs import FIELD
from kdscale.errors import KdscaleError

PARTIAL, TMP = ".partial", ".tmp"
MEMBER_MTIME = 0  # fixed, so that a resumed companion is byte-identical to an uninterrupted one


def count_records(path: str) -> int:
    from kdscale.data.tar_reader import iter_samples

    return sum(1 for _ in iter_samples(path))


class CompanionSink:
    """One companion being written: ``<target>.tmp``, starting with the records of its
    partial (if any), renamed to ``target`` when complete or to the partial when stopped."""

    def __init__(self, target: str, start: int):
        import webdataset as wds

        from kdscale.data.tar_reader import iter_samples

        self.target, self.start, self.written, self.last_key = target, start, 0, None
        self.tar = wds.TarWriter(target + TMP, mtime=MEMBER_MTIME)
        if start:
            for record in iter_samples(target + PARTIAL):
                self.write(record["__key__"], {FIELD: record[FIELD]})
            if self.written != start:
                raise KdscaleError(f"{target}{PARTIAL} changed while being resumed; rerun kdscale.teach")

    def write(self, key: str, record: dict) -> None:
        self.tar.write({"__key__": key, **record})
        self.written, self.last_key = self.written + 1, key

    def finish(self) -> None:
        self.tar.close()
        os.replace(self.target + TMP, self.target)
        if os.path.exists(self.target + PARTIAL):
            os.remove(self.target + PARTIAL)

    def keep_partial(self) -> None:
        self.tar.close()
        os.replace(self.target + TMP, self.target + PARTIAL)

    def abandon(self) -> None:
        """After a failure: close the ``.tmp`` file, which the rerun overwrites."""
        try:
            self.tar.close()
        except (OSError, ValueError):
            pass

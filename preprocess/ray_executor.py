"""`--executor ray`: the local executor's exact bytes, tokenized by every CPU of a Ray cluster.

Without `--address` a local Ray instance starts and stops with the job; with it, the job joins a running cluster
(`ray start --head` on one machine, `ray start --address=HEAD:6379` on the others). Every node reads the inputs
and writes the output folder itself, so both must be reachable from all of them: object storage (any fsspec URL)
or a filesystem every node mounts. A local path on a multi-node cluster is refused before any work starts.

The work is cut into units (units.py) and done in two phases (phases.py). Only paths and small metadata travel
through Ray: task arguments are a unit, a shard plan and the job's Spec, results are per-document token counts
and shard records; token arrays go through storage. Results are put in order by unit and shard index, never by
completion. At most a few tasks per CPU are in flight, so the driver's memory does not grow with the input.
Faults: a task whose worker or node dies is retried by Ray (MAX_RETRIES) and writes the same bytes; a rerun
after the driver was killed finds finished units and shards on storage and skips them. This module is imported
only for `--executor ray`, so the local executor never imports ray.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict

import ray
from tqdm import tqdm

from preprocess import phases, units
from preprocess.pipeline import SPLITS, Run
from shards.cluster import check_reachable
from shards.storage import first_line
from preprocess.tokenizer import pad_id
from shards import Manifest, ShardInfo, storage
from shards.writer import shard_path

MAX_RETRIES = 5  # per task, when its worker or node is lost; errors raised by our own code are not retried
IN_FLIGHT_PER_CPU = 2  # tasks submitted ahead per CPU: enough to keep every CPU busy, few enough to stay small
# Filesystems that other machines can mount too: a local path on one of them is allowed on a multi-node cluster.
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "lustre", "gpfs", "beegfs", "glusterfs",
                       "ocfs2", "gfs2", "panfs", "wekafs", "afs", "orangefs"}
PLAN_NAME = "plan.json"


@ray.remote(num_cpus=1, max_retries=MAX_RETRIES)
def _tokenize(spec: phases.Spec, unit: units.Unit) -> phases.UnitFacts:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the task holds one CPU: one tokenizer thread
    return phases.tokenize_unit(spec, unit)


@ray.remote(num_cpus=1, max_retries=MAX_RETRIES)
def _gather(spec: phases.Spec, task: phases.GatherTask) -> bool:
    return phases.gather(spec, task)


@ray.remote(num_cpus=1, max_retries=MAX_RETRIES)
def _write_shard(spec: phases.Spec, task: phases.ShardTask):
    return phases.write_shard(spec, task)


def mount_type(path: str) -> str:
    """The filesystem type of the mount holding `path` ("" when unknown, e.g. not Linux)."""
    path = os.path.realpath(path)
    best, fstype = "", ""
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split()[1:3] for line in f]
    except OSError:
        return ""
    for mount, kind in mounts:
        mount = mount.replace("\\040", " ")
        if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
            best, fstype = mount, kind
    return fstype


def check_shared_storage(places: list[tuple[str, str]], storage_options: dict | None, nodes: int) -> None:
    """On a multi-node cluster every (flag, url) must be object storage or on a network filesystem."""
    if nodes < 2:
        return
    for flag, url in places:
        fs, path = storage.open_fs(url, storage_options)
        kind = mount_type(path) if storage.is_local(fs) else "remote"
        if storage.is_local(fs) and kind not in NETWORK_FILESYSTEMS and not kind.startswith("fuse."):
            raise ValueError(
                f"--{flag} {url!r} is a local path ({kind or 'unknown'} filesystem), but the Ray cluster has {nodes} "
                "nodes and each reads and writes it itself: use object storage (an fsspec URL such as "
                "s3://bucket/path) or a filesystem every node mounts"
            )


@contextmanager
def connected(address: str | None) -> Iterator[None]:
    """Join the cluster at `address`, or start a local instance; leave a connection the caller already made."""
    if ray.is_initialized():
        yield
        return
    if address:
        check_reachable(address)
    kwargs = {"address": address, "logging_level": logging.WARNING, "log_to_driver": False}
    if not address:  # "local": a new instance even when this machine runs a cluster (ray.init would join it)
        kwargs.update(address="local", include_dashboard=False)
    try:
        ray.init(**kwargs)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise ValueError(f"--address {address}: cannot join a Ray cluster there ({first_line(e)})") from None
    try:
        yield
    finally:
        ray.shutdown()


class RayRun(Run):
    """Run (pipeline.py) with its streaming part replaced by the two phases; setup, params checks, tokenizer
    upload, manifest and summary are the local executor's."""

    def execute(self) -> Manifest | None:
        with connected(self.job.address):
            self.nodes = sum(1 for n in ray.nodes() if n["Alive"])
            self.cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
            places = [("data_root", self.job.data_root)] + [("data_files", f.url) for f in self.job.source.files]
            check_shared_storage(places, self.job.storage_options, self.nodes)
            try:
                return super().execute()
            except ray.exceptions.RayTaskError as e:  # our own error inside a task: its one line, not Ray's pages
                cause = getattr(e, "cause", None)
                if isinstance(cause, (ValueError, OSError)):
                    raise cause from None
                raise

    def _absolute(self, url: str) -> str:
        """A local path travels absolute: on another machine the driver's folder need not exist."""
        fs, _ = storage.open_fs(url, self.job.storage_options)
        return os.path.abspath(url) if storage.is_local(fs) and "://" not in url else url

    def _spec(self) -> phases.Spec:
        job = self.job
        return phases.Spec(
            out=self._absolute(self.url), storage_options=job.storage_options, kind=job.source.kind, pack=job.pack, fmt=job.fmt,
            cmp_len=job.cmp_len, seq_len=job.seq_len, dtype=self.dtype, eos_id=job.tokenizer.eos_token_id,
            pad_id=pad_id(job.tokenizer), tokenizer_sha=self.tok_sha, columns=tuple(job.source.columns),
            shard_size=job.shard_size, seed=job.seed, val_frac=job.val_frac, reader=job.source.reader,
        )

    def _stream(self, progress: dict, tokenizer_json: str) -> Manifest:
        started = time.perf_counter()
        self.skipped = 0  # the local executor's resume count; this one reports units and shards instead
        spec = self._spec()
        facts = self._tokenize(spec, self._plan_units(spec))
        splits, tasks = phases.plan_shards(facts, spec, self.job.max_docs)
        between = time.perf_counter()
        shards = self._write_shards(spec, tasks)
        self.phase_seconds = (between - started, time.perf_counter() - between)
        for split in SPLITS:
            splits[split].shards = [shards[shard_path(t.split, t.index, spec.fmt)] for t in tasks if t.split == split]
        return self._finish(splits, time.perf_counter() - started)

    def _plan_units(self, spec: phases.Spec) -> list[units.Unit] | None:
        """The unit list (None: the stream is staged as it is read), checked against an interrupted run's."""
        job = self.job
        source = job.source
        files = [dataclasses.replace(f, url=self._absolute(f.url)) for f in source.files]
        unit_list = units.plan(files, source.reader, job.storage_options, job.unit_size) if files else None
        plan = {"params": self.params, "unit_size": job.unit_size,
                "units": "staged" if unit_list is None else [asdict(u) for u in unit_list]}
        plan = json.loads(json.dumps(plan))
        path = spec.work(PLAN_NAME)
        if storage.exists(self.fs, path):
            old = json.loads(storage.read_bytes(self.fs, path))
            self._check_params(old["params"], path)
            if old != plan:
                print(f"{self.url}: the inputs or --unit_size changed since the interrupted run; starting its work over")
                storage.remove_tree(self.fs, spec.work())
        if not storage.exists(self.fs, path):
            storage.write_atomic(self.fs, path, json.dumps(plan).encode())
        return unit_list

    def _bar(self, total: int | None, what: str) -> tqdm:
        return tqdm(total=total, unit=what, desc=f"{self.job.name} {what}s", mininterval=1.0, delay=2.0)

    def _map(self, remote: ray.remote_function.RemoteFunction, spec: phases.Spec, items: Iterable,
             on_result: Callable, stop: Callable[[], bool] = lambda: False) -> None:
        """Submit a task per item in order, at most IN_FLIGHT_PER_CPU per CPU ahead; hand each result over."""
        pending: list = []
        limit = IN_FLIGHT_PER_CPU * self.cpus + 1

        def collect() -> None:
            ready, pending[:] = ray.wait(pending, num_returns=1)
            for ref in ready:
                on_result(ray.get(ref))

        for item in items:
            if stop():
                break
            while len(pending) >= limit:
                collect()
            pending.append(remote.remote(spec, item))
        while pending:
            collect()

    def _tokenize(self, spec: phases.Spec, unit_list: list[units.Unit] | None) -> list[phases.UnitFacts]:
        """Phase 1. Returns the facts of units 0..k in order: all units, or up to the one that reaches --max_docs."""
        job = self.job
        if unit_list is None:
            docs = iter(job.source) if job.max_docs is None else itertools.islice(job.source, job.max_docs)
            items: Iterable[units.Unit] = units.stage(docs, self.fs, spec.work(phases.STAGED_DIR), job.unit_size)
        else:
            items = unit_list
        facts: dict[int, phases.UnitFacts] = {}
        prefix = {"units": 0, "documents": 0}  # the run of finished units from unit 0: what --max_docs counts
        bar, started, tokens = self._bar(None if unit_list is None else len(unit_list), "unit"), time.perf_counter(), 0

        def done(f: phases.UnitFacts) -> None:
            nonlocal tokens
            facts[f.index] = f
            while prefix["units"] in facts:
                prefix["documents"] += facts[prefix["units"]].documents
                prefix["units"] += 1
            tokens += int(f.lengths.sum())
            bar.update(1)
            bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - started, 1e-9):,.0f}", refresh=False)

        def enough() -> bool:
            return job.max_docs is not None and prefix["documents"] >= job.max_docs

        try:
            self._map(_tokenize, spec, items, done, enough)
        finally:
            bar.close()
        ordered = [facts[i] for i in range(prefix["units"])]
        self.units_done = (len(ordered), sum(f.skipped for f in ordered))
        return ordered

    def _write_shards(self, spec: phases.Spec, tasks: list[phases.ShardTask]) -> dict[str, ShardInfo]:
        """Phase 2: the gathers of shards that span many units, then every shard; their records by path."""
        gathers = [g for t in tasks for g in t.gathers]
        shards: dict[str, ShardInfo] = {}
        skipped = 0
        bar, started = self._bar(len(tasks) + len(gathers), "shard"), time.perf_counter()
        bar.set_description(f"{self.job.name} shards" + (f" (and {len(gathers)} gathers)" if gathers else ""))

        def done(result) -> None:
            nonlocal skipped
            bar.update(1)
            if isinstance(result, bool):  # a gather
                return
            info, was_done = result
            shards[info.path] = info
            skipped += was_done
            mb = sum(x.bytes for x in shards.values()) / 1e6
            bar.set_postfix(MB_s=f"{mb / max(time.perf_counter() - started, 1e-9):,.1f}", refresh=False)

        try:
            self._map(_gather, spec, gathers, done)
            self._map(_write_shard, spec, tasks, done)
        finally:
            bar.close()
        self.shards_done = (len(tasks), skipped, len(gathers))
        return shards

    def _summary(self, m: Manifest, seconds: float) -> None:
        super()._summary(m, seconds)
        nodes = f"{self.nodes} node{'s' if self.nodes > 1 else ''}"
        print(f"{m.name}: ray on {nodes}, {self.cpus} CPUs: {self.units_done[0]} units "
              f"({self.units_done[1]} already done), {self.shards_done[0]} shards ({self.shards_done[1]} already done, "
              f"{self.shards_done[2]} gathers); "
              f"phase 1 {self.phase_seconds[0]:.1f} s, phase 2 {self.phase_seconds[1]:.1f} s")


"""How the data stages run their per-record work: a chunk of rows at a time, so memory does not
grow with the data set, on the cores of this machine.

A stage streams its input through `chunked`, hands each chunk to `map_chunks` (a pool of
worker processes when there is more than one chunk and more than one core; in process
otherwise) and gets the results back in input order, whatever the number of workers: the
outputs do not depend on it. What a stage must see whole (the GX table of per-row facts,
MinHash signatures, group ids) it keeps as small per-record arrays; the records themselves
wait in a `Spool` on disk for the pass that writes them out.

Two environment variables tune it without touching params (they never change an output):
DATA_CHUNK_ROWS (rows per chunk, 10000) and DATA_WORKERS (processes; the cores this process
may use).

`data.engine: ray` runs the same chunk functions as Ray Data `map_batches` tasks on a Ray
cluster (RAY_ADDRESS, or a local one of DATA_WORKERS CPUs), and `group_map` runs a grouping
(the MinHash LSH buckets) as a Ray Data groupby shuffle. This process still reads the inputs
and writes the outputs: Ray spreads the per-record work, not the files.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import shutil
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import count, islice
from pathlib import Path

CHUNK_ROWS = 10_000  # rows a worker takes at a time: a few MB of records, ~1 s of work


def chunk_rows() -> int:
    return max(1, int(os.environ.get("DATA_CHUNK_ROWS", CHUNK_ROWS)))


def workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, int(os.environ.get("DATA_WORKERS", cores or 1)))


def chunked(rows: Iterable, size: int | None = None) -> Iterator[list]:
    """Lists of `size` (DATA_CHUNK_ROWS) consecutive rows."""
    size = size or chunk_rows()
    rows = iter(rows)
    while chunk := list(islice(rows, size)):
        yield chunk


def map_chunks(
    work: Callable,
    chunks: Iterable,
    setup: Callable | None = None,
    setup_args: tuple = (),
    engine: str = "local",
) -> Iterator:
    """work(chunk) for each chunk, in order. `setup(*setup_args)` prepares each worker (loads a
    tokenizer, say) and `work` reads what it prepared; both are module-level functions, so a
    worker process can import them. A few chunks are in flight at a time, not the whole input.
    engine="ray": Ray tasks do the work (`ray_map_chunks`)."""
    setup = setup or _nothing
    if engine == "ray":
        yield from ray_map_chunks(work, chunks, setup, setup_args)
        return
    chunks = iter(chunks)
    first = next(chunks, None)
    if first is None:
        return
    second = next(chunks, None)
    if second is None or workers() == 1:
        setup(*setup_args)
        for chunk in [first] if second is None else _chain(first, second, chunks):
            yield work(chunk)
        return
    import multiprocessing

    # forked workers must not inherit a tokenizer's thread pool: each runs single-threaded
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    with multiprocessing.get_context().Pool(workers(), setup, setup_args) as pool:
        pending: deque = deque()
        for chunk in _chain(first, second, chunks):
            pending.append(pool.apply_async(work, (chunk,)))
            if len(pending) > 2 * workers():
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _nothing(*args) -> None:
    pass


# --- the Ray engine ------------------------------------------------------------------------


def ray_session():
    """The `ray` module, connected: to the cluster at RAY_ADDRESS (this project's stages/
    package shipped to its workers, which need the locked packages installed), or to a local
    one of DATA_WORKERS CPUs started for this process. Results come back in input order."""
    try:
        import ray
    except ImportError:
        from stages.common.config import StageError

        raise StageError(
            "data.engine=ray: Ray is not installed; `make install` (the lock has it) or "
            "`pip install -e '.[ray]'`"
        ) from None
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        package = Path(__file__).resolve().parents[1]  # stages/
        ray.init(
            address=address or None,
            num_cpus=None if address else workers(),
            runtime_env={"py_modules": [str(package)]} if address else None,
            include_dashboard=False,
            logging_level="WARNING",
            log_to_driver=False,
        )
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # not 3 lines per dataset
    return ray


def ray_map_chunks(work: Callable, chunks: Iterable, setup: Callable, setup_args: tuple):
    """map_chunks on Ray: a window of chunks at a time (a few per CPU of the cluster) becomes a
    Ray Data dataset of one chunk per row, and `map_batches` runs `work` on each, one chunk
    per call, in Ray's worker processes; `setup` runs once per process."""
    ray = ray_session()
    work, setup = _by_reference(work), _by_reference(setup)
    window = max(8, 4 * int(ray.cluster_resources().get("CPU", 1)))
    token = os.urandom(8).hex()  # this call's setup, not an earlier one's
    for part in chunked(chunks, window):
        items = [{"chunk": pickle.dumps(c, protocol=pickle.HIGHEST_PROTOCOL)} for c in part]
        dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _ray_work, batch_size=1, fn_args=(work, setup, setup_args, token)
        )
        for row in dataset.iter_rows():
            yield pickle.loads(row["result"])


def _by_reference(function: Callable) -> Callable:
    """The function as its module's, not __main__'s: a stage runs as `python -m stages.X`, and
    Ray pickles a __main__ function by value, each task with its own copy of the module's
    globals (what setup prepared would be lost between tasks)."""
    if function.__module__ == "__main__" and (spec := sys.modules["__main__"].__spec__):
        return getattr(importlib.import_module(spec.name), function.__name__)
    return function


_RAY_SETUP: set = set()  # the setup tokens this Ray worker process has run


def _ray_work(batch: dict, work: Callable, setup: Callable, setup_args: tuple, token: str):
    if token not in _RAY_SETUP:
        setup(*setup_args)
        _RAY_SETUP.clear()
        _RAY_SETUP.add(token)
    results = [pickle.dumps(work(pickle.loads(c)), pickle.HIGHEST_PROTOCOL) for c in batch["chunk"]]
    return {"result": results}


def group_map(blocks: Iterable[dict], by: list[str], work: Callable) -> Iterator[dict]:
    """work(group) for each group of rows with equal `by` columns, as a Ray Data groupby
    (a shuffle across the cluster): `blocks` are dicts of equal-length numpy columns, `work`
    gets one group's columns and returns columns; batches of its results come back."""
    ray = ray_session()
    import pyarrow as pa

    dataset = ray.data.from_arrow([pa.table(block) for block in blocks])
    # a shuffle partition or two per CPU (Ray's default of 200 costs seconds on small data)
    partitions = 2 * int(ray.cluster_resources().get("CPU", 1))
    grouped = dataset.groupby(by, num_partitions=partitions).map_groups(work, batch_format="numpy")
    yield from grouped.iter_batches(batch_format="numpy", batch_size=None)


def _chain(first, second, rest) -> Iterator:
    yield first
    yield second
    yield from rest


def iter_lines(path: Path) -> Iterator[str]:
    """The non-blank lines of a JSONL file this pipeline wrote, each ending in a newline: what
    write_jsonl would write for its row again, so a stage copies the rows it keeps as they are."""
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield line if line.endswith("\n") else line + "\n"


class Spool:
    """Chunks written to a temporary folder and read back in order: what a stage holds between
    its passes, on disk instead of in memory. A worker process writes its own chunk
    (`Spool.put(folder, index, chunk)`), so records do not travel back to the parent."""

    def __init__(self, parent: Path):
        Path(parent).mkdir(parents=True, exist_ok=True)
        for stale in Path(parent).glob(".spool-*"):  # left by a killed run (DVC runs one stage)
            shutil.rmtree(stale, ignore_errors=True)
        self.folder = Path(tempfile.mkdtemp(dir=parent, prefix=".spool-"))

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    @staticmethod
    def chunk_path(folder: Path | str, index: int) -> Path:
        return Path(folder) / f"{index:08d}.pickle"

    @staticmethod
    def put(folder: Path | str, index: int, chunk) -> None:
        with Spool.chunk_path(folder, index).open("wb") as f:
            pickle.dump(chunk, f, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def get(folder: Path | str, index: int):
        with Spool.chunk_path(folder, index).open("rb") as f:
            return pickle.load(f)

    def __iter__(self) -> Iterator:
        for index in count():
            if not self.chunk_path(self.folder, index).exists():
                return
            yield self.get(self.folder, index)

    def rows_file(self, name: str, width: int) -> RowsFile:
        return RowsFile(self.folder / name, width)


class RowsFile:
    """A per-row array too large to hold (MinHash signatures: 512 bytes a row), appended a
    chunk at a time to a file in the spool and read back memory-mapped."""

    def __init__(self, path: Path, width: int, dtype: str = "uint32"):
        self.path, self.width, self.dtype, self.rows = Path(path), width, dtype, 0
        self._file = self.path.open("wb")  # noqa: SIM115  (closed by read)

    def append(self, rows) -> None:
        import numpy as np

        self._file.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())
        self.rows += len(rows)

    def read(self):
        """The rows appended, memory-mapped ((0, width) when there are none)."""
        import numpy as np

        self._file.close()
        shape = (self.rows, self.width)
        if not self.rows:
            return np.zeros(shape, dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=shape)

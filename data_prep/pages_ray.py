"""`data_prep pages --engine ray`: the local engine's work per document, as Ray Data tasks on a Ray cluster.

    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=...     # everywhere, one secret (`ray get-auth-token --generate`)
    ray start --head --port 6379                      # on the head machine
    ray start --address HEAD:6379                     # on every other machine
    python -m data_prep pages --lang km --input /shared/pdfs/ s3://archive/km/ --output checkpoints/km/pages \
        --engine ray --address HEAD:6379 [--resume]   # on the head machine
    ray stop                                          # on every machine, when done

Each document is one Ray task. The task runs the local engine's own child process (`pages._run`: render, text-layer
check, OCR fallback, the address-space limit and the per-page timeout, the skip reasons) on whichever machine Ray
gives it, and sends back the document's rows as one Parquet shard (image bytes, text, provenance) with its
manifest entry. The command's own process (the driver) writes each shard, as it arrives, into the same work
folder the local engine uses (`.<output>.work/<key>.parquet` and `<key>.json`, `<key>` a hash of the input's path
or URL), and assembles the same `datasets` dataset and `manifest.json` from them at the end. Hence:

- the output folder is the same as the local engine's, with the same content fingerprint: every later stage reads
  it with `datasets.load_from_disk`, as before, and there is one reader;
- a killed run keeps its finished shards in the work folder; `--resume` sends only the missing documents to Ray
  (a run of either engine resumes the other's: the settings must match, not the engine);
- the output lives on the driver's disk and no shared filesystem is needed; each input is read by the machine
  that processes it: a URL (s3://, gs://, http://, file://: any fsspec protocol whose package is installed) is
  copied to a temporary file there, a local path must name the same file on every machine (a shared mount).

Every machine of the cluster is set up as this one (setup/install.sh: Tesseract, its language data, the fonts,
this project with `pip install '.[cluster]'`): the tasks run this package's code there.
Without `--address` a local Ray of `workers` CPUs starts and stops with the command; a Ray already started in
this process (a notebook, a test) is used as it is. The shards of a whole archive pass through the driver, which
then holds the dataset: size its disk for the pages (~100 kB a page at the default pixel budget).
"""

import importlib.util
import json
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from common.errors import UsageError

from .pages import ROW_SCHEMA, PageSettings, _key, _run, find_pdfs


def is_url(value: str) -> bool:
    return "://" in value


def check_ray(address: str | None) -> None:
    """Fail before any work when ray is missing or nothing answers at `address`."""
    if importlib.util.find_spec("ray") is None:
        raise UsageError(
            "--engine ray: ray is not installed; install it with `pip install '.[cluster]'` (or use --engine local)."
        )
    if address is None or address == "auto":  # auto: ray.init finds a cluster started here, or says it found none
        return
    # ray.init retries an address where nothing listens for minutes; a plain connection says so at once
    parts = urlsplit(address if is_url(address) else f"ray://{address}")
    try:
        socket.create_connection((parts.hostname, parts.port or 6379), timeout=5).close()
    except (OSError, ValueError) as error:
        raise UsageError(
            f"--address {address}: no Ray cluster answers there ({error}); start one with `ray start --head` on "
            "the head machine and pass the address it prints (HOST:6379), or leave --address out for a local Ray."
        ) from None


def find_inputs(inputs: list[str]) -> list[Path | str]:
    """The PDFs of every input in a stable order: local files and folders as the local engine finds them, and
    URLs (a PDF, or a folder searched recursively for *.pdf) listed with fsspec."""
    import fsspec

    found: dict[Path | str, None] = {}
    for value in inputs:
        if not is_url(value):
            found.update(dict.fromkeys(find_pdfs([value])))
            continue
        try:
            filesystem, root = fsspec.core.url_to_fs(value)
            if filesystem.isdir(root):
                listed = sorted(p for p in filesystem.find(root) if p.lower().endswith(".pdf"))
                found.update(dict.fromkeys(filesystem.unstrip_protocol(p) for p in listed))
            elif filesystem.isfile(root):
                found[value] = None
            else:
                raise FileNotFoundError("not found")
        except (ImportError, ValueError, OSError) as error:  # an unknown protocol, its package missing, no access
            raise UsageError(f"--input {value}: cannot be read ({error}); check the URL and its credentials.") from None
    return list(found)


@contextmanager
def ray_session(address: str | None, workers: int) -> Iterator[Callable]:
    """Ray connected for the run: the cluster at `address`, or a local Ray of `workers` CPUs. Yields the engine."""
    import ray

    started = not ray.is_initialized()
    if started:
        try:
            if address is None:
                # "local": a new Ray of its own, not a cluster that `ray start` left running on this machine
                ray.init(address="local", num_cpus=workers, include_dashboard=False)
            else:
                ray.init(address=address)
        except ConnectionError as error:
            # a cluster started with `ray start` refuses a driver without its token (Ray >= 2.59 may turn it on)
            raise UsageError(
                f"--address {address}: {error}; where the cluster uses token authentication, set RAY_AUTH_MODE=token "
                "here as on its machines (and RAY_AUTH_TOKEN, or the token file `ray get-auth-token` names)."
            ) from None
    try:
        yield run_on_ray
    finally:
        if started:
            ray.shutdown()


def run_on_ray(
    paths: list[Path | str],
    settings: PageSettings,
    workers: int,
    page_timeout_s: float,
    memory_mb: int,
    on_page: Callable[[int], None],
) -> Iterator[tuple[Path | str, pa.Table | list, dict]]:
    """(path, rows as a table, manifest entry) for each document as its Ray task finishes, in any order."""
    import ray.data

    if not paths:
        return
    given = {_key(path): path for path in paths}
    # local paths travel absolute (a node's working folder is not the driver's), and are reported as given
    items = [{"key": key, "input": str(path), "read": _readable(path)} for key, path in given.items()]
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver's own bar counts pages
    # one document a block: a long scanned book does not hold up the short documents queued behind it
    documents = ray.data.from_items(items, override_num_blocks=len(items)).map(
        _process_on_node,
        fn_kwargs={"settings": settings, "page_timeout_s": page_timeout_s, "memory_mb": memory_mb},
        num_cpus=1,
    )
    for done in documents.iter_rows():
        entry = json.loads(done["entry"])
        rows = pq.read_table(pa.BufferReader(done["shard"])) if done["shard"] else []
        on_page(len(rows))
        yield given[done["key"]], rows, entry


def _readable(path: Path | str) -> str:
    return str(path.resolve()) if isinstance(path, Path) else path


def _process_on_node(item: dict, settings: PageSettings, page_timeout_s: float, memory_mb: int) -> dict:
    """One document on a Ray worker: the local engine's child process on a local copy; the rows as Parquet bytes."""
    with tempfile.TemporaryDirectory(prefix="lco-pages-") as tmp:
        local = _local_copy(item["read"], Path(tmp))
        [(_, rows, entry)] = _run([local], settings, 1, page_timeout_s, memory_mb, on_page=lambda: None)
    # the manifest and the rows name the input as it was given, not the copy or the absolute path read here
    entry["path"] = item["input"]
    if "reason" in entry:
        entry["reason"] = entry["reason"].replace(str(local), item["input"])
    shard = b""
    if rows:
        sink = pa.BufferOutputStream()
        table = pa.Table.from_pylist([row | {"source": item["input"]} for row in rows], schema=ROW_SCHEMA)
        pq.write_table(table, sink)
        shard = sink.getvalue().to_pybytes()
    return {"key": item["key"], "entry": json.dumps(entry, ensure_ascii=False), "shard": shard}


def _local_copy(read: str, folder: Path) -> Path:
    if not is_url(read):
        return Path(read)
    import fsspec

    # the name is kept: doc_id is the file's stem and its content hash, whichever engine reads it
    local = folder / Path(urlsplit(read).path).name
    with fsspec.open(read, "rb") as source, open(local, "wb") as target:
        while chunk := source.read(2**20):
            target.write(chunk)
    return local

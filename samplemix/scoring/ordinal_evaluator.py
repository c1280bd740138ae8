"""Training SampleMix's quality evaluator: an encoder with an ordinal (CORAL) head.

The annotator gives each labelled document a rubric total, a level 0..K-1 (K = 10 for
the seven-dimension 0..9 rubric, method.md §1.1). ``train_scorer`` fine-tunes an encoder
on (text, level) pairs with a plain PyTorch loop, picks the epoch with the lowest
validation MAE and saves a standard transformers model directory; the pipeline's
``hf-classifier`` scorer loads it with no custom code and, through
``config.samplemix_readout``, reads it out as the expected level.

Heads (both on ``AutoModelForSequenceClassification``, i.e. the model's own pooler and
final ``Linear``):

``ordinal`` — CORAL (Cao, Mirjalili, Raschka 2020), implemented as in the paper: the
    K-1 logits z_k = w·h + b_k of P(level > k) share one weight vector w and have
    K-1 biases. During training the head ``Linear`` (K-1 outputs) is parametrised so
    that its K-1 weight rows are copies of one trained row; before saving the
    parametrisation is removed, leaving an ordinary ``Linear`` whose rows are equal,
    so ``from_pretrained`` needs nothing custom. Loss: the sum over k of the binary
    cross-entropy of z_k against [level > k], averaged over documents. Predicted level
    = the number of k with sigmoid(z_k) > 0.5 (CORAL's rule; with a shared w the
    probabilities are ordered whenever the biases are, which training yields);
    score = expected level sum_k sigmoid(z_k) in [0, K-1].
    Saved config: ``samplemix_readout = "ordinal"``, ``id2label = {k: "level>k"}``,
    ``problem_type = "multi_label_classification"`` (transformers' own loss on these
    logits is then the per-threshold BCE, CORAL's loss up to a factor K-1).
``classification`` — the baseline of the paper's Table 2: K logits, cross-entropy,
    predicted level = argmax, score = expected level sum_i softmax_i·i. Saved config:
    ``samplemix_readout = "expected"``, ``id2label = {i: "level=i"}``.

Both heads are trained identically (same split, seed, optimiser, schedule, epochs);
their biases start at the training levels' prior (CORAL: logit of the share of
training levels > k; classification: log share of each level, add-one smoothed), so
neither spends its first steps learning the marginal. Optimiser: AdamW (weight decay
0.01), linear warm-up over the first 10% of steps then linear decay to 0, gradient
norm clipped at 1. Metrics are computed on integer predicted levels: ACC (exact), MAE,
MSE and CACC (|error| <= 1); ``MAE_expected`` is the MAE of the continuous score the
pipeline uses. With the same seed on CPU a run is reproducible bit for bit (GPU kernels
may not be).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from samplemix.scoring.models import pretrained, resolve_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

RUBRIC_LEVELS = 10  # the seven dimensions' totals 0..9 (method.md §1.1)
METRIC_KEYS = ("ACC", "MAE", "MSE", "CACC")
Head = Literal["ordinal", "classification"]
HEADS: tuple[Head, ...] = ("ordinal", "classification")


# ---------------------------------------------------------------- ordinal maths


def ordinal_targets(levels: torch.Tensor, K: int) -> torch.Tensor:
    """float (n, K-1): entry k is 1 where level > k, else 0."""
    thresholds = torch.arange(K - 1, device=levels.device)
    return (levels.reshape(-1, 1) > thresholds).float()


def coral_loss(logits: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """CORAL loss: per document the sum over the K-1 thresholds of the binary
    cross-entropy of logit k against [level > k]; the mean over documents."""
    targets = ordinal_targets(levels, logits.shape[-1] + 1)
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
    return bce.sum(-1).mean()


def expected_level(logits: torch.Tensor) -> torch.Tensor:
    """(n,) sum_k sigmoid(logit_k): the expected level E[y] = sum_k P(y > k), in [0, K-1].

    Non-decreasing in every logit (each sigmoid is increasing)."""
    return torch.sigmoid(logits.float()).sum(-1)


def predicted_level(logits: torch.Tensor) -> torch.Tensor:
    """(n,) int64: the number of thresholds with sigmoid(logit_k) > 0.5, i.e. logit_k > 0."""
    return (logits > 0).sum(-1)


def class_expected_level(logits: torch.Tensor) -> torch.Tensor:
    """(n,) sum_i softmax_i · i for a K-way classification head (quality.py's 'expected')."""
    levels = torch.arange(logits.shape[-1], dtype=torch.float32, device=logits.device)
    return logits.float().softmax(-1) @ levels


def head_predictions(logits: torch.Tensor, head: Head) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer predicted level, expected level) for ``head``'s logits."""
    if head == "ordinal":
        return predicted_level(logits), expected_level(logits)
    return logits.argmax(-1), class_expected_level(logits)


def metrics(
    pred_levels: Sequence[int] | np.ndarray, true_levels: Sequence[int] | np.ndarray
) -> dict[str, float]:
    """ACC (exact), MAE, MSE and CACC (|error| <= 1) of integer predicted levels, as
    fractions/floats: {"ACC", "MAE", "MSE", "CACC"}."""
    pred = np.asarray(pred_levels, dtype=np.float64)
    true = np.asarray(true_levels, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim != 1 or len(pred) == 0:
        raise ValueError(f"need equal-length non-empty 1-D levels, got {pred.shape}, {true.shape}")
    err = np.abs(pred - true)
    return {
        "ACC": float(np.mean(err == 0)),
        "MAE": float(np.mean(err)),
        "MSE": float(np.mean(err**2)),
        "CACC": float(np.mean(err <= 1)),
    }


# ---------------------------------------------------------------- data


def split(
    n: int, val_share: float, seed: int, levels: Sequence[int] | np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train_idx, val_idx), both sorted int64, disjoint, covering 0..n-1.

    The validation set holds round(n·val_share) documents (at least 1 and at most n-1
    when 0 < val_share and n >= 2). Given ``levels`` it is stratified: each level
    contributes its share of the validation set (largest remainders decide the rounding),
    the documents picked at random within the level.
    """
    if not 0 <= val_share < 1:
        raise ValueError(f"val_share must be in [0, 1), got {val_share}")
    strata = np.zeros(n, dtype=np.int64) if levels is None else np.asarray(levels)
    if len(strata) != n:
        raise ValueError(f"levels has {len(strata)} entries for n = {n}")
    n_val = min(n - 1, max(1, round(n * val_share))) if val_share > 0 and n >= 2 else 0
    rng = np.random.default_rng(seed)
    groups = [rng.permutation(np.flatnonzero(strata == v)) for v in np.unique(strata)]
    quota = np.array([len(g) for g in groups], dtype=np.float64) * n_val / max(n, 1)
    take = np.floor(quota).astype(np.int64)
    for i in np.argsort(-(quota - take), kind="stable")[: n_val - int(take.sum())]:
        take[i] += 1
    picked = [g[:t] for g, t in zip(groups, take, strict=True)]
    val = np.sort(np.concatenate([*picked, np.empty(0, np.int64)]))
    train = np.setdiff1d(np.arange(n, dtype=np.int64), val)
    return train, val.astype(np.int64)


def load_training_pairs(
    labels_path: str | Path,
    texts_by_id: dict[str, str],
    *,
    missing: Literal["skip", "error"] = "skip",
) -> tuple[list[str], list[int], dict[str, int]]:
    """(texts, levels, skipped) from the annotator's labels Parquet (columns ``id`` and
    ``total``; others ignored) and a mapping id -> text.

    Rows are kept in file order. Skipped and counted in ``skipped``: ``null_total``
    (the annotation failed), ``missing_text`` (no text for the id: a warning names the
    first few; ``missing="error"`` raises ValueError instead) and ``duplicate_id`` (a
    later row of an id already used). A total that is negative or not an integer raises
    ValueError.
    """
    table = pq.read_table(labels_path, columns=["id", "total"])
    ids = table.column("id").cast("string").to_pylist()
    totals = table.column("total")
    if pa.types.is_floating(totals.type):  # written with NaN for missing: integral floats
        finite = pc.drop_null(pc.filter(totals, pc.invert(pc.is_nan(totals))))
        if len(finite) and not pc.all(pc.equal(finite, pc.floor(finite))).as_py():
            raise ValueError(f"{labels_path}: column total has non-integer values")
    elif not pa.types.is_integer(totals.type) and not pa.types.is_null(totals.type):
        raise ValueError(f"{labels_path}: column total is {totals.type}, not an integer")
    totals = totals.to_pylist()
    texts: list[str] = []
    levels: list[int] = []
    skipped = {"null_total": 0, "missing_text": 0, "duplicate_id": 0}
    absent: list[str] = []
    seen: set[str] = set()
    for doc_id, total in zip(ids, totals, strict=True):
        if total is None or (isinstance(total, float) and math.isnan(total)):
            skipped["null_total"] += 1
            continue
        if total < 0:
            raise ValueError(f"{labels_path}: id {doc_id!r} has a negative total {total}")
        if doc_id in seen:
            skipped["duplicate_id"] += 1
            continue
        text = texts_by_id.get(doc_id)
        if text is None:
            skipped["missing_text"] += 1
            absent.append(doc_id)
            continue
        seen.add(doc_id)
        texts.append(text)
        levels.append(int(total))
    if absent:
        message = (
            f"{labels_path}: {len(absent)} labelled id(s) have no text, e.g. "
            f"{', '.join(map(repr, absent[:5]))}"
        )
        if missing == "error":
            raise ValueError(message)
        log.warning("%s; skipped", message)
    return texts, levels, skipped


# ---------------------------------------------------------------- model


class _SharedRow(nn.Module):
    """Parametrisation of a (K-1, hidden) weight as K-1 copies of one trained row."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.rows = rows

    def forward(self, row: torch.Tensor) -> torch.Tensor:
        return row.repeat(self.rows, 1)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight[:1].clone()


def _head_linear(model: nn.Module, n_out: int) -> nn.Linear:
    """The model's output ``Linear`` (the last one with ``n_out`` outputs):
    ``classifier`` for BERT, ``classifier.out_proj`` for RoBERTa, ..."""
    found = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == n_out]
    if not found:
        raise ValueError(f"no output Linear with {n_out} outputs in {type(model).__name__}")
    return found[-1]


def _head_config(head: Head, K: int) -> dict:
    if head == "ordinal":
        id2label = {k: f"level>{k}" for k in range(K - 1)}
        problem_type = "multi_label_classification"
    else:
        id2label = {i: f"level={i}" for i in range(K)}
        problem_type = "single_label_classification"
    return {
        "num_labels": len(id2label),
        "id2label": id2label,
        "label2id": {v: k for k, v in id2label.items()},
        "problem_type": problem_type,
    }


def _build_model(base: str, head: Head, K: int, train_levels: np.ndarray):  # noqa: ANN202
    """``base`` with a fresh ``head`` (K-1 or K outputs), biases at the training prior;
    the ordinal head's weight rows tied (CORAL)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized weights" is the point here
    source, revision = pretrained(base)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, ignore_mismatched_sizes=True, **revision, **_head_config(head, K)
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    counts = np.bincount(train_levels, minlength=K).astype(np.float64)
    n = counts.sum()
    linear = _head_linear(model, K - 1 if head == "ordinal" else K)
    with torch.no_grad():
        if head == "ordinal":
            above = n - np.cumsum(counts)[:-1]  # training levels > k
            p = (above + 1) / (n + 2)
            prior = np.log(p / (1 - p))
        else:
            prior = np.log((counts + 1) / (n + K))
        if linear.bias is not None:
            linear.bias.copy_(torch.as_tensor(prior, dtype=linear.bias.dtype))
    if head == "ordinal":
        parametrize.register_parametrization(linear, "weight", _SharedRow(K - 1))
    model.config.samplemix_readout = "ordinal" if head == "ordinal" else "expected"
    model.config.samplemix_levels = K
    return model, linear


def _batch(encoded: dict[str, list[list[int]]], idx: np.ndarray, pad_id: int, device):  # noqa: ANN001, ANN202
    """Right-padded int64 tensors of the documents ``idx`` on ``device``."""
    width = max(len(encoded["input_ids"][i]) for i in idx)
    out = {}
    for key, rows in encoded.items():
        arr = np.full((len(idx), width), pad_id if key == "input_ids" else 0, dtype=np.int64)
        for r, i in enumerate(idx):
            arr[r, : len(rows[i])] = rows[i]
        out[key] = torch.from_numpy(arr).to(device)
    return out


def _autocast(device: torch.device):  # noqa: ANN202
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _evaluate(model, encoded, idx, levels, head, batch_size, pad_id, device) -> dict:  # noqa: ANN001
    """Metrics of the model on documents ``idx``, plus MAE of the expected level."""
    model.eval()
    preds, scores = [], []
    with torch.inference_mode():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            with _autocast(device):
                logits = model(**_batch(encoded, chunk, pad_id, device)).logits.float()
            pred, score = head_predictions(logits, head)
            preds.append(pred.cpu().numpy())
            scores.append(score.cpu().numpy())
    pred, score, true = np.concatenate(preds), np.concatenate(scores), levels[idx]
    return metrics(pred, true) | {"MAE_expected": float(np.mean(np.abs(score - true)))}


def train_scorer(
    texts: list[str],
    levels: Sequence[int],
    base: str,
    out_dir: str | Path,
    *,
    head: Head = "ordinal",
    K: int | None = None,
    epochs: int = 3,
    lr: float = 5e-5,
    batch_size: int = 16,
    max_length: int = 512,
    val_share: float = 0.1,
    seed: int = 0,
    device: str = "auto",
) -> dict:
    """Fine-tune ``base`` (local directory, hub id or 'minilm') with ``head`` on
    (text, level) pairs and save the best epoch's model and tokenizer to ``out_dir``.

    Levels are 0..K-1; ``K`` defaults to max(levels) + 1 (pass 10 for the rubric).
    A stratified ``val_share`` of the documents (``split``) is held out; after every
    epoch the model is evaluated there and the epoch with the lowest validation MAE
    (the earliest on ties) is kept. Writes ``out_dir/metrics.json`` and returns the
    same dict: the best epoch's validation ACC, MAE, MSE, CACC and MAE_expected at the
    top level, plus ``head``, ``K``, ``base``, ``n_train``, ``n_val``, ``best_epoch``,
    ``baseline`` (the metrics of always predicting the rounded mean training level)
    and ``history`` (per epoch: train_loss and the validation metrics).
    """
    from transformers import AutoTokenizer

    y, K = _checked_levels(texts, levels, head, K, val_share)
    train_idx, val_idx = split(len(y), val_share, seed, y)

    dev = resolve_device(device)
    torch.manual_seed(seed)  # fixes the fresh head's initial weights and the dropout
    source, revision = pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(source, **revision)
    pad_id = tokenizer.pad_token_id or 0
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    encoded = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    model, linear = _build_model(base, head, K, y[train_idx])
    model.to(dev)

    history, best_epoch, best_state = _best_epoch(
        model,
        encoded,
        y,
        train_idx,
        val_idx,
        head=head,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        pad_id=pad_id,
        seed=seed,
        device=dev,
    )
    model.load_state_dict(best_state)
    out = _saved_model_dir(model, linear, tokenizer, head, out_dir)
    mean_level = int(np.clip(round(float(y[train_idx].mean())), 0, K - 1))
    result = {
        **{k: v for k, v in history[best_epoch - 1].items() if k not in ("epoch", "train_loss")},
        "head": head,
        "K": K,
        "base": base,
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "best_epoch": best_epoch,
        "baseline": metrics(np.full(len(val_idx), mean_level), y[val_idx]),
        "history": history,
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _checked_levels(
    texts: list[str], levels: Sequence[int], head: str, K: int | None, val_share: float
) -> tuple[np.ndarray, int]:
    """(levels as int64, K) for ``train_scorer``, whose arguments it checks: ValueError
    names the first that is wrong. ``K`` None becomes max(levels) + 1 (at least 2)."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if len(texts) != len(levels):
        raise ValueError(f"{len(texts)} texts but {len(levels)} levels")
    y = np.asarray(levels, dtype=np.int64)
    if len(y) < 2:
        raise ValueError("need at least 2 labelled documents (one to train, one to validate)")
    K = int(K if K is not None else max(int(y.max()) + 1, 2))
    if K < 2 or y.min() < 0 or y.max() >= K:
        raise ValueError(f"levels must lie in 0..K-1 = 0..{K - 1} with K >= 2")
    if not 0 < val_share < 1:
        raise ValueError(f"val_share must be in (0, 1), got {val_share}")
    return y, K


def _best_epoch(
    model: PreTrainedModel,
    encoded: dict[str, list[list[int]]],
    levels: np.ndarray,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    *,
    head: Head,
    epochs: int,
    lr: float,
    batch_size: int,
    pad_id: int,
    seed: int,
    device: torch.device,
) -> tuple[list[dict], int, dict[str, torch.Tensor]]:
    """(history, best epoch, its state dict on CPU) of training ``model`` (on ``device``)
    for ``epochs`` epochs on the documents ``train_idx``, evaluating on ``val_idx``
    after each.

    ``history`` holds one dict per epoch: ``epoch`` (from 1), ``train_loss`` (mean over
    its batches) and the validation metrics of ``_evaluate``. The best epoch is the one
    with the lowest validation MAE, the earliest on ties. The model is left as trained
    after the last epoch; the caller loads the returned state.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    total_steps = max(1, epochs * math.ceil(len(train_idx) / batch_size))
    schedule = _warmup_then_decay(optimizer, total_steps)
    shuffle = torch.Generator().manual_seed(seed)  # its own stream: independent of the init
    targets = torch.from_numpy(levels).to(device)
    history: list[dict] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None  # (val MAE, epoch, state)
    for epoch in range(1, epochs + 1):
        model.train()
        order = train_idx[torch.randperm(len(train_idx), generator=shuffle).numpy()]
        losses = []
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            with _autocast(device):
                logits = model(**_batch(encoded, chunk, pad_id, device)).logits.float()
            target = targets[torch.from_numpy(chunk).to(device)]
            if head == "ordinal":
                loss = coral_loss(logits, target)
            else:
                loss = F.cross_entropy(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        val = _evaluate(model, encoded, val_idx, levels, head, batch_size, pad_id, device)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), **val})
        log.info("%s epoch %d: loss %.4f, val %s", head, epoch, np.mean(losses), val)
        if best is None or val["MAE"] < best[0]:  # strictly lower: the earliest wins ties
            state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            best = (val["MAE"], epoch, state)
    assert best is not None  # epochs >= 1
    return history, best[1], best[2]


def _warmup_then_decay(
    optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of ``optimizer`` over ``total_steps`` steps: linear
    warm-up over the first 10% (at least one step), then linear decay to 0."""
    warmup = max(1, total_steps // 10)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / max(1, total_steps - warmup))),
    )


def _saved_model_dir(
    model: PreTrainedModel,
    linear: nn.Linear,
    tokenizer: PreTrainedTokenizerBase,
    head: Head,
    out_dir: str | Path,
) -> Path:
    """``out_dir`` (created if needed) once ``model`` (moved to CPU) and ``tokenizer``
    are saved there as a plain transformers model directory."""
    if head == "ordinal":  # fold the shared row into an ordinary (K-1, hidden) Linear
        parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def compare_heads(
    texts: list[str], levels: Sequence[int], base: str, out_dir: str | Path, **kw: object
) -> dict:
    """Train the ordinal and the classification head the same way (same split, seed
    and settings; ``kw`` as for ``train_scorer``) into ``out_dir/ordinal`` and
    ``out_dir/classification``; returns {"ordinal": result, "classification": result}
    and writes it to ``out_dir/comparison.json`` and the table to
    ``out_dir/comparison.md``."""
    kw.pop("head", None)
    if kw.get("K") is None:
        kw["K"] = max(int(max(levels)) + 1, 2) if len(levels) else 2
    out = Path(out_dir)
    result = {h: train_scorer(texts, levels, base, out / h, head=h, **kw) for h in HEADS}
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "comparison.md").write_text(metrics_table(result))
    return result


def metrics_table(result: dict) -> str:
    """Markdown table like the paper's Table 2: one row per head present in ``result``
    (ordinal, classification), columns ACC and CACC in %, MAE and MSE."""
    lines = ["| head | ACC (%) | MAE | MSE | CACC (%) |", "| --- | ---: | ---: | ---: | ---: |"]
    for h in HEADS:
        if h in result:
            m = result[h]
            lines.append(
                f"| {h} | {100 * m['ACC']:.2f} | {m['MAE']:.3f} | {m['MSE']:.3f} "
                f"| {100 * m['CACC']:.2f} |"
            )
    n_val = {result[h].get("n_val") for h in HEADS if h in result} - {None}
    if n_val:
        lines.append("")
        lines.append(f"Validation documents: {', '.join(map(str, sorted(n_val)))}.")
    return "\n".join(lines) + "\n"


def train_from_labels(
    labels_path: str | Path,
    texts_by_id: dict[str, str],
    base: str,
    out_dir: str | Path,
    *,
    compare: bool = True,
    K: int | None = RUBRIC_LEVELS,
    missing: Literal["skip", "error"] = "skip",
    **kw: object,
) -> dict:
    """What ``samplemix train-scorer`` runs: load the labels, then train the ordinal
    head into ``out_dir`` (``compare=False``) or both heads into ``out_dir/ordinal`` and
    ``out_dir/classification`` (``compare=True``). The result carries ``skipped``
    (counts from ``load_training_pairs``)."""
    texts, levels, skipped = load_training_pairs(labels_path, texts_by_id, missing=missing)
    if compare:
        result = compare_heads(texts, levels, base, out_dir, K=K, **kw)
    else:
        result = {"ordinal": train_scorer(texts, levels, base, out_dir, K=K, **kw)}
    return {**result, "skipped": skipped}

"""Proxy-model engine: train a tiny causal LM on a mixture and report held-out losses.

The small-scale analogue of comparing mixtures by training models (method.md §4):
every candidate mixture trains the same small GPT (RegMix-like: 2 layers, 8 heads,
width 256 on CPU; 8 layers of width 384 on a GPU) from scratch, with the same tokenizer,
seed, schedule and number of training tokens, and is scored by its mean next-token loss
on held-out documents (per domain and on a target set). Lower loss at equal tokens =
better.

Everything is plain PyTorch in this one file:

- ``ProxyConfig`` (config.py, section ``evaluate.proxy``): model size, token budget,
  optimiser and schedule, seed, device; the vocabulary comes from the tokenizer. Fields
  left unset take the preset of the device (``PROXY_PRESETS``, ``ProxyConfig.resolved``):
  ``train_proxy`` resolves the config it is given on the device it runs on.
- ``GPT``: token + learned position embeddings, pre-LN blocks with causal
  ``scaled_dot_product_attention``, 4x GELU MLP, output head tied to the embedding or
  its own matrix (``tie_embeddings``).
- ``train_tokenizer`` / ``load_tokenizer``: byte-level BPE with the ``tokenizers``
  library (``<|endoftext|>`` is id 0), or any local Hugging Face fast tokenizer.
- ``pack``: documents joined by end-of-text tokens and cut into windows.
- ``train_proxy``: AdamW (or Muon for the blocks' matrices), linear warmup + cosine
  decay, grad clip 1.0, seeded.
- ``eval_loss``: token-weighted mean next-token loss over packed held-out documents.

Packing. The stream is ``eot d1 eot d2 eot ... dn eot`` (empty documents are
skipped): every document is preceded and followed by an end-of-text token, so every
document token and every document end is a prediction target exactly once, and a
document's first token is predicted from the ``eot`` context. Window ``i`` is
``stream[i*T : i*T + T + 1]`` (consecutive windows share one token); its inputs are
``w[:-1]`` and targets ``w[1:]``. Training drops the final partial window; evaluation
keeps it, padded with -1 (inputs read as ``eot``, targets ignored), so an eval loss
covers every token of its documents.

Token budget. One step trains on ``batch_size * seq_len`` target tokens; the run takes
``steps = ceil(tokens / (batch_size * seq_len))`` steps, so it trains on
``steps * batch_size * seq_len`` tokens: the requested ``tokens`` rounded up to whole
steps (``ProxyResult.tokens_trained``). The budget depends only on the config, never on
the mixture, so every mixture trained with one config sees the same number of tokens.

Sampling. Training windows are drawn in a seeded random order without replacement;
when all have been drawn a fresh permutation starts (an epoch). A mixture with fewer
tokens than the budget is therefore cycled (repeat epochs, logged as a warning: the gpu
preset's 320M tokens are more than a small mixture holds); ``ProxyResult.epochs`` says
how many times (windows drawn / windows available).

Optimisers. AdamW updates the embeddings (``embedding_lr``), an untied head
(``head_lr``) and the norms (``lr``, no decay); the blocks' matrices get AdamW at ``lr``
or, with ``optimizer: muon``, ``Muon`` at ``muon_lr``. Every rate follows one schedule.

Determinism. ``torch.manual_seed(seed)`` before the model is built and a
``numpy.random.default_rng(seed)`` for the window order: on CPU the same seed, data
and thread count give the identical loss curve. CUDA runs use bf16 autocast (config
``dtype``) and fused AdamW; they are seeded but not bit-reproducible.

Evaluation batches hold at least 4,096 tokens (``max(batch_size, 4096 // seq_len)``
windows): the CPU preset's 4-window steps would otherwise score the sets 4 windows at a
time.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samplemix.config import ProxyConfig
from samplemix.scoring.models import load_tokenizer as hf_tokenizer
from samplemix.scoring.models import resolve_device, resolve_model

log = logging.getLogger(__name__)

EOT = "<|endoftext|>"
IGNORE = -1  # padding in packed eval windows; an ignored target


# --------------------------------------------------------------------------- config


def cosine_lr(
    step: int, total_steps: int, warmup_steps: int, lr: float, min_lr_ratio: float
) -> float:
    """Learning rate at 0-based ``step``: linear warmup, then cosine decay to the minimum.

    Warmup: ``lr * (step + 1) / warmup_steps`` for ``step < warmup_steps`` (reaches ``lr``
    at its last step). Then with ``p = (step - warmup_steps) / (total_steps - warmup_steps
    - 1)``: ``min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2``, ``min_lr = lr *
    min_lr_ratio``, so the first step after warmup runs at ``lr`` and the last at ``min_lr``.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    min_lr = lr * min_lr_ratio
    span = total_steps - warmup_steps - 1
    p = min(1.0, (step - warmup_steps) / span) if span > 0 else 1.0
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


def _amp_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if dtype == "float32":
        return None
    if device.type == "cuda":
        return torch.bfloat16
    if dtype == "bfloat16":
        raise ValueError("dtype='bfloat16' (autocast) is for CUDA only; use 'auto' or 'float32'")
    return None


def _autocast(device: torch.device, amp: torch.dtype | None):  # noqa: ANN202
    if amp is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp)


# --------------------------------------------------------------------------- model


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ProxyConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, c // self.n_head).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, cfg: ProxyConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=False)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A small decoder-only transformer (nanoGPT-style, no dropout, no linear biases).
    ``cfg``: a resolved ProxyConfig (``ProxyConfig.resolved``)."""

    def __init__(self, cfg: ProxyConfig, vocab_size: int) -> None:
        super().__init__()
        if not cfg.is_resolved:
            raise ValueError("GPT needs a resolved ProxyConfig: cfg.resolved(device)")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.wte = nn.Embedding(vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.wte.weight
        # GPT-2 init: N(0, 0.02); residual output projections scaled by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
        if cfg.zero_init:  # after drawing every matrix, so the others keep their values
            for name, p in self.named_parameters():
                if name.endswith("proj.weight") or (name == "head.weight"):
                    nn.init.zeros_(p)

    def block_matrices(self) -> list[nn.Parameter]:
        """The blocks' 2-D weights (attention and MLP): Muon's share with optimizer muon."""
        return [p for p in self.blocks.parameters() if p.dim() == 2]

    def num_params(self) -> int:
        """Parameters, counting the tied embedding once."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx, targets: (B, T) int64, T <= seq_len; targets of -1 are ignored.
        Returns logits (B, T, V) and the mean next-token loss (None without targets)."""
        t = idx.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds seq_len={self.cfg.seq_len}")
        pos = torch.arange(t, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            targets.reshape(-1),
            ignore_index=IGNORE,
        )
        return logits, loss


# --------------------------------------------------------------------------- tokenizer


def _tokenizer_file(path: str | Path) -> Path:
    path = Path(path)
    return path if path.suffix == ".json" else path / "tokenizer.json"


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: str | Path):  # noqa: ANN201
    """Train a byte-level BPE tokenizer (``tokenizers``) on ``texts`` and save it.

    ``<|endoftext|>`` is the only special token and gets id 0; the 256 byte symbols are
    always in the vocabulary, so any text encodes and decodes back exactly. ``path`` is
    a directory (the file is ``path/tokenizer.json``) or a ``.json`` file name.
    Returns the ``tokenizers.Tokenizer``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"vocab_size={vocab_size} < {len(alphabet) + 1} (256 bytes + {EOT})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out = _tokenizer_file(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return tok


@dataclass(frozen=True)
class ProxyTokenizer:
    """A ``tokenizers.Tokenizer`` with its end-of-text id; encodes without special tokens."""

    backend: object  # tokenizers.Tokenizer
    eot_id: int
    name: str = ""

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # The fast path leaves out character offsets, which nobody here reads.
        encs = self.backend.encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encs]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(path_or_name: str | Path) -> ProxyTokenizer:
    """Load a ``tokenizer.json`` (file, or a directory holding only one) or a local
    Hugging Face tokenizer directory / cached hub id / packaged name (``minilm``).

    The end-of-text id is ``<|endoftext|>`` if the vocabulary has it, else the HF
    tokenizer's eos token, else its sep token. Needs a fast (Rust) tokenizer.
    """
    from tokenizers import Tokenizer

    name = str(path_or_name)
    path = Path(resolve_model(name))
    if path.is_file() or (path.is_dir() and not (path / "tokenizer_config.json").exists()):
        file = _tokenizer_file(path)
        backend = Tokenizer.from_file(str(file))
        eot = backend.token_to_id(EOT)
        if eot is None:
            raise ValueError(f"{file} has no {EOT} token; use a directory with its HF config")
        return ProxyTokenizer(backend, eot, name)
    hf = hf_tokenizer(name)
    if not getattr(hf, "is_fast", False):
        raise ValueError(f"{name}: a fast tokenizer (tokenizer.json) is needed")
    backend = Tokenizer.from_str(hf.backend_tokenizer.to_str())  # a copy we may reconfigure
    backend.no_truncation()
    backend.no_padding()
    eot = backend.token_to_id(EOT)
    if eot is None:
        eot = hf.eos_token_id if hf.eos_token_id is not None else hf.sep_token_id
    if eot is None:
        raise ValueError(f"{name}: no {EOT}, eos or sep token to separate documents")
    return ProxyTokenizer(backend, int(eot), name)


# --------------------------------------------------------------------------- packing


def pack(
    token_ids_per_doc: Iterable[Sequence[int]],
    seq_len: int,
    eot_id: int,
    keep_tail: bool = False,
) -> np.ndarray:
    """Join documents as ``eot d1 eot d2 ... dn eot`` and cut windows of seq_len + 1.

    Window i is ``stream[i*seq_len : i*seq_len + seq_len + 1]`` (consecutive windows
    share one token, so each token after the first is a target exactly once); x = w[:-1],
    y = w[1:]. Empty documents are skipped. The final partial window is dropped, or with
    ``keep_tail`` kept and padded with -1. Returns int32 of shape (n_windows, seq_len + 1)
    (possibly 0 windows).
    """
    eot = np.array([eot_id], dtype=np.int32)
    pieces = [eot]
    for doc in token_ids_per_doc:
        if len(doc):
            pieces += [np.asarray(doc, dtype=np.int32), eot]
    stream = np.concatenate(pieces) if len(pieces) > 1 else np.empty(0, dtype=np.int32)
    n_targets = max(0, len(stream) - 1)
    n = math.ceil(n_targets / seq_len) if keep_tail else n_targets // seq_len
    need = n * seq_len + 1
    if len(stream) < need:
        stream = np.concatenate([stream, np.full(need - len(stream), IGNORE, dtype=np.int32)])
    if n == 0:
        return np.empty((0, seq_len + 1), dtype=np.int32)
    windows = np.lib.stride_tricks.sliding_window_view(stream[:need], seq_len + 1)[::seq_len]
    return np.ascontiguousarray(windows)


def _check_ids(windows: np.ndarray, vocab_size: int, what: str) -> None:
    real = windows[windows != IGNORE]
    if real.size and (real.min() < 0 or real.max() >= vocab_size):
        raise ValueError(
            f"{what}: token ids span [{real.min()}, {real.max()}], outside vocab_size={vocab_size}"
        )


def _batch_indices(n_windows: int, batch_size: int, rng: np.random.Generator) -> Iterator:
    """Window indices, batch_size at a time, in seeded permutations (one per epoch)."""
    perm, pos = rng.permutation(n_windows), 0
    while True:
        parts, need = [], batch_size
        while need:
            if pos == n_windows:
                perm, pos = rng.permutation(n_windows), 0
            take = min(need, n_windows - pos)
            parts.append(perm[pos : pos + take])
            pos += take
            need -= take
        yield np.concatenate(parts)


def _to_xy(w: np.ndarray, device: torch.device, eot_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(w).to(device=device, dtype=torch.long, non_blocking=True)
    x, y = t[:, :-1], t[:, 1:]
    return x.masked_fill(x == IGNORE, eot_id), y


# --------------------------------------------------------------------------- eval


@torch.no_grad()
def eval_loss(
    model: GPT,
    ids_per_doc: Iterable[Sequence[int]],
    seq_len: int,
    eot_id: int,
    batch_size: int,
    device: str | torch.device,
    amp_dtype: torch.dtype | None | Literal["auto"] = "auto",
) -> float:
    """Mean next-token loss (nats per token) over documents packed as in training.

    Token-weighted: the summed loss of every target token in the packed windows (all
    document tokens and each document's closing eot) over their count; the last window
    is padded, not dropped. No gradient; the model's train/eval mode is restored.
    ``amp_dtype``: 'auto' = bf16 autocast on CUDA, none on CPU; or a dtype, or None.
    """
    device = torch.device(device)
    amp = (torch.bfloat16 if device.type == "cuda" else None) if amp_dtype == "auto" else amp_dtype
    windows = pack(ids_per_doc, seq_len, eot_id, keep_tail=True)
    if len(windows) == 0:
        raise ValueError("eval set has no tokens")
    _check_ids(windows, model.vocab_size, "eval set")
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    try:
        for start in range(0, len(windows), batch_size):
            x, y = _to_xy(windows[start : start + batch_size], device, eot_id)
            with _autocast(device, amp):
                logits, _ = model(x)
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(),
                y.reshape(-1),
                ignore_index=IGNORE,
                reduction="sum",
            )
            total += loss.double()
            count += int((y != IGNORE).sum())
    finally:
        model.train(was_training)
    return float(total) / count


# --------------------------------------------------------------------------- training


@dataclass
class ProxyResult:
    """A trained proxy: the model (eval mode, on its device) and what the run measured."""

    model: GPT
    config: ProxyConfig
    loss_curve: list[tuple[int, float]]  # (steps done, mean train loss since the last point)
    eval_losses: dict[str, float] = field(default_factory=dict)  # nats per token
    steps: int = 0
    tokens_trained: int = 0  # steps * batch_size * seq_len (ProxyConfig.tokens_trained)
    train_windows: int = 0  # packed windows available
    epochs: float = 0.0  # windows drawn / windows available (> 1: the mixture was cycled)
    n_params: int = 0
    device: str = "cpu"
    seconds: float = 0.0


#: Newton–Schulz quintic coefficients of Muon (Keller Jordan's, as torch.optim.Muon).
_NS = (3.4445, -4.775, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Muon's approximate orthogonalisation of a 2-D ``g``: ``steps`` Newton–Schulz
    iterations in bf16 on ``g / ||g||_F`` (singular values pushed towards ~1)."""
    a, b, c = _NS
    x = g.bfloat16()
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights: Nesterov momentum, then the update orthogonalised
    (``orthogonalize``) and scaled by ``sqrt(max(1, rows / cols))``; no weight decay.
    The same steps as ``torch.optim.Muon(adjust_lr_fn='original', weight_decay=0)`` of
    torch >= 2.9, here so that any torch >= 2.2 trains the same proxy."""

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.95) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        for group in self.param_groups:
            mu = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - mu)
                update = orthogonalize(p.grad.lerp(buf, mu))
                p.add_(update, alpha=-group["lr"] * math.sqrt(max(1, p.size(0) / p.size(1))))


def _optimizers(model: GPT, cfg: ProxyConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """AdamW for the embeddings, an untied head, the norms (and the block matrices with
    optimizer 'adamw'); Muon for the block matrices with optimizer 'muon'. Each group
    keeps its peak rate as ``peak_lr`` for the schedule."""
    embeddings = [model.wte.weight, model.wpe.weight]
    head = [] if cfg.tie_embeddings else [model.head.weight]
    matrices = model.block_matrices()
    norms = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": embeddings, "weight_decay": cfg.weight_decay, "peak_lr": cfg.embedding_lr},
        {"params": norms, "weight_decay": 0.0, "peak_lr": cfg.lr},
    ]
    if head:
        groups.append({"params": head, "weight_decay": cfg.weight_decay, "peak_lr": cfg.head_lr})
    if cfg.optimizer == "adamw":
        groups.append({"params": matrices, "weight_decay": cfg.weight_decay, "peak_lr": cfg.lr})
    fused = {"fused": True} if device.type == "cuda" else {}
    opts: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **fused)
    ]
    if cfg.optimizer == "muon":
        opts.append(Muon([{"params": matrices, "peak_lr": cfg.muon_lr}], lr=cfg.muon_lr))
    return opts


def train_proxy(
    train_ids: Iterable[Sequence[int]],
    cfg: ProxyConfig,
    vocab_size: int,
    eot_id: int,
    eval_sets: dict[str, Iterable[Sequence[int]]] | None = None,
    log_every: int = 10,
    eval_batch_size: int | None = None,
) -> ProxyResult:
    """Train a fresh ``GPT`` on ``cfg.steps`` batches of packed ``train_ids`` windows,
    then score each eval set with ``eval_loss``. ``cfg`` is resolved on its device first
    (``ProxyConfig.resolved``: unset fields take that device's preset); the result's
    ``config`` is the resolved one.

    A mixture with fewer windows than the steps draw is cycled (repeat epochs): the
    result's ``epochs`` says how many, and a warning is logged.

    ``train_ids``: token ids per document (the mixture, in any order), each id in
    [0, vocab_size); ``eot_id`` joins documents (``pack``). ``loss_curve``
    gets a point every ``log_every`` steps and at the last step: (steps done, mean
    training loss over the steps since the previous point); ``log_every=1`` records
    every step's loss.
    """
    if log_every < 1:
        raise ValueError("log_every must be >= 1")
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    cfg = cfg.resolved(str(device))
    amp = _amp_dtype(cfg.dtype, device)
    if not 0 <= eot_id < vocab_size:
        raise ValueError(f"eot_id={eot_id} is outside vocab_size={vocab_size}")
    windows = pack(train_ids, cfg.seq_len, eot_id)
    if len(windows) == 0:
        raise ValueError(f"training data is shorter than one window of {cfg.seq_len + 1} tokens")
    _check_ids(windows, vocab_size, "training data")
    steps, warmup = cfg.steps, cfg.warmup_steps
    epochs = steps * cfg.batch_size / len(windows)
    if epochs > 1:
        log.warning(
            "proxy: the mixture holds %d windows of %d tokens (%d tokens), fewer than the "
            "%d the budget draws (%d tokens, %s preset): it is cycled %.2f times",
            len(windows),
            cfg.seq_len,
            len(windows) * cfg.seq_len,
            steps * cfg.batch_size,
            cfg.tokens_trained,
            cfg.preset,
            epochs,
        )

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = GPT(cfg, vocab_size).to(device)
    model.train()
    opts = _optimizers(model, cfg, device)
    batches = _batch_indices(len(windows), cfg.batch_size, rng)
    curve: list[tuple[int, float]] = []
    running = torch.zeros((), device=device)
    since = 0
    for step in range(steps):
        scale = cosine_lr(step, steps, warmup, 1.0, cfg.min_lr_ratio)
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = group["peak_lr"] * scale
        x, y = _to_xy(windows[next(batches)], device, eot_id)
        with _autocast(device, amp):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        running += loss.detach().float()
        since += 1
        if (step + 1) % log_every == 0 or step + 1 == steps:
            curve.append((step + 1, float(running) / since))
            lr = cfg.lr * scale
            log.info("proxy step %d/%d loss %.4f lr %.2e", step + 1, steps, curve[-1][1], lr)
            running.zero_()
            since = 0

    model.eval()
    eval_batch = eval_batch_size or max(cfg.batch_size, 4096 // cfg.seq_len)
    evals = {
        name: eval_loss(model, ids, cfg.seq_len, eot_id, eval_batch, device, amp)
        for name, ids in (eval_sets or {}).items()
    }
    return ProxyResult(
        model=model,
        config=cfg,
        loss_curve=curve,
        eval_losses=evals,
        steps=steps,
        tokens_trained=cfg.tokens_trained,
        train_windows=len(windows),
        epochs=epochs,
        n_params=model.num_params(),
        device=str(device),
        seconds=time.perf_counter() - t0,
    )

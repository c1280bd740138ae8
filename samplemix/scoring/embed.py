"""Document embeddings: transformers encoder, mean pooling, L2-normalised; a model2vec
static model (samplemix/scoring/static_embed.py) when ``embed.model`` is one."""

from __future__ import annotations

import numpy as np
import torch

from samplemix.config import EmbedConfig
from samplemix.scoring import models
from samplemix.scoring.static_embed import embed_static, is_static, static_truncated


def mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (b, t, h) over the positions where ``mask`` (b, t) is 1."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def embed_texts(texts: list[str], cfg: EmbedConfig) -> np.ndarray:
    """Embed ``texts`` with ``cfg.model`` truncated to ``cfg.max_length`` tokens.

    Returns float32 (n, dim), each row L2-normalised, in input order. Batches are
    formed over length-sorted documents so that each holds about ``cfg.batch_tokens``
    padded tokens; results do not depend on the batching. A static model (is_static)
    is read to ``cfg.max_length`` tokens by samplemix.scoring.static_embed.embed_static.
    """
    if is_static(cfg.model):
        return embed_static(texts, cfg.model, cfg.max_length)
    tokenizer = models.load_tokenizer(cfg.model)
    model = models.load_model(cfg.model, "encoder", cfg.device, compile=cfg.compile)
    device = models.resolve_device(cfg.device)
    dtype = models.resolve_dtype(cfg.dtype, device)
    batch_tokens = models.resolve_batch_tokens(cfg.batch_tokens, device)
    dim = model.config.hidden_size
    out = np.empty((len(texts), dim), dtype=np.float32)
    if not texts:
        return out

    def forward(enc: dict[str, torch.Tensor]) -> np.ndarray:
        pooled = mean_pooled(model(**enc).last_hidden_state.float(), enc["attention_mask"])
        return torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()

    batches = models.device_batches(tokenizer, texts, cfg.max_length, batch_tokens, device)
    amp = dtype if dtype != torch.float32 else None
    for idx, rows in models.batch_outputs(
        batches, forward, device, amp, concurrent=not cfg.compile
    ):
        out[idx] = rows
    return out


def truncated_count(texts: list[str], cfg: EmbedConfig) -> int:
    """How many ``texts`` are longer than ``cfg.max_length`` tokens, so that their
    embedding covers only their beginning."""
    if is_static(cfg.model):
        return static_truncated(texts, cfg.model, cfg.max_length)
    return models.count_truncated(models.load_tokenizer(cfg.model), texts, cfg.max_length)

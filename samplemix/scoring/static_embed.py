"""Static embeddings (model2vec) distilled from a transformer encoder: a fast CPU path.

``distill_static`` runs the encoder once over every token of its vocabulary and keeps
one vector per token; a document's embedding is then the mean of its tokens' vectors,
L2-normalised, with no transformer at run time. The distilled folder carries the base
model's own tokenizer files and one vector per base token id, so the budget tokenizer
(``tokens.tokenizer`` defaults to ``embed.model``) counts exactly what the base counts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from samplemix.scoring.models import model_cached, prefixes, resolve_model

if TYPE_CHECKING:
    from model2vec import StaticModel
    from tokenizers import Tokenizer

# Copied verbatim from the base model so that transformers.AutoTokenizer loads the
# base's tokenizer from the distilled folder (model2vec reads only tokenizer.json).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
MODEL2VEC_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def distill_static(base: str, out: str, pca_dims: int | None = 256) -> Path:
    """Distill the local encoder ``base`` ('minilm' or a folder) into a static model in
    ``out`` and return that folder. Nothing is downloaded.

    Vectors are float32, (vocabulary size of the base tokenizer, ``pca_dims`` or the
    base's hidden size when None), SIF-weighted by model2vec; rows of ids model2vec
    drops from its vocabulary (``[CLS]``, ``[SEP]``, ``[MASK]``, ``[unusedN]``) are zero.
    Raises FileNotFoundError when ``base`` is not a local folder.
    """
    from model2vec import StaticModel
    from model2vec.distill import distill
    from tokenizers import Tokenizer

    src = Path(resolve_model(base)).expanduser()
    if not (src / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"base model {base!r} is not a local folder with a tokenizer.json; distill_static "
            "reads local models only"
        )
    distilled = distill(str(src), pca_dims=pca_dims, quantize_to="float32")
    # model2vec renumbers the vocabulary (it drops special and [unusedN] tokens); put every
    # vector back at its base token id so that the base tokenizer indexes the table.
    base_tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    base_ids = base_tok.get_vocab(with_added_tokens=True)
    table = np.zeros((max(base_ids.values()) + 1, distilled.dim), dtype=np.float32)
    for token, i in distilled.tokenizer.get_vocab(with_added_tokens=True).items():
        if token not in base_ids:
            raise ValueError(f"distilled token {token!r} is not in the base vocabulary")
        table[base_ids[token]] = distilled.embedding[i]
    static = StaticModel(
        vectors=table,
        tokenizer=base_tok,
        config=distilled.config,
        normalize=True,
        base_model_name=distilled.base_model_name,
    )
    dest = Path(out).expanduser()
    static.save_pretrained(dest)
    for name in TOKENIZER_FILES:  # the base's files as they are (padding, truncation)
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
    # model2vec records where the base was read (the packaged MiniLM's install path, which
    # differs per machine and so would change the fingerprint) and writes a model card
    # claiming the MIT licence: keep the base's name, and say whose licence applies.
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps(config | {"tokenizer_name": base}, indent=4))
    pca = f"PCA to {pca_dims} dimensions" if pca_dims else "no PCA"
    (dest / "README.md").write_text(
        f"# Static embedder distilled from {base}\n\nWritten by `samplemix distill-embedder` "
        f"(model2vec, {pca}). The licence of {base} applies (the packaged all-MiniLM-L6-v2: "
        "Apache-2.0).\n"
    )
    return dest


def is_static(name: str) -> bool:
    """True when ``resolve_model(name)`` is a local folder holding a model2vec model:
    config.json with model_type 'model2vec', model.safetensors and tokenizer.json."""
    path = Path(resolve_model(name)).expanduser()
    if not all((path / f).is_file() for f in MODEL2VEC_FILES):
        return False
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "model2vec"
    except (OSError, ValueError, AttributeError):
        return False


def load_static(name: str) -> StaticModel:
    """The model2vec model in ``resolve_model(name)``, once per process and state of its
    files (models.model_cached), its vectors as float32 (numpy's float16 arithmetic is slow
    and imprecise)."""

    def load() -> StaticModel:
        from model2vec import StaticModel

        path = resolve_model(name)
        model = StaticModel.from_pretrained(path, normalize=True, force_download=False)
        if np.issubdtype(model.embedding.dtype, np.floating):
            model.embedding = model.embedding.astype(np.float32)
        return model

    return model_cached(("static", name), name, load)


def _truncating_tokenizer(name: str, max_length: int) -> Tokenizer:
    """The static model's tokenizer keeping at most ``max_length`` tokens, unpadded;
    built once per process, length and state of the files (rebuilding it costs ~40 ms,
    a fifth of the time a 400-document shard takes to embed)."""

    def build() -> Tokenizer:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(load_static(name).tokenizer.to_str())
        tok.no_padding()
        tok.enable_truncation(max_length)
        return tok

    return model_cached(("static-tokenizer", name, max_length), name, build)


def first_tokens(name: str, texts: list[str], max_length: int) -> list[np.ndarray]:
    """The ids of each text's first ``max_length`` tokens under the static model
    ``name`` (no special tokens): int64 arrays.

    Tokenises each text's start (models.prefixes: cut at whitespace), and the whole text
    where that start holds too few tokens. (model2vec's StaticModel.encode cuts at
    max_length · median token length characters, mid-word: 6 of the shared corpus's 8,400
    documents then gave it fewer than 256 tokens.)
    """
    tok = _truncating_tokenizer(name, max_length)
    cut, was_cut = prefixes(texts, max_length)
    encs = tok.encode_batch_fast(cut, add_special_tokens=False)
    out = [np.asarray(e.ids, dtype=np.int64) for e in encs]
    short = [i for i in np.flatnonzero(was_cut) if len(out[i]) < max_length]
    whole = tok.encode_batch_fast([texts[i] for i in short], add_special_tokens=False)
    for i, e in zip(short, whole, strict=True):
        out[i] = np.asarray(e.ids, dtype=np.int64)
    return out


def embed_static(texts: list[str], model: str, max_length: int) -> np.ndarray:
    """Embed ``texts`` with the static model ``model``, each read to its first
    ``max_length`` tokens (static models add no special tokens).

    Returns float32 (n, dim), each row L2-normalised, in input order: the normalised mean
    of the vectors of the text's tokens, [UNK] skipped after truncation (model2vec's
    StaticModel.encode pooling, with exact truncation: see first_tokens). A text with no
    known token gets the normalised mean of the whole vector table.
    """
    sm = load_static(model)
    out = np.zeros((len(texts), sm.dim), dtype=np.float32)
    for r, ids in enumerate(first_tokens(model, texts, max_length)):
        ids = ids[ids != sm.unk_token_id] if sm.unk_token_id is not None else ids
        if len(ids):
            rows = sm.embedding[ids if sm.token_mapping is None else sm.token_mapping[ids]]
            if sm.weights is not None:
                rows = rows * sm.weights[ids][:, None]
            out[r] = rows.mean(axis=0)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    empty = norms[:, 0] == 0
    if empty.any():
        out[empty] = sm.embedding.mean(axis=0, dtype=np.float64)
        norms[empty] = np.linalg.norm(out[empty], axis=1, keepdims=True)
    return out / norms.clip(min=1e-12)


def static_truncated(texts: list[str], model: str, max_length: int) -> int:
    """How many ``texts`` are longer than ``max_length`` tokens under the static model's
    tokenizer, so that ``embed_static`` reads only their beginning."""
    return sum(len(ids) > max_length for ids in first_tokens(model, texts, max_length + 1))

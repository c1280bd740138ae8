"""Model identity: fingerprints follow the weights' bytes, and a process reloads a model
whose files were replaced behind the same path (a long-lived Dask worker would
otherwise score with the old one under the new model's cache keys)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_classifier
from transformers import AutoModelForSequenceClassification

from samplemix.config import Config, ConfigError
from samplemix.scoring import models
from samplemix.scoring.models import (
    LOADED_MAX,
    _loaded,
    load_model,
    load_tokenizer,
    local_version,
    model_fingerprint,
    pinned,
)
from samplemix.scoring.onednn import with_onednn_linears

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TEXTS = ["The committee met on Tuesday.", "def f(x):\n    return x + 1"]


def logits(model: torch.nn.Module, path: Path) -> torch.Tensor:
    enc = load_tokenizer(str(path))(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model(**enc).logits


def fresh_classifier(path: Path) -> torch.nn.Module:
    """The classifier saved at ``path``, loaded by transformers alone, with the CPU
    linears load_model gives it (samplemix.scoring.onednn), so that logits compare bit for bit."""
    return with_onednn_linears(AutoModelForSequenceClassification.from_pretrained(path).eval())


def sizes(path: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in path.iterdir()}


def test_retrained_weights_of_the_same_size_change_the_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "scorer"
    save_tiny_classifier(path, num_labels=1, seed=0)
    before, before_sizes = model_fingerprint(str(path)), sizes(path)
    copy = shutil.copytree(path, tmp_path / "copy")
    save_tiny_classifier(path, num_labels=1, seed=1)
    assert sizes(path) == before_sizes  # nothing but the weights' bytes tells them apart
    model_fingerprint.cache_clear()  # as every flow run and plan does when it starts
    assert model_fingerprint(str(path)) != before
    # The same bytes elsewhere (another machine's copy) hash the same.
    assert model_fingerprint(str(copy)) == before


def test_a_model_replaced_behind_its_path_is_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "scorer"
    save_tiny_classifier(path, num_labels=1, seed=0)
    first = load_model(str(path), "classifier", "cpu")
    assert load_model(str(path), "classifier", "cpu") is first  # unchanged: kept
    version = local_version(str(path))
    save_tiny_classifier(path, num_labels=1, seed=1)
    assert local_version(str(path)) != version
    second = load_model(str(path), "classifier", "cpu")
    assert second is not first
    fresh = fresh_classifier(path)
    assert torch.equal(logits(second, path), logits(fresh, path))
    assert not torch.allclose(logits(first, path), logits(second, path))


def test_loading_leaves_the_model_folder_as_it_was(tmp_path: Path) -> None:
    """A load that wrote into the folder would make every later call reload."""
    path = tmp_path / "scorer"
    save_tiny_classifier(path, num_labels=2)
    version = local_version(str(path))
    load_model(str(path), "classifier", "cpu")
    load_tokenizer(str(path))
    assert local_version(str(path)) == version
    assert local_version("minilm") == local_version("minilm")
    assert local_version("some-org/some-hub-model") == ()


def test_a_later_run_reads_the_stored_fingerprint_until_a_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hashing a 14 GB scorer took ~12 s at every run's start; the hash is stored with
    the files' local_version and read back while no file changed."""
    monkeypatch.setattr(models, "FINGERPRINTS", tmp_path / "fingerprints")
    path = tmp_path / "scorer"
    save_tiny_classifier(path, num_labels=1)
    fingerprint = model_fingerprint(str(path))
    (record,) = (tmp_path / "fingerprints").iterdir()
    # The record answers the next run, not the bytes: a value written into it is believed
    stored = json.loads(record.read_text())
    record.write_text(json.dumps(stored | {"fingerprint": "f" * 16}))
    model_fingerprint.cache_clear()  # as every flow run and plan does when it starts
    assert model_fingerprint(str(path)) == "f" * 16
    # until a file changes, even to the same bytes: then the folder is hashed again.
    weights = next(path.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())
    model_fingerprint.cache_clear()
    assert model_fingerprint(str(path)) == fingerprint
    assert json.loads(record.read_text())["fingerprint"] == fingerprint
    # Nowhere to store it (a read-only home): hashed at every run, no error.
    monkeypatch.setattr(models, "FINGERPRINTS", record / "not-a-folder")
    model_fingerprint.cache_clear()
    assert model_fingerprint(str(path)) == fingerprint


RACE = """
import threading
from samplemix.scoring import models
errors = []
def run(load):
    try:
        load()
    except Exception as e:
        errors.append(repr(e))
def model():
    return models.load_model("minilm", "encoder", "cpu")
loads = [lambda: models.load_tokenizer("minilm"), model]
threads = [threading.Thread(target=run, args=(f,)) for f in loads * 2]
[t.start() for t in threads]
[t.join() for t in threads]
assert model() is model()
print(errors)
"""


def test_threads_loading_models_at_once_in_a_fresh_process() -> None:
    """A Dask worker with several threads starts its first tasks together; transformers
    fails when two threads first touch it at once, unless loads take turns."""
    res = subprocess.run([sys.executable, "-c", RACE], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_a_long_lived_process_keeps_only_the_recently_used_models(tmp_path: Path) -> None:
    """A worker meeting scorer after scorer (versioned folders) must not hold them all."""
    first = tmp_path / "v0"
    save_tiny_classifier(first, num_labels=1)
    kept = load_model(str(first), "classifier", "cpu")
    for v in range(1, LOADED_MAX + 1):
        save_tiny_classifier(tmp_path / f"v{v}", num_labels=1, seed=v)
        load_model(str(tmp_path / f"v{v}"), "classifier", "cpu")
    assert len(_loaded) <= LOADED_MAX
    assert load_model(str(first), "classifier", "cpu") is not kept  # evicted, loaded again
    newest = tmp_path / f"v{LOADED_MAX}"
    again = load_model(str(newest), "classifier", "cpu")
    assert load_model(str(newest), "classifier", "cpu") is again


# ---------------------------------------------------------------- hub ids

A, B = "a" * 40, "b" * 40


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 - publish(commit, seed)
    """A Hugging Face cache on disk, read offline, as huggingface_hub lays it out: each
    commit's files under snapshots/<commit>/, the commit ``main`` points to in refs/main.
    Returns publish(commit, seed): a tiny classifier at that commit, made ``main``."""
    import huggingface_hub.constants as hf

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # for worker processes started now
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = cache / "models--org--scorer"

    def publish(commit: str, seed: int) -> Path:
        save_tiny_classifier(repo / "snapshots" / commit, num_labels=1, seed=seed)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        return repo / "snapshots" / commit

    return publish


def test_a_hub_id_is_pinned_to_the_commit_main_points_to(hub) -> None:  # noqa: ANN001
    """Fingerprinting a hub id by its name kept scores of replaced weights: the name
    is now pinned to a commit, which names the weights, and loads read that commit."""
    folder_a = hub(A, seed=0)
    assert pinned("org/scorer") == f"org/scorer@{A}"
    assert pinned(f"org/scorer@{A}") == f"org/scorer@{A}"
    assert pinned("org/scorer@main") == f"org/scorer@{A}"
    assert pinned("minilm") == "minilm"
    fp_a = model_fingerprint(f"org/scorer@{A}")
    model_a = load_model(f"org/scorer@{A}", "classifier", "cpu")
    fresh_a = fresh_classifier(folder_a)
    assert torch.equal(logits(model_a, folder_a), logits(fresh_a, folder_a))

    folder_b = hub(B, seed=1)  # new weights pushed to main
    assert pinned("org/scorer") == f"org/scorer@{B}"
    assert model_fingerprint(f"org/scorer@{B}") != fp_a
    model_b = load_model(f"org/scorer@{B}", "classifier", "cpu")
    assert not torch.allclose(logits(model_b, folder_b), logits(model_a, folder_a))
    # The old commit still loads its own weights.
    assert load_model(f"org/scorer@{A}", "classifier", "cpu") is model_a


def test_a_hub_id_that_cannot_be_resolved_is_a_clear_error(hub) -> None:  # noqa: ANN001
    hub(A, seed=0)
    with pytest.raises(ConfigError, match=r"'org/other'.*hub id.*org/model@<commit>"):
        pinned("org/other")
    with pytest.raises(ConfigError, match=r"'org/scorer@v2'.*cache does not have it"):
        pinned("org/scorer@v2")


def test_an_unreachable_hub_pins_to_the_cached_commit_and_says_so(
    hub,  # noqa: ANN001
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not offline, but the Hub does not answer (a closed port here): the cache's commit
    may be behind the Hub's, so the run goes on with it and a warning."""
    import huggingface_hub.constants as hf

    hub(A, seed=0)
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf, "ENDPOINT", "http://127.0.0.1:9")
    with caplog.at_level("WARNING", logger="samplemix.scoring.models"):
        assert pinned("org/scorer") == f"org/scorer@{A}"
    assert "could not be reached" in caplog.text and "may be behind" in caplog.text


def test_a_config_is_pinned_in_every_field_that_names_a_model(hub) -> None:  # noqa: ANN001
    from samplemix.config import load_config
    from samplemix.pipeline.keys import pinned_config

    hub(A, seed=0)
    cfg = load_config(
        None,
        {
            "corpus.input": "x",
            "corpus.domain_model": "org/scorer",
            "tokens.tokenizer": "org/scorer",
            "quality": [
                {"scorer": "hf-classifier", "model": "org/scorer"},
                {"scorer": "heuristic"},
            ],
            "evaluate.tokenizer": "org/scorer",
        },
    )
    p = pinned_config(cfg)
    at_a = f"org/scorer@{A}"
    assert (p.corpus.domain_model, p.tokens.tokenizer, p.evaluate.tokenizer) == (at_a,) * 3
    assert p.quality[0].model == at_a and p.quality[0].label == "hf-classifier:scorer"
    assert p.quality[1] == cfg.quality[1] and p.embed == cfg.embed  # nothing to pin
    assert pinned_config(p) == p
    untrained = cfg.model_copy(
        update={"evaluate": cfg.evaluate.model_copy(update={"tokenizer": "train"})}
    )
    assert pinned_config(untrained).evaluate.tokenizer == "train"


def test_a_run_rescores_once_the_hub_model_moves_and_keeps_the_rest(
    hub,  # noqa: ANN001
    tmp_path: Path,
    prefect_server: str,
) -> None:
    """Rebuilds on a schedule with a hub scorer: a new commit on main recomputes the
    scores (and what follows them), nothing else. Its own worker, to read the cache."""
    from conftest import save_tiny_encoder, tiny_config, write_tiny_corpus

    from flows.mix import run_mix
    from flows.runtime import shared_cluster
    from samplemix.pipeline import keys
    from samplemix.pipeline.plan import plan_rows, plan_steps

    def plan(cfg: Config) -> dict[str, tuple[str, str]]:
        steps = plan_steps(cfg, keys.store_for(cfg), keys.output_for(cfg))
        return {stage: (status, why) for stage, _, status, why in plan_rows(steps)}

    hub(A, seed=0)
    unpinned = tiny_config(
        write_tiny_corpus(tmp_path / "corpus", docs_per_domain=8, shards_per_domain=1),
        tmp_path / "out",
        **{"quality.scorer": "hf-classifier", "quality.model": "org/scorer"},
        **{"embed.model": save_tiny_encoder(tmp_path / "encoder"), "compute.n_workers": 1},
    )
    with shared_cluster(unpinned) as cfg:  # one worker for both runs
        assert run_mix(cfg)["computed"]["quality"] == 3
        assert {status for status, _ in plan(cfg).values()} == {"cached"}
        hub(B, seed=1)
        moved = plan(cfg)
        assert moved["quality"] == ("compute", "config changed: quality.model")
        assert moved["embed"][0] == moved["tokens"][0] == "cached"
        computed = run_mix(cfg)["computed"]
        assert computed["quality"] == computed["weights"] == 3
        assert computed["embed"] == computed["tokens"] == 0
        assert {status for status, _ in plan(cfg).values()} == {"cached"}

"""Model identity: fingerprints follow the weights' bytes, and a process reloads a model
whose files were replaced behind the same path (a long-lived Dask worker would
otherwise score with the old one under the new model's cache keys)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_classifier
from transformers import AutoModelForSequenceClassification

from samplemix.models import (
    LOADED_MAX,
    _loaded,
    load_model,
    load_tokenizer,
    local_version,
    model_fingerprint,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TEXTS = ["The committee met on Tuesday.", "def f(x):\n    return x + 1"]


def logits(model: torch.nn.Module, path: Path) -> torch.Tensor:
    enc = load_tokenizer(str(path))(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model(**enc).logits


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
    fresh = AutoModelForSequenceClassification.from_pretrained(path).eval()
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


RACE = """
import threading
from samplemix import models
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

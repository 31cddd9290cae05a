"""A hub id is loaded at the revision its params pin. No hub is reachable here, so the hub is a
Hugging Face cache laid out as the hub client writes it (`models--org--name/snapshots/<commit>/`)
and read offline: transformers finds a revision's files there exactly as it would after a download,
and finds nothing for a revision the cache does not hold. Each case runs in a fresh process, since
huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE once, at import.

A local path with a revision is refused before any work (params validation, exit 2): its content
is what fingerprints and loads, and a revision there would pin nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from contract.markers import read_marker
from tests.spec_files import write_spec_file

REPO = Path(__file__).resolve().parents[2]
HUB_ID = "fixture/tiny-qwen3"
CACHED = "a" * 40  # the one commit of HUB_ID the cache holds
ABSENT = "b" * 40


@pytest.fixture
def hub_env(tmp_path: Path) -> dict[str, str]:
    """An offline hub cache holding HUB_ID at commit CACHED only (no refs/main: unpinned finds nothing)."""
    snapshot = tmp_path / "hub" / "models--fixture--tiny-qwen3" / "snapshots" / CACHED
    shutil.copytree(REPO / "fixtures" / "models" / "tiny-qwen3", snapshot)
    return {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


LOAD = """
import sys
from stages.hf_model import load_causal_lm, load_tokenizer
from stages.runtime import StageInputError
revision = sys.argv[1] or None
try:
    tokenizer = load_tokenizer("fixture/tiny-qwen3", "params.model", revision)
    model = load_causal_lm("fixture/tiny-qwen3", "float32", "params.model", revision=revision)
except StageInputError as error:
    print(error)
else:
    print(type(model).__name__, model.config.num_hidden_layers, type(tokenizer).__name__)
"""


def load_at(revision: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", LOAD, revision], env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_model_and_its_tokenizer_load_at_the_pinned_revision_only(hub_env):
    assert load_at(CACHED, hub_env) == "Qwen3ForCausalLM 2 TokenizersBackend"
    assert load_at(ABSENT, hub_env) == (
        f"params.model: no tokenizer loadable from '{HUB_ID}' at revision {ABSENT} (We couldn't connect to "
        "'https://huggingface.co' to load the files, and couldn't find them in the cached files.)")
    assert load_at("", hub_env).startswith(f"params.model: no tokenizer loadable from '{HUB_ID}' (")


def run_preprocess(out: Path, env: dict[str, str], **params: object) -> subprocess.CompletedProcess:
    data = REPO / "fixtures" / "openscience" / "openscience.jsonl"
    spec = write_spec_file(out, "preprocess", {"source": str(data), "seq_len": 256, "max_rows": 8, **params},
                           stage="preprocess")
    return subprocess.run([sys.executable, "-m", "stages.preprocess", "--spec", str(spec)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def test_preprocess_reads_its_hub_tokenizer_at_tokenizer_revision(hub_env, tmp_path):
    pinned = run_preprocess(tmp_path / "pinned", hub_env, tokenizer=HUB_ID, tokenizer_revision=CACHED)
    assert pinned.returncode == 0, pinned.stderr
    assert read_marker(tmp_path / "pinned").state == "succeeded"
    elsewhere = run_preprocess(tmp_path / "elsewhere", hub_env, tokenizer=HUB_ID, tokenizer_revision=ABSENT)
    assert elsewhere.returncode == 2  # the stage's input is bad: marked failed, exit 2
    marker = read_marker(tmp_path / "elsewhere")
    assert marker.state == "failed" and marker.error.startswith(
        f"preprocess: tokenizer: cannot load {HUB_ID} at revision {ABSENT}: ")


def test_a_revision_with_a_local_path_is_refused_before_any_work(hub_env, tmp_path):
    local = str(REPO / "fixtures" / "tokenizer")
    refused = run_preprocess(tmp_path / "local", hub_env, tokenizer=local, tokenizer_revision=CACHED)
    assert refused.returncode == 2
    marker = read_marker(tmp_path / "local")
    assert marker.state == "failed" and marker.outputs == []
    assert marker.error == (f"preprocess: params: tokenizer_revision: tokenizer {local} is a local path; a "
                            "revision pins hub ids only (drop it: local content is fingerprinted)")

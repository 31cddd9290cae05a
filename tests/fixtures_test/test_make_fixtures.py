"""The committed fixtures are what scripts/make_fixtures.py makes, and they load like the real thing."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "fixtures"


def _make_fixtures_module():
    spec = importlib.util.spec_from_file_location("make_fixtures", REPO / "scripts" / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# What make_fixtures.py writes by default (other fixtures/ folders belong to other tests).
MADE = ["openscience", "tokenizer", "models/tiny-qwen3", "models/small-qwen3"]


def _content(path: Path) -> bytes:
    """A file's bytes, less the stamp of the transformers release that wrote a model config.

    save_pretrained writes `"transformers_version"` into config.json and generation_config.json;
    a new transformers release changes that line and nothing the fixtures are made of.
    """
    if path.name not in ("config.json", "generation_config.json"):
        return path.read_bytes()
    config = json.loads(path.read_text())
    config.pop("transformers_version", None)
    return json.dumps(config, sort_keys=True).encode()


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(_content(p)).hexdigest()
            for part in MADE for p in sorted((root / part).rglob("*")) if p.is_file()}


@pytest.mark.slow  # trains the tokenizer and builds two models: ~10 s
def test_regenerating_gives_the_committed_files(tmp_path: Path):
    _make_fixtures_module().main(["--out", str(tmp_path)])
    made = digests(tmp_path)
    assert len(made) >= 15 and made == digests(FIXTURES)


def test_rows_are_deterministic_and_openscience_shaped(tmp_path: Path):
    _make_fixtures_module().main(["--out", str(tmp_path), "--only", "data"])
    regenerated = (tmp_path / "openscience" / "openscience.jsonl").read_bytes()
    assert regenerated == (FIXTURES / "openscience" / "openscience.jsonl").read_bytes()
    rows = [json.loads(line) for line in regenerated.decode().splitlines()]
    assert len(rows) == 400 and len({row["input"] for row in rows}) == 400
    assert set(rows[0]) == {"input", "output", "license", "generator"}
    for row in rows:  # R1-style: reasoning in a think block, then the answer
        assert row["output"].startswith("<think>\n") and "\n</think>\n\n" in row["output"]
        assert row["output"][-4:] in {"(A).", "(B).", "(C).", "(D)."}
    assert any("λ" in row["input"] or "Ω" in row["input"] for row in rows)
    assert sum(len(row["output"]) > 3000 for row in rows) >= 20  # some run past a 512-token seq_len


def test_tokenizer_and_model_load_like_a_hub_qwen3():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "models" / "tiny-qwen3")
    assert 2000 <= len(tokenizer) <= 4000
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    chat = [{"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(tokenizer("λ = 2π√(L/g), 4.7 μH")["input_ids"]) == "λ = 2π√(L/g), 4.7 μH"
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / "models" / "tiny-qwen3")
    assert model.config.model_type == "qwen3" and not model.config.tie_word_embeddings
    assert model.config.vocab_size >= len(tokenizer) and model.config.vocab_size % 64 == 0
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()

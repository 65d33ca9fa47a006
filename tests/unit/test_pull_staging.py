"""Staging for `pull`: hidden until complete, one writer at a time, kept for a resume only when useful,
and replacing an existing adapter without a moment where its name is missing."""

from __future__ import annotations

import os

import pytest

from trtllm_peft.pull import staging
from trtllm_peft.pull.errors import PullError
from trtllm_peft.pull.source import PullRequest
from trtllm_peft.pull.staging import Staging, check_free

REQUEST = PullRequest.of("hf:me/lora")


def test_staging_is_hidden_and_commit_renames_it_into_place(tmp_path):
    with Staging(tmp_path, REQUEST) as stage:
        assert stage.dir.parent == tmp_path and stage.dir.name.startswith(".pull-lora-")
        (stage.dir / "adapter_config.json").write_text("{}")
        target = stage.commit(stage.dir)
    assert target == tmp_path / "lora" and os.listdir(tmp_path) == ["lora"]
    assert os.listdir(target) == ["adapter_config.json"]


@pytest.mark.parametrize(
    ("kind", "kept"), [("network", True), ("interrupted", True), ("not_lora", False), ("auth", False)]
)
def test_failed_pull_keeps_staging_only_when_a_rerun_can_resume(tmp_path, kind, kept):
    with pytest.raises(PullError), Staging(tmp_path, REQUEST) as stage:
        (stage.dir / "part").write_bytes(b"1234")
        raise PullError(kind, "stop")
    assert [p.name for p in tmp_path.iterdir()] == ([stage.dir.name] if kept else [])


def test_an_empty_staging_directory_is_not_left_behind(tmp_path):
    with pytest.raises(PullError), Staging(tmp_path, REQUEST) as stage:
        (stage.dir / ".partial").mkdir()  # a download that failed before its first byte
        raise PullError("network", "cannot reach")
    assert os.listdir(tmp_path) == []


def test_a_second_writer_is_refused(tmp_path):
    with Staging(tmp_path, REQUEST), pytest.raises(PullError, match="another pull is writing") as err:
        Staging(tmp_path, REQUEST).__enter__()
    assert err.value.kind == "busy"


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-away-fallback"])
def test_force_replaces_an_existing_adapter_and_leaves_no_trace(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(staging, "_exchange", lambda a, b: False)
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "old.nemo").write_bytes(b"old")
    with pytest.raises(PullError, match="exists: pass --force"):
        check_free(tmp_path, "lora", force=False)
    with Staging(tmp_path, REQUEST, force=True) as stage:
        (stage.dir / "new.nemo").write_bytes(b"new")
        stage.commit(stage.dir)
    assert os.listdir(tmp_path) == ["lora"] and os.listdir(tmp_path / "lora") == ["new.nemo"]


def test_an_empty_directory_of_that_name_is_not_an_adapter(tmp_path):
    (tmp_path / "lora").mkdir()  # what NIM's instructions create before `huggingface-cli download`
    check_free(tmp_path, "lora", force=False)
    with Staging(tmp_path, REQUEST) as stage:
        (stage.dir / "a.nemo").write_bytes(b"x")
        stage.commit(stage.dir)
    assert os.listdir(tmp_path / "lora") == ["a.nemo"]

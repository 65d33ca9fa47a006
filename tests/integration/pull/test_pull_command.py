"""`trtllm-peft pull`: many at once, the command line, a running server picking up what it pulls."""

from __future__ import annotations

import argparse

import httpx
import pytest

from tests.integration.conftest import Server, wait_for
from tests.integration.pull.conftest import (
    NVAPI,
    hf_creds,
    visible,
)
from trtllm_peft.pull import Credentials, PullError, PullRequest, pull_one
from trtllm_peft.pull.command import add_pull_arguments, run_pull
from trtllm_peft.settings import Settings


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_pull_arguments(parser)
    return parser.parse_args(list(argv))


def test_from_file_pulls_in_parallel_and_prints_a_table(
    hub, ngc, tmp_path, hf_files, nemo_files, capsys, smollm2_engine
):
    hub.add_repo("me/one", hf_files)
    (nemo,) = nemo_files.values()
    ngc.add_version("nim/loras/two", "v1", {"two.nemo": nemo})
    listing = tmp_path / "adapters.txt"
    listing.write_text(
        "# adapters for smollm2\nhf:me/one\nngc:nim/loras/two:v1  two\n\nhf:me/missing  three\n"
    )
    root = tmp_path / "loras"
    settings = Settings(hf_endpoint=hub.url, ngc_api_key=NVAPI, engine_dir=smollm2_engine)

    code = run_pull(_args("--from-file", str(listing), "--peft-source", str(root), "--no-progress"), settings)
    out = capsys.readouterr().out
    assert code == 1  # one of three failed
    assert visible(root) == ["one", "two"]
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "SOURCE", "STATUS", "SIZE", "TIME", "PROBLEM"]
    assert lines[1].split()[:3] == ["one", "hf:me/one", "ok"] and lines[2].split()[:3] == [
        "two",
        "ngc:nim/loras/two:v1",
        "ok",
    ]
    assert (
        lines[3].split()[:4] == ["three", "hf:me/missing", "failed:", "not_found"]
        and "no such repository" in lines[3]
    )
    assert "2 pulled, 1 failed" in out


def test_from_file_is_checked_before_anything_is_pulled(tmp_path):
    listing = tmp_path / "adapters.txt"
    listing.write_text("hf:me/a  same\nhf:me/b  same\ngit:me/c\n")
    with pytest.raises(PullError, match=r"adapters.txt:3: 'git:me/c' is not a source") as err:
        run_pull(_args("--from-file", str(listing), "--peft-source", str(tmp_path / "loras")), Settings())
    assert "both pull into 'same'" in str(err.value) and not (tmp_path / "loras").exists()


def test_cli_wires_pull():
    from trtllm_peft import cli

    parser = cli.build_parser()
    try:
        parser.parse_args(["pull", "--help"])
    except SystemExit as e:
        if e.code != 0:
            pytest.skip("`trtllm-peft pull` is not wired into trtllm_peft/cli.py yet")
    assert cli.main(["pull"]) == 2  # nothing to pull: one clear line, no traceback


@pytest.mark.slow  # starts the server (~15 s on two cores)
def test_running_server_serves_pulled_adapters(
    hub, ngc, tmp_path, hf_files, nemo_files, check, smollm2_engine
):
    """The refresh loop of a running server picks up what `pull` puts in place, from HF and from NGC."""
    root = tmp_path / "loras"
    root.mkdir()
    server = Server(smollm2_engine, root, tmp_path / "server.log", NIM_PEFT_REFRESH_INTERVAL="0.3")
    try:
        hub.add_repo("me/math-lora", hf_files)
        (nemo,) = nemo_files.values()
        ngc.add_version("nim/loras/smol", "nemo-v1", {"smol.nemo": nemo})
        pull_one(PullRequest.of("hf:me/math-lora"), root, hf_creds(hub), check)
        pull_one(PullRequest.of("ngc:nim/loras/smol:nemo-v1"), root, Credentials(ngc_api_key=NVAPI), check)

        def listed() -> set[str]:
            return {m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]}

        assert wait_for(lambda: {"math-lora", "smol_vnemo-v1"} <= listed(), 20), listed()
        for model in ("math-lora", "smol_vnemo-v1"):
            body = {"model": model, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
            r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["model"] == model and r.json()["choices"][0]["text"]
    finally:
        server.stop()

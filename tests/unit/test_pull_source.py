"""`pull` sources, names and --from-file lists: parsed exactly, refused with a sentence that says why."""

from __future__ import annotations

import pytest

from trtllm_peft.pull.errors import PullError
from trtllm_peft.pull.result import PullResult, render_table
from trtllm_peft.pull.source import PullRequest, parse_source, read_requests


@pytest.mark.parametrize(
    ("text", "scheme", "repo", "revision", "name"),
    [
        ("hf:me/smol-lora", "hf", "me/smol-lora", None, "smol-lora"),
        ("hf:Org.x/lora_v2@refs/pr/1", "hf", "Org.x/lora_v2", "refs/pr/1", "lora_v2"),
        (
            "hf:me/lora@0123456789abcdef0123456789abcdef01234567",
            "hf",
            "me/lora",
            "0123456789abcdef0123456789abcdef01234567",
            "lora",
        ),
        (
            "ngc:nvidian/nim-llm-dev/llama3-8b-instruct-lora:hf-math-v1",
            "ngc",
            "nvidian/nim-llm-dev/llama3-8b-instruct-lora",
            "hf-math-v1",
            "llama3-8b-instruct-lora_vhf-math-v1",
        ),
        ("ngc:nvidia/lora:1.0", "ngc", "nvidia/lora", "1.0", "lora_v1.0"),
    ],
)
def test_sources_parse(text, scheme, repo, revision, name):
    source = parse_source(text)
    assert (source.scheme, source.repo, source.revision, source.default_name) == (
        scheme,
        repo,
        revision,
        name,
    )
    assert parse_source(text).key == source.key and parse_source(text + "x").key != source.key


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("me/lora", "is not a source: sources look like"),
        ("hf:lora", "is not a source"),
        ("hf:me/lora/extra", "is not a source"),
        ("hf:me/lora@", "is not a source"),
        ("ngc:org/team/model", "(add :VERSION)"),
        ("ngc:a/b/c/d:v1", "is not a source"),
        ("s3:bucket/key", "is not a source"),
    ],
)
def test_bad_sources_say_what_a_good_one_is(text, phrase):
    with pytest.raises(PullError, match=phrase.replace("(", r"\(").replace(")", r"\)")) as err:
        parse_source(text)
    assert err.value.kind == "usage" and not err.value.retryable


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "..", "with space", "x" * 201])
def test_names_must_be_one_visible_directory(name):
    with pytest.raises(PullError, match="cannot be an adapter name"):
        PullRequest.of("hf:me/lora", name)


def test_from_file_lists_every_problem_with_its_line(tmp_path):
    listing = tmp_path / "adapters.txt"
    listing.write_text("hf:me/a  # a comment\n\nngc:o/m:v1 m\nhf:me/b m\nhf:me/c x y\nbogus\n")
    with pytest.raises(PullError) as err:
        read_requests(listing)
    message = str(err.value)
    assert "adapters.txt:5: expected `SOURCE [NAME]`, got 3 words" in message
    assert "adapters.txt:6: 'bogus' is not a source" in message
    assert "ngc:o/m:v1 and hf:me/b both pull into 'm'" in message


def test_from_file_reads_sources_and_names(tmp_path):
    listing = tmp_path / "adapters.txt"
    listing.write_text("# mine\nhf:me/a\nngc:o/t/m:v1   other  # renamed\n")
    assert [(r.source.text, r.name) for r in read_requests(listing)] == [
        ("hf:me/a", "a"),
        ("ngc:o/t/m:v1", "other"),
    ]


def test_table_has_a_row_per_pull_and_the_full_problem_below():
    ok = PullResult(PullRequest.of("hf:me/a"), 1.25, size_bytes=3 * 1024 * 1024)
    long = "hf:me/b does not fit engines/x:\n  - attn_q: rank 64 exceeds max_lora_rank 32"
    bad = PullResult(PullRequest.of("hf:me/b"), 0.5, kind="not_lora", problem=long)
    lines = render_table([ok, bad]).splitlines()
    assert lines[1].split() == ["a", "hf:me/a", "ok", "3.0", "MiB", "1.2s"]
    assert lines[2].split()[:5] == ["b", "hf:me/b", "failed:", "not_lora", "-"]
    assert lines[3] == "1 pulled, 1 failed" and lines[-1] == "  - attn_q: rank 64 exceeds max_lora_rank 32"

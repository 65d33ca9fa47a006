"""What to pull: `hf:OWNER/REPO[@REVISION]` or `ngc:ORG/[TEAM/]MODEL:VERSION`, and the adapter's name.

A source also names its staging directory (`key`): the same spec always stages into the same hidden
directory, which is what lets an interrupted pull resume where it stopped.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from trtllm_peft.pull.errors import PullError

_PART = r"[A-Za-z0-9][\w.-]*"
_HF = re.compile(rf"^hf:(?P<repo>{_PART}/{_PART})(?:@(?P<rev>\S+))?$")
_NGC = re.compile(rf"^ngc:(?P<org>{_PART})/(?:(?P<team>{_PART})/)?(?P<model>{_PART}):(?P<version>{_PART})$")
_NAME = re.compile(r"^[A-Za-z0-9_][\w.+=@-]{0,199}$")

USAGE = "sources look like hf:OWNER/REPO[@REVISION] or ngc:ORG/[TEAM/]MODEL:VERSION"


@dataclass(frozen=True)
class Source:
    """A parsed source spec. `repo` is the HF repo id or the NGC target without its version."""

    scheme: str  # "hf" | "ngc"
    repo: str  # "owner/repo" | "org/team/model" | "org/model"
    revision: str | None  # HF branch, tag or commit (None = main); NGC version (required)
    text: str  # the spec as given, for messages and tables

    @property
    def default_name(self) -> str:
        """HF: the repo's name. NGC: `MODEL_vVERSION`, the directory `ngc registry model download-version`
        creates, so adapters keep the names NIM users already have."""
        last = self.repo.rsplit("/", 1)[-1]
        return f"{last}_v{self.revision}" if self.scheme == "ngc" else last

    @property
    def key(self) -> str:
        """Stable short id of the spec: the staging directory's suffix."""
        return hashlib.sha256(self.text.encode()).hexdigest()[:12]

    @property
    def ngc_target(self) -> str:
        """`org/[team/]model:version`, as ngcsdk takes it."""
        return f"{self.repo}:{self.revision}"


def parse_source(text: str) -> Source:
    """Parse a source spec; PullError("usage") says what a good one looks like."""
    text = text.strip()
    if m := _HF.match(text):
        return Source("hf", m["repo"], m["rev"], text)
    if m := _NGC.match(text):
        repo = "/".join(p for p in (m["org"], m["team"], m["model"]) if p)
        return Source("ngc", repo, m["version"], text)
    hint = " (add :VERSION)" if text.startswith("ngc:") and ":" not in text[4:] else ""
    raise PullError("usage", f"{text!r} is not a source{hint}: {USAGE}")


def check_name(name: str) -> str:
    """An adapter name is one visible directory name: it is what clients put in `model`."""
    if not _NAME.match(name):
        raise PullError(
            "usage",
            f"{name!r} cannot be an adapter name: use letters, digits and _ . + = @ - "
            "(not starting with '.', which the server would ignore as hidden), at most 200 characters",
        )
    return name


@dataclass(frozen=True)
class PullRequest:
    """One adapter to pull: where from, and the name it gets under NIM_PEFT_SOURCE."""

    source: Source
    name: str

    @classmethod
    def of(cls, spec: str, name: str | None = None) -> PullRequest:
        source = parse_source(spec)
        return cls(source, check_name(source.default_name if name is None else name))


def read_requests(path: Path) -> list[PullRequest]:
    """`--from-file`: one `SOURCE [NAME]` per line; blank lines and `#` comments are skipped.

    Every line is checked before anything is downloaded, and two lines may not target one name.
    """
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise PullError("usage", f"cannot read {path}: {e.strerror}") from None
    requests, problems = [], []
    for number, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        try:
            if len(words) > 2:
                raise PullError("usage", f"expected `SOURCE [NAME]`, got {len(words)} words")
            requests.append(PullRequest.of(*words))
        except PullError as e:
            problems.append(f"{path}:{number}: {e}")
    seen: dict[str, str] = {}
    for r in requests:
        if r.name in seen:
            problems.append(f"{path}: {seen[r.name]} and {r.source.text} both pull into {r.name!r}")
        seen.setdefault(r.name, r.source.text)
    if problems:
        raise PullError("usage", "\n".join(problems))
    if not requests:
        raise PullError("usage", f"{path} lists no sources ({USAGE}, one per line)")
    return requests

"""The README cannot drift from the CLI: every `tf-bus ...` in its shell blocks parses.

Each command is parsed by the real `tf-bus` argparse parser (flags, choices and typed
values such as `--image-size 128,128`), without running it. `./run` lines are checked
against the run script's commands.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tf_bus.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
SHELL_LANGS = {"bash", "sh", "shell", "console"}


def shell_blocks(text: str) -> list[str]:
    return [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M) if m.group(1) in SHELL_LANGS]


def commands(block: str) -> list[list[str]]:
    """Simple commands of a shell block: continuations joined, comments dropped, split on
    ;, &&, ||, | and &; leading VAR=value assignments and `nohup`/`sudo` removed."""
    out = []
    text = re.sub(r"\\\n\s*", " ", block)
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lex.whitespace_split = True
        lex.commenters = "#"
        current: list[str] = []
        for tok in lex:
            if tok and set(tok) <= set(";&|"):
                out.append(current)
                current = []
            else:
                current.append(tok)
        out.append(current)
    cleaned = []
    for cmd in out:
        while cmd and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cmd[0]) or cmd[0] in ("nohup", "sudo", "time", "export")):
            cmd = cmd[1:]
        if cmd:
            cleaned.append(cmd)
    return cleaned


def tf_bus_invocations(text: str) -> list[tuple[str, list[str]]]:
    found = []
    for block in shell_blocks(text):
        for cmd in commands(block):
            for i, tok in enumerate(cmd):
                if tok == "tf-bus" or tok.endswith("/tf-bus"):
                    found.append((" ".join(cmd), cmd[i + 1:]))
                    break
    return found


INVOCATIONS = tf_bus_invocations(README)


def test_the_readme_shows_many_tf_bus_commands():
    assert len(INVOCATIONS) >= 30, [c for c, _ in INVOCATIONS]


@pytest.mark.parametrize("line, argv", INVOCATIONS, ids=[c[:70] for c, _ in INVOCATIONS])
def test_every_readme_tf_bus_command_parses(line, argv):
    parser = build_parser()
    try:
        parser.parse_args(argv)
    except SystemExit as e:
        assert e.code == 0, f"README command does not parse: {line}"


def test_every_subcommand_is_in_the_readme_command_table():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    table = README.split("## Two commands")[0]
    for name, p in sub.choices.items():
        assert f"`tf-bus {name}" in table, f"tf-bus {name} is missing from the command table at the top"
        steps = next((a for a in p._actions if a.dest == "step"), None)
        for step in (steps.choices if steps else {}):
            assert f"`tf-bus {name} {step}" in table, f"tf-bus {name} {step} is missing from the command table"


def test_run_script_lines_name_its_commands():
    runs = [cmd for block in shell_blocks(README) for cmd in commands(block) if cmd[0] == "./run"]
    assert runs, "the two commands must be in the README"
    assert {cmd[1] for cmd in runs} <= {"demo", "test", "help"}


@pytest.mark.parametrize("heading", [
    "## Two commands", "## Getting BUSI", "## S3 staging", "## Notebook", "### Training the U-Net",
    "### Evaluating it", "### Training the classifier", "### Tuning the classifier", "## Distributed training",
    "## Profiling & diagnostics", "### Serving with the official TensorFlow Serving", "### `tf-bus serve`",
    "### Querying", "## Architecture",
])
def test_readme_has_the_sections_users_look_for(heading):
    assert re.search(rf"^{re.escape(heading)}", README, re.M), heading


def test_the_checker_catches_a_wrong_flag():
    (line, argv), = tf_bus_invocations("```bash\ntf-bus prepare RAW OUT --no-such-flag\n```\n")
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    (_, argv), = tf_bus_invocations("```bash\nX=1 nohup tf-bus train-segmenter --data D --out R \\\n  --image-size 12,a &\n```\n")
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of `text` (fenced blocks left out): lower case,
    every character but letters, digits, spaces, '-' and '_' dropped, spaces turned into '-',
    and '-1', '-2', ... appended to repeats."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    anchors: set[str] = set()
    for m in re.finditer(r"^#{1,6} +(.+?) *$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


LINKS = sorted(set(re.findall(r"\]\(#([^)\s]+)\)", README)))


def test_the_readme_links_to_its_own_sections():
    assert len(LINKS) >= 10, LINKS


@pytest.mark.parametrize("anchor", LINKS)
def test_every_readme_section_link_has_its_heading(anchor):
    assert anchor in heading_anchors(README), f"README links to #{anchor}, which no heading makes"


@pytest.mark.parametrize("heading, anchor", [
    ("## Profiling & diagnostics", "profiling--diagnostics"),
    ("### Lesion-aware classification (`tf-bus fuse`)", "lesion-aware-classification-tf-bus-fuse"),
    ("## S3 staging (AWS S3, MinIO, Ceph, Swift)", "s3-staging-aws-s3-minio-ceph-swift"),
    ("## Results\n## Results", "results-1"),
    ("```bash\n# not a heading\n```\n## Real", "real"),
])
def test_heading_anchors_follow_githubs_rule(heading, anchor):
    assert anchor in heading_anchors(heading)
    assert "not-a-heading" not in heading_anchors(heading)

"""The documentation's promises match the scripts: its commands run without an
activated venv, every flag it names exists, its stated defaults, exit codes,
markers and environment variables are the code's, the README stays a front door
(its first two commands are the main job and CI's test command, at most 150 lines),
its headline figures are copies of the pages they cite, and every relative link
resolves.

The README is short and links to docs/, one page per topic; a check of "X is
documented" reads the page that holds X."""
from __future__ import annotations

import re

import train_dpo
import train_sft
from anita_core.cli import common as cli
from anita_core.recipes.dpo import DPO_PRESETS
from anita_core.recipes.sft import SFT_PRESETS
from tests.run_cli import REPO

README = (REPO / "README.md").read_text()
DOCS = {p.name: p.read_text() for p in sorted((REPO / "docs").glob("*.md"))}
# pages that copy bench/README's own tables (bench scripts' flags, not the commands')
BENCH_PAGES = {"bench-details.md", "sm90.md"}
USER_PAGES = {"README.md": README, **{k: v for k, v in DOCS.items() if k not in BENCH_PAGES}}
ALL_TEXT = "\n".join([README, *DOCS.values()])


def code_spans(text):
    return re.findall(r"`([^`\n]+)`", text) + re.findall(r"^    (\S.*)$", text, re.M)


CODE_SPANS = code_spans(ALL_TEXT)


def script_commands():
    return [c for c in CODE_SPANS if re.search(r"train_(sft|dpo)\.py|-m pytest|-c \"", c)]


def test_every_command_uses_the_venv_interpreter_or_says_to_activate_it():
    commands = script_commands()
    assert len(commands) >= 6
    for command in commands:
        for word in re.findall(r"(?:^|&& )(\S*python\S*) (?!-m venv)", command):
            assert word == ".venv/bin/python", command
    assert "source .venv/bin/activate" in README


def test_every_flag_the_docs_name_exists():
    options = {}
    for name, parser in (("train_sft.py", train_sft.build_parser([])),
                         ("train_dpo.py", train_dpo.build_parser([]))):
        options[name] = {s for a in parser._actions for s in a.option_strings}
    for command in script_commands():
        # each trainer's part of a command line (pip's --no-deps in the setup line is pip's)
        for part in re.findall(r"(train_(?:sft|dpo)\.py[^&|;]*)", command):
            script = part[:len("train_sft.py")]
            for flag in re.findall(r"(--[a-z][a-z0-9-]+)", part):
                assert flag in options[script], (script, flag)
    # a flag named on its own belongs to one of the project's command lines: the two
    # trainers, chat.py, eval.py, or the CPU benchmark the CPU timing tables cite
    import chat
    from anita_core.eval import cli as eval_cli
    from bench import cpu_real_model
    other_parsers = (chat.build_parser(), cpu_real_model.build_parser(), eval_cli.build_parser())
    known = options["train_sft.py"] | options["train_dpo.py"] | {
        s for parser in other_parsers for a in parser._actions for s in a.option_strings}
    for page, text in USER_PAGES.items():
        for flag in set(re.findall(r"`(--[a-z][a-z0-9-]+)", text)):
            assert flag in known, (page, flag)


def test_stated_defaults_and_exit_codes_are_the_codes():
    checkpoints, data, cli_page = DOCS["checkpoints.md"], DOCS["data.md"], DOCS["cli.md"]
    every_30 = "Every preset checkpoints every 30 minutes of wall time (`--save-minutes`)"
    assert every_30 in checkpoints
    presets = list(SFT_PRESETS.values()) + list(DPO_PRESETS.values())
    assert {p.optim.save_minutes for p in presets} == {30.0}
    assert f"exit code {cli.EXIT_DIVERGED}," in checkpoints
    assert f"stops the run with exit code {cli.EXIT_DISK_FULL} and one line" in checkpoints
    assert f"(exit code {cli.EXIT_BAD_INPUT})" in data
    assert "Ctrl-C (SIGINT) and SIGTERM" in checkpoints and "with code 130 and 143" in checkpoints
    assert "--skip-bad-rows" in data and "skipped, counted, and shown (the first 5" in data
    from anita_core.data.stats import MAX_REMEMBERED_PROBLEMS
    assert MAX_REMEMBERED_PROBLEMS == 5
    assert set(SFT_PRESETS) >= {"sft", "ita"}
    # cli.md's table of exit codes: each code on the row that names its cause
    table = {int(code): meaning for code, meaning in
             re.findall(r"^\| (\d+) \| ([^|]+) \|", cli_page, re.M)}
    assert "bad input" in table[cli.EXIT_BAD_INPUT]
    assert "NaN" in table[cli.EXIT_DIVERGED]
    assert "rank" in table[cli.EXIT_RANK_FAILED]
    assert "full disk" in table[cli.EXIT_DISK_FULL]


def test_readme_is_a_front_door_of_at_most_150_lines():
    lines = README.splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move reference text to docs/"


def test_the_readmes_first_two_commands_are_the_main_job_and_cis_test_command():
    # the first code in the README, inline or block, is the main job's setup line
    blocks = re.findall(r"^    (\S.*)$", README, re.M)
    assert "`" not in README[:README.index("\n    " + blocks[0])], "code before the first command"
    assert re.fullmatch(r"python3 -m venv \.venv && .* && \.venv/bin/python train_sft\.py", blocks[0])
    ci = [l for l in (REPO / ".ci" / "run").read_text().splitlines()
          if l.strip() and not l.startswith(("#", "set ", "cd "))]
    assert ci == [blocks[1]], (ci, blocks[1])
    # docs/install.md repeats both, word for word
    assert re.findall(r"^    (\S.*)$", DOCS["install.md"], re.M)[:2] == blocks[:2]
    # both set the venv up the same way before their last step
    assert blocks[1].startswith(blocks[0].rsplit(" && ", 1)[0] + " && ")


def github_anchor(heading):
    # GitHub's heading ids: lower case, punctuation other than - and _ dropped, spaces -> -
    text = re.sub(r"[`*]", "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_every_relative_link_resolves():
    pages = [REPO / "README.md", REPO / "bench" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    checked = 0
    for page in pages:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue                      # https:, mailto: ...
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            assert resolved.is_file(), f"{page.relative_to(REPO)}: link {target}: no such file"
            if anchor and resolved.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", resolved.read_text(), re.M)
                assert anchor in {github_anchor(h) for h in headings}, \
                    f"{page.relative_to(REPO)}: link {target}: no such heading"
            checked += 1
    assert checked >= 40


def test_the_docs_keep_the_curves_images():
    for image in ("curves-sft-demo.png", "curves-dpo-demo.png"):
        assert f"(images/{image})" in DOCS["monitoring.md"]


def test_every_marker_is_documented():
    # the project's own markers: pytest.ini's and those tests/conftest.py registers
    import configparser
    ini = configparser.ConfigParser()
    ini.read(REPO / "pytest.ini")
    markers = {line.split(":")[0].strip() for line in ini["pytest"]["markers"].splitlines() if line.strip()}
    markers |= set(re.findall(r'addinivalue_line\("markers", "(\w+):', (REPO / "tests" / "conftest.py").read_text()))
    assert {"gpu", "sweep", "real_model", "kernels"} <= markers
    for marker in markers:
        assert f"Marker `{marker}`" in DOCS["testing.md"], marker


def test_every_environment_variable_the_code_reads_is_documented():
    sources = [*REPO.glob("*.py")]
    for package in ("anita_core", "csrc_triton", "csrc_torch"):
        sources += (REPO / package).rglob("*.py")
    names = {n for f in sources for n in re.findall(r"\bANITA_[A-Z0-9_]+\b", f.read_text())}
    assert "ANITA_BACKEND" in names
    for name in sorted(names):
        assert f"`{name}" in DOCS["cli.md"], f"{name} is read by the code but not in docs/cli.md"
        assert name in ALL_TEXT


def test_the_headline_figures_are_copies_of_the_pages_they_cite():
    section = README.split("## Headline numbers", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in section.splitlines() if r.startswith("| ") and not r.startswith("| what")]
    assert len(rows) >= 5
    for row in rows:
        what, figure, when, details = [c.strip() for c in row.strip("|").split("|")]
        page = REPO / re.search(r"\]\(([^)#]+)", details).group(1)
        source = page.read_text()
        dates = re.findall(r"\d{4}-\d\d-\d\d", when)
        assert dates, row
        for token in dates + re.findall(r"\d+(?:[.,]\d+)*", figure):
            assert token in source, f"{token} of README's row {what!r} is not in {page.name}"
    # no GPU figure in the README while bench/README's results table holds no GPU row
    bench = (REPO / "bench" / "README.md").read_text()
    results = bench.split("## Results", 1)[1].split("\n## ", 1)[0]
    gpu_rows = [r for r in results.splitlines()
                if r.startswith("|") and re.search(r"[^|\s-]", r) and "date" not in r]
    if not gpu_rows:
        assert "No GPU has been lent to this project yet, so there is no headline table" in README
        assert "No GPU run has been made yet" in results


def test_the_smollm2_recipe_commands_are_the_ones_test_recipe_runs():
    # docs/smollm2.md says tests/test_recipe.py runs exactly its commands: the same scripts
    # and arguments in the same order, except the test's --no-progress and eval's --output
    from tests.test_recipe import stages
    page = DOCS["smollm2.md"].split("## The whole recipe on SmolLM2", 1)[1]
    documented = [line.split() for line in re.findall(r"^    (\.venv/bin/python \S+\.py .*)$", page, re.M)]
    ran = stages('"$MODEL"', "runs/recipe", '"$TASKS"')
    assert len(documented) == len(ran) == 4

    def normal(args):
        out, skip = [], False
        for a in map(str, args):
            if skip:
                skip = False
            elif a == "--output":
                skip = True
            elif a != "--no-progress":
                out.append(a.replace(str(REPO) + "/", ""))
        return out
    from tests.eval_tasks import TASK
    for (name, script, args), line in zip(ran, documented):
        assert line[:2] == [".venv/bin/python", script], (name, line[:2])
        assert normal(line[2:]) == normal(args), name
    assert TASK in page

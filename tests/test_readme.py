"""The README and docs/: short, their numbers what the result records say, no dead links."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import readme_results  # noqa: E402
from readme_results import (  # noqa: E402
    CURRENT_TABLE,
    PRIVACY_DOC,
    PRIVACY_TABLE,
    README,
    RESULTS_DOC,
    ResultsDocError,
)

DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *DOCS]


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def test_the_readme_is_at_most_250_lines_and_docs_exist():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
    names = {p.name for p in DOCS}
    assert {"phantom.md", "data.md", "model.md", "operations.md", "results.md",
            "experiments.md"} <= names


def test_the_generated_numbers_are_those_of_the_result_records():
    assert readme_results.stale() == [], "run: python benchmarks/readme_results.py"


def test_the_status_line_and_table_come_from_the_records_not_a_stale_copy():
    document = json.loads((ROOT / CURRENT_TABLE).read_text())
    targets = document["targets"]
    readme = (ROOT / README).read_text()
    assert f"**{targets['passed']} of {targets['decided']}**" in readme
    fedmrg_ce = document["aggregate"]["fedmrg"]["stats"]["generalization/ce_f1_macro"][0]
    assert f"{fedmrg_ce:.3f}" in readme.split("<!-- results:table -->")[1]


def test_a_changed_record_makes_the_check_fail_naming_the_block(tmp_path):
    for path in (CURRENT_TABLE, PRIVACY_TABLE, README, RESULTS_DOC, PRIVACY_DOC):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / path, tmp_path / path)
    assert readme_results.stale(tmp_path) == []
    document = json.loads((tmp_path / CURRENT_TABLE).read_text())
    for record in document["runs"]:
        if record["row"] == "fedmrg":
            record["final"]["generalization/ce_f1_macro"] += 0.05
    (tmp_path / CURRENT_TABLE).write_text(json.dumps(document))
    assert readme_results.stale(tmp_path) == ["README.md: table", "docs/results.md: fl_mrg"]
    # a privacy record: its row in the README and docs/privacy.md
    private = json.loads((tmp_path / PRIVACY_TABLE).read_text())
    private["runs"][0]["privacy"]["epsilon"] = 99.0
    (tmp_path / PRIVACY_TABLE).write_text(json.dumps(private))
    assert readme_results.stale(tmp_path) == [
        "README.md: table", "README.md: privacy", "docs/results.md: fl_mrg",
        "docs/privacy.md: privacy"]
    # regenerating makes the files agree again
    for path, generated in readme_results.blocks(tmp_path).items():
        (tmp_path / path).write_text(readme_results.fill((tmp_path / path).read_text(),
                                                         generated))
    assert readme_results.stale(tmp_path) == []


def test_a_missing_block_or_table_is_a_named_error(tmp_path):
    with pytest.raises(ResultsDocError, match=r"README.md: no <!-- results:table -->"):
        readme_results.fill("# no markers\n", {"table": "x"}, "README.md")
    with pytest.raises(ResultsDocError, match="cannot read the FL-MRG table"):
        readme_results.load_table(tmp_path)


@pytest.mark.parametrize("doc", _markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_points_at_an_existing_file_and_heading(doc):
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target}: no heading '#{anchor}' in {path.name}")
    assert not broken, broken


def test_the_quickstart_is_the_makefile_and_ci():
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^make (\w+)", quickstart, re.M)
    assert commands == ["run", "test"]
    makefile = (ROOT / "Makefile").read_text()
    assert all(re.search(rf"^{c}:", makefile, re.M) for c in commands)
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), re.M)



def test_the_documented_config_error_is_what_the_cli_prints():
    from click.testing import CliRunner

    from fedmrg.cli import main

    text = (ROOT / "docs" / "operations.md").read_text()
    example = re.search(r"```\n\$ fedmrg (config .+)\n(error: .+)\n```", text)
    assert example, "docs/operations.md: no `$ fedmrg config ...` example with its error"
    args = example.group(1).split()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and example.group(2) in result.output, result.output


def test_no_file_cites_a_design_document_or_folder_users_do_not_have():
    cited = []
    files = [ROOT / "README.md", *(p for folder in ("fedmrg", "ray_jobs", "benchmarks", "tests",
                                                   "docs")
                                   for p in (ROOT / folder).rglob("*")
                                   if p.suffix in (".py", ".md", ".yaml"))]
    for path in files:
        if path.resolve() == Path(__file__).resolve():
            continue
        text = path.read_text()
        cited += [f"{path.relative_to(ROOT)}: {name}" for name in ("DESIGN.md", "../shared")
                  if name in text]
    assert not cited, cited


def test_runs_decoded_otherwise_than_the_default_are_said_so():
    from fedmrg.config import load_config
    from fedmrg.eval.evaluator import generation_kwargs

    now = generation_kwargs(load_config("default").eval)
    assert readme_results.decoding_note([{"generation": dict(now)}]) == ""
    old = {k: v for k, v in now.items() if k != "no_repeat_ngram_size"}
    note = readme_results.decoding_note([{"generation": old},
                                         {"generation": {**now, "num_beams": 3}}])
    assert "`eval.no_repeat_ngram_size` off (before the setting existed)" in note
    assert f"`eval.num_beams` 3, the default now {now['num_beams']!r}" in note


def test_the_privacy_table_gives_epsilon_and_the_cost_against_ffa_lora():
    def record(row, seed, ce, epsilon=None):
        final = {"generalization/ce_f1_macro": ce, "bytes_up": 2e6, "bytes_down": 1e6,
                 "bytes_total": 3e6, "wall_s": 120.0 + seed * 60}
        privacy = {"mode": "central", "epsilon": epsilon} if epsilon else {"mode": "none"}
        return {"row": row, "seed": seed, "final": final, "privacy": privacy}

    reference = readme_results.fl_mrg.aggregate([record("ffa_lora", s, 0.3) for s in (0, 1)])
    table = readme_results.privacy_table(reference, [
        record("ffa_lora-dp8", 0, 0.2, 7.98), record("ffa_lora-dp8", 1, 0.1, 7.98),
        record("ffa_lora-secagg", 0, 0.35)])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()}
    assert rows["ffa_lora"][2:5] == ["none", "0.300 ± 0.000", ""]
    assert rows["ffa_lora, central DP epsilon 8"][1:5] == ["2", "7.98", "0.150 ± 0.071", "-0.150"]
    assert rows["ffa_lora, secure aggregation"][2:5] == ["none", "0.350", "+0.050"]
    assert rows["ffa_lora, central DP epsilon 8"][-2:] == ["3.0 MB", "2.5 ± 0.7 |"]

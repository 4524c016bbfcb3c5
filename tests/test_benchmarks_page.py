"""docs/benchmarks.md shows where the project stands: each table is its results file in benchmarks/, as
`bench.py --table` prints it, under the commit, machine and versions the file records; benchmarks/ holds one
current file per platform, none dated."""
import importlib.util
import json
import os
import re

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PAGE = os.path.join(ROOT, "docs", "benchmarks.md")
MARKER = re.compile(r"<!-- table: (benchmarks/[\w.-]+\.json) -->")


def bench():
    spec = importlib.util.spec_from_file_location("bench", os.path.join(ROOT, "benchmarks", "bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_table_is_its_results_file_and_names_its_commit():
    with open(PAGE, encoding="utf-8") as f:
        page = f.read()
    assert len(page.splitlines()) <= 250
    sources = MARKER.findall(page)
    assert sources, "no table marked with <!-- table: benchmarks/results-....json -->"
    markdown_table = bench().markdown_table
    for source in sources:
        with open(os.path.join(ROOT, source)) as f:
            results = json.load(f)
        before, after = page.split(f"<!-- table: {source} -->", 1)
        expected = markdown_table(results)
        shown = after.strip().splitlines()[:len(expected)]
        assert shown == expected, f"the table under {source} is not that file's (bench.py --table {source})"
        heading = before[before.rfind("\n## "):]  # the section the table is in names what it was measured on
        meta = results["meta"]
        for fact in (meta["commit"], meta["torch"], meta.get("gpu") or meta["cpu_model"]):
            assert fact and fact in heading, f"{source}: the section above its table does not name {fact!r}"


def test_benchmarks_holds_no_dated_results_and_every_file_is_shown():
    names = os.listdir(os.path.join(ROOT, "benchmarks"))
    dated = [n for n in names if re.search(r"20\d\d-\d\d-\d\d", n)]
    assert not dated, f"dated results in benchmarks/ (git keeps the history): {dated}"
    docs = ""
    for name in os.listdir(os.path.join(ROOT, "docs")):
        with open(os.path.join(ROOT, "docs", name), encoding="utf-8") as f:
            docs += f.read()
    unshown = [n for n in names if n.startswith("results") and n not in docs]
    assert not unshown, f"results files no page shows or links: {unshown}"

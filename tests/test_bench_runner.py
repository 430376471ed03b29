import importlib.util
import sys
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("run_all", Path(__file__).parents[1] / "benchmarks" / "run_all.py")
run_all = importlib.util.module_from_spec(SPEC)
sys.modules["run_all"] = run_all  # dataclasses look their module up
SPEC.loader.exec_module(run_all)


@pytest.mark.parametrize(("line", "parsed"), [
    ("ratio mcts_batched 4.36\n", ("mcts_batched", 4.36)),
    ("ratio orchestration_overhead 1.171", ("orchestration_overhead", 1.171)),
    ("  ratio ppo_vs_trl 1e-2  ", ("ppo_vs_trl", 0.01)),
    ("the ratio mcts_batched is 4", None),
    ("ratio mcts_batched fast", None),
])
def test_only_whole_ratio_lines_parse(line, parsed):
    assert run_all.parse_ratio(line) == parsed


def test_targets_are_checked_in_their_direction():
    assert run_all.meets("mcts_batched", 4.0) and not run_all.meets("mcts_batched", 3.9)
    assert run_all.meets("orchestration_overhead", 1.05) and not run_all.meets("orchestration_overhead", 1.1)
    assert run_all.meets("mcts_vs_mctx", 0.5) is None  # reported, no target


def test_table_lists_missing_ratios_with_their_benchmarks_note():
    rows = run_all.table_rows({"mcts_batched": ("mcts", 4.5)}, {"mcts_peers": "skipped: no peer venvs"},
                              {"mcts_batched": "mcts", "mcts_vs_lightzero": "mcts_peers"})
    assert [(r.name, r.value, r.met, r.note) for r in rows] == [
        ("mcts_batched", 4.5, True, ""), ("mcts_vs_lightzero", None, None, "skipped: no peer venvs")]
    text = run_all.format_table(rows)
    assert "mcts_vs_lightzero" in text and "skipped: no peer venvs" in text and ">= 4" in text

"""The leaderboard protocol: the dev/test split, the operating-point rule, sweeps and tuned rows end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from erasekit.bench import BenchSettings, parse_attacks
from erasekit.bench.entries import Part
from erasekit.bench.leaderboard import leaderboard_rows, run_leaderboard
from erasekit.bench.protocol import Point, Split, operating_point, read_tuned, split_concepts, sweep_parts
from erasekit.errors import ErasekitError
from erasekit.minicanvas.world import OBJECT_NAMES, STYLE_NAMES
from tests.fixtures.evaluation_tiny import OBJECTS, STYLES, fake_classifier, one_thread, tiny_model  # noqa: F401

GRID = BenchSettings(seeds=2, steps=2, objects=OBJECTS, styles=STYLES)


def test_the_split_is_seeded_disjoint_and_covers_every_concept():
    split = split_concepts(0)
    assert split == split_concepts(0) and split != split_concepts(1)
    assert set(split.dev) | set(split.test) == set(STYLE_NAMES + OBJECT_NAMES)
    assert not set(split.dev) & set(split.test)
    assert sum(c in STYLE_NAMES for c in split.dev) == 4 and sum(c in OBJECT_NAMES for c in split.dev) == 4


def _point(ua, ira, cra, v):
    return Point(Part("uce", "paper", (("erase_scale", v),)), ua, ira, cra)


def test_the_operating_point_follows_the_written_rule():
    weak, mid, strong = _point(10, 99, 90, 0.01), _point(70, 96, 86, 0.1), _point(95, 80, 70, 1.0)
    # base IRA 100, CRA 90: strong loses 20 points, so the best UA within 5 points is mid
    assert operating_point([weak, mid, strong], 100.0, 90.0) is mid
    # nothing keeps both within 5 points: the best UA + mean retention
    worse = [_point(50, 60, 60, 0.1), _point(90, 50, 40, 1.0)]
    assert operating_point(worse, 100.0, 90.0) is worse[1]  # 90 + 45 > 50 + 60
    # ties go to the weaker end of the grid
    twins = [_point(70, 99, 90, 0.01), _point(70, 99, 90, 0.1)]
    assert operating_point(twins, 100.0, 90.0) is twins[0]
    with pytest.raises(ErasekitError, match="no finished sweep point"):
        operating_point([], 100.0, 90.0)


def test_sweep_parts_follow_the_methods_knob():
    parts = sweep_parts("rece")
    assert [dict(p.overrides)["rounds"] for p in parts] == [0, 1, 2, 3, 5]
    assert all(dict(p.overrides)["select"] == "last" for p in parts)
    assert parts[1].config("style").rounds == 1 and parts[1].label == "rece:paper[select=last,rounds=1]"
    assert sweep_parts("advunlearn") == [] or sweep_parts("advunlearn")[0].method == "advunlearn"


def test_tuned_rows_and_stacks_wait_for_the_sweep():
    assert [e.label for e in leaderboard_rows(["uce"], ["hirm-r+uce"], {})] == ["uce:paper"]
    tuned = {"uce": Part("uce", "paper", (), "tuned", (("style", (("erase_scale", 0.1),)),))}
    rows = [e.label for e in leaderboard_rows(["uce"], ["hirm-r+uce", "hirm-r:paper+uce:paper"], tuned)]
    assert rows == ["uce:paper", "uce:tuned", "hirm-r:default+uce:tuned", "hirm-r:paper+uce:paper"]
    from erasekit.bench.entries import parse_entries

    with pytest.raises(ErasekitError, match="no tuned setting yet"):
        parse_entries(["uce:tuned"], (), {})


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    model = tiny_model()
    out = tmp_path_factory.mktemp("protocol") / "lb"
    split = Split(0, dev=("neon", "star"), test=("pixel", "circle"))
    attacks = parse_attacks(["encoder-swap"], ["prompts=1"], seeds=1)
    result = run_leaderboard(model, out, ["uce"], split, settings=GRID, stacks=["hirm-r+uce"], attacks=attacks,
                             classifier=fake_classifier(), batch_size=16, command="erasekit bench ...")  # fmt: skip
    return out, result


def test_the_sweep_chooses_tuned_on_dev_and_the_test_shows_both(board):
    out, result = board
    sweep_labels = {c.entry for c in result.sweep.cells}
    assert len(sweep_labels) == 1 + 6 and {c.concept for c in result.sweep.cells} == {"neon", "star"}
    tuned = read_tuned(out)["uce"]
    data = json.loads((out / "tuned.json").read_text())
    chosen = {k: v["part"]["overrides"] for k, v in data["methods"]["uce"].items()}
    assert dict(tuned.typed) == {k: tuple(tuple(o) for o in v) for k, v in chosen.items()}
    # the choice is the rule applied to the dev means it records
    for kind, row in data["methods"]["uce"].items():
        grid = [_point(p["UA"], p["IRA"], p["CRA"], i) for i, p in enumerate(row["grid"])]
        best = operating_point(grid, data["base"][kind]["IRA"], data["base"][kind]["CRA"])
        assert row["grid"][best.part.overrides[0][1]]["label"] == row["dev"]["label"]
    labels = {c.entry for c in result.test.cells}
    assert labels == {"base", "uce:paper", "uce:tuned", "hirm-r:default+uce:tuned"}
    assert {c.concept for c in result.test.cells} == {"pixel", "circle"}
    assert all(len(c.per_seed) == 2 for c in result.test.cells)  # two evaluation seeds per cell
    text = (out / "leaderboard.md").read_text()
    for needle in ("## Protocol", "## Test Styles: pixel", "## Tuned settings", "uce: `erase_scale`",
                   "![frontiers](frontier.png)", "Time of the whole bench"):  # fmt: skip
        assert needle in text, needle
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert "UA against retention" in (out / "report.html").read_text()
    attacked = {c.entry for c in result.test.attack_cells}
    assert attacked == labels  # attacks run on the paper, tuned and stacked rows alike


def test_a_rerun_resumes_without_work(board, monkeypatch):
    import erasekit.evaluation.protocols as protocols
    import erasekit.registry as registry

    out, result = board
    monkeypatch.setattr(registry, "erase", lambda *a, **k: pytest.fail("erased again"))
    monkeypatch.setattr(protocols, "evaluate", lambda *a, **k: pytest.fail("evaluated again"))
    split = Split(0, dev=("neon", "star"), test=("pixel", "circle"))
    again = run_leaderboard(tiny_model(), out, ["uce"], split, settings=GRID, stacks=["hirm-r+uce"],
                            attacks=parse_attacks(["encoder-swap"], ["prompts=1"], seeds=1),
                            classifier=fake_classifier(), command="erasekit bench ...")  # fmt: skip
    assert {c.entry for c in again.test.cells} == {c.entry for c in result.test.cells}
    sessions = json.loads((out / "timing.json").read_text())["sessions"]
    assert len(sessions) == 2


def test_the_bench_time_counts_overlapping_shards_once_in_wall_time():
    from erasekit.bench.timing import Timing

    def session(start, seconds, ran=True):
        return {"start": f"2026-12-02 {start}", "seconds": seconds, "ran": ran}

    sessions = [
        session("10:00:00", 600.0),  # shard 1 of 2: 10:00-10:10
        session("10:00:00", 900.0),  # shard 2 of 2 alongside: 10:00-10:15
        session("10:05:00", 300.0),  # a third process, inside shard 2's span
        session("10:10:00", 600.0),  # shard 1 again, past shard 2's end: 10:10-10:20
        session("12:00:00", 60.0),  # a later run
        session("13:00:00", 5.0, ran=False),  # --table-only
    ]
    assert Timing.of(sessions) == Timing(wall=1200.0 + 60.0, summed=2460.0)
    assert Timing.of([]) == Timing(wall=0.0, summed=0.0)


def test_a_session_waits_for_the_lock_another_writer_holds(tmp_path):
    import threading

    from erasekit.bench.timing import record_session
    from erasekit.io import locked

    file = tmp_path / "timing.json"
    writer = threading.Thread(target=record_session, args=(file, 1_700_000_000.0, 3.0, True))
    with locked(tmp_path):  # another shard in the middle of its read-modify-write
        writer.start()
        writer.join(0.5)
        assert writer.is_alive() and not file.exists()  # it waits rather than write past the lock
    writer.join()
    assert json.loads(file.read_text())["summed_seconds"] == 3.0


def test_merging_timing_records_keeps_two_shards_identical_sessions(tmp_path):
    from erasekit.bench.timing import merge_timing, record_session

    shard, copy = tmp_path / "out", tmp_path / "copy"
    shard.mkdir()
    for _ in range(2):  # two shards started in the same second, both ran 0.2 s
        record_session(shard / "timing.json", 1_700_000_000.0, 0.2, True)
    merge_timing(copy / "timing.json", shard / "timing.json")
    merge_timing(copy / "timing.json", shard / "timing.json")  # merging again adds nothing
    assert len(json.loads((copy / "timing.json").read_text())["sessions"]) == 2


def test_a_results_copy_carries_the_finished_cells_to_a_new_directory(board, tmp_path, monkeypatch):
    import erasekit.attacks.run as attack_run
    import erasekit.evaluation.protocols as protocols
    import erasekit.registry as registry
    from erasekit.bench.layout import Layout

    out, result = board
    identity = json.loads((out / "bench.json").read_text())["identity"]
    copy = tmp_path / "results"
    assert Layout(out).give_results(copy, identity) > 0
    kept = {p.relative_to(copy).parts[0] for p in copy.rglob("*") if p.is_file()}
    assert kept == {"bench.json", "tuned.json", "timing.json", "cells", "attacks", "patches", "leaderboard.md",
                    "frontier.png"}  # fmt: skip
    assert not list(copy.rglob("*.safetensors")) and not list(copy.rglob("manifest.jsonl"))
    assert Layout(out).give_results(copy, identity) == 0  # nothing changed, nothing rewritten

    monkeypatch.setattr(registry, "erase", lambda *a, **k: pytest.fail("erased again"))
    monkeypatch.setattr(protocols, "evaluate", lambda *a, **k: pytest.fail("evaluated again"))
    monkeypatch.setattr(attack_run, "run_attack", lambda *a, **k: pytest.fail("attacked again"))
    split = Split(0, dev=("neon", "star"), test=("pixel", "circle"))
    kwargs = dict(stacks=["hirm-r+uce"], attacks=parse_attacks(["encoder-swap"], ["prompts=1"], seeds=1),
                  classifier=fake_classifier(), command="erasekit bench ...", results=copy)  # fmt: skip
    again = run_leaderboard(tiny_model(), tmp_path / "fresh", ["uce"], split, settings=GRID, **kwargs)
    scores = {(c.entry, c.concept): c.scores for c in result.test.cells}
    assert {(c.entry, c.concept): c.scores for c in again.test.cells} == scores
    assert read_tuned(tmp_path / "fresh") == read_tuned(out)
    table = [line for line in (out / "leaderboard.md").read_text().splitlines() if line.startswith("| uce")]
    assert table and all(line in (tmp_path / "fresh" / "leaderboard.md").read_text() for line in table)

    from dataclasses import replace

    with pytest.raises(ErasekitError, match="another model or settings"):
        run_leaderboard(
            tiny_model(), tmp_path / "other", ["uce"], split, settings=replace(GRID, seeds=1), **kwargs
        )


def test_a_changed_tuned_setting_makes_its_rows_again(board, tmp_path, monkeypatch):
    """``uce:tuned`` names whatever the sweep chose last: when the choice moves (here: the rule is swapped for
    one that picks another grid point), its cells, its stack's and their attack cells are made again, on their
    new patch, and nothing else is; no stale number reaches the page."""
    import shutil

    import erasekit.bench.leaderboard as leaderboard
    import erasekit.evaluation.protocols as protocols
    from erasekit.evaluation.record import read_run

    out = tmp_path / "lb"
    shutil.copytree(board[0], out)
    before = read_tuned(out)["uce"]
    chosen = {kind: dict(before.typed)[kind] for kind in ("style", "object")}

    def other_point(points, base_ira, base_cra):  # a grid point neither kind chose before
        return next(p for p in points if p.part.overrides not in chosen.values())

    evaluated = []
    real = protocols.evaluate
    monkeypatch.setattr(leaderboard, "operating_point", other_point)
    monkeypatch.setattr(protocols, "evaluate", lambda *a, **k: evaluated.append(str(a[2])) or real(*a, **k))
    split = Split(0, dev=("neon", "star"), test=("pixel", "circle"))
    again = run_leaderboard(tiny_model(), out, ["uce"], split, settings=GRID, stacks=["hirm-r+uce"],
                            attacks=parse_attacks(["encoder-swap"], ["prompts=1"], seeds=1),
                            classifier=fake_classifier(), command="erasekit bench ...")  # fmt: skip
    after = read_tuned(out)["uce"]
    assert after != before
    remade = {Path(r).parent.name for r in evaluated}
    assert remade == {"uce_tuned", "hirm-r_default+uce_tuned"}, evaluated  # base and uce:paper are kept
    rows = {c.entry: c for c in again.test.cells if c.entry in ("uce:tuned", "hirm-r:default+uce:tuned")}
    assert rows and all(after in c.parts for c in rows.values())
    for cell in again.test.cells:
        if "tuned" in cell.entry:
            made = read_run(out / cell.run)["record"]["patches"]
            assert [p["sha256"] for p in made] == [cell.patch["sha256"]]
    tuned_attacks = [c for c in again.test.attack_cells if "tuned" in c.entry]
    assert len(tuned_attacks) == 4 and all(after in c.parts for c in tuned_attacks)
    # the stale cells are gone from the page even where a results copy still holds them
    from erasekit.bench.layout import Layout

    stale = Layout(board[0])
    assert stale.read_cell("uce:tuned", "pixel", (after,)) is None
    assert stale.read_cell("uce:tuned", "pixel") is not None  # without the setting: not known, so kept


def test_every_registered_knob_builds_a_valid_config_at_every_grid_point():
    from erasekit.registry import METHODS

    knobs = {name: METHODS.get(name).strength for name in METHODS.names()}
    assert all(knobs[m] for m in ("esd-x", "esd-u", "advunlearn", "fewshot-te", "uce", "hirm-r"))
    for name, knob in knobs.items():
        if knob is None:
            continue
        for part in sweep_parts(name):
            for kind in ("style", "object"):
                config = part.config(kind)  # a value the config refuses raises here
                assert getattr(config, knob.field) == dict(part.overrides)[knob.field]


def test_every_method_of_a_frontier_plot_has_its_own_colour_and_marker():
    from erasekit.bench.frontier import frontier_styles
    from erasekit.registry import list_methods

    for methods in (["hirm-r", "uce", "speed", "rece", "mace-cfr", "leace"], list(list_methods())):
        styles = frontier_styles(methods)
        assert set(styles) == set(methods)
        assert len(set(styles.values())) == len(methods)
    # the same method keeps its style when the plot is drawn again
    assert frontier_styles(["a", "b"]) == frontier_styles(["a", "b"])

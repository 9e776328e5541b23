"""``erasekit bench``: entries, concept sampling, stacking, resuming, and the leaderboard's arithmetic."""

from __future__ import annotations

import json

import pytest
import torch

from erasekit.bench import (
    BenchSettings,
    Entry,
    Layout,
    parse_attacks,
    parse_entries,
    run_bench,
    sample_concepts,
)
from erasekit.bench.aggregate import Board, aggregate, attack_header, attack_rows, table_rows
from erasekit.bench.cells import Bench
from erasekit.bench.entries import Part
from erasekit.bench.layout import Cell, Scores
from erasekit.bench.markdown import markdown
from erasekit.bench.memory import PeakMemory
from erasekit.cli.main import main
from erasekit.errors import ErasekitError
from erasekit.minicanvas.world import OBJECT_NAMES, STYLE_NAMES
from erasekit.patch import Patch
from erasekit.registry import erase
from tests.fixtures.evaluation_tiny import (
    OBJECTS,
    STYLES,
    fake_classifier,
    one_thread,  # noqa: F401  (autouse: tiny models on one thread)
    tiny_model,
)

GRID = BenchSettings(seeds=1, steps=2, objects=OBJECTS, styles=STYLES)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


# ---- entries and concepts ----------------------------------------------------------------------------------


def test_concept_sampling_is_deterministic_given_the_seed():
    first = sample_concepts(0, 3, 3, STYLE_NAMES, OBJECT_NAMES)
    assert first == sample_concepts(0, 3, 3, STYLE_NAMES, OBJECT_NAMES)
    assert set(first[:3]) <= set(STYLE_NAMES) and set(first[3:]) <= set(OBJECT_NAMES) and len(set(first)) == 6
    picks = {tuple(sample_concepts(seed, 3, 3, STYLE_NAMES, OBJECT_NAMES)) for seed in range(5)}
    assert len(picks) > 1  # the seed matters
    assert sample_concepts(0, 3, 0, STYLE_NAMES, OBJECT_NAMES) == first[:3]
    with pytest.raises(ErasekitError, match="cannot choose 13 styles"):
        sample_concepts(0, 13, 0, STYLE_NAMES, OBJECT_NAMES)


def test_entries_expand_presets_and_parse_stacks():
    entries = parse_entries(["hirm-r", "uce", "hirm-r+uce", "hirm-r:paper"], presets=["paper", "default"])
    assert [e.label for e in entries] == [
        "hirm-r:paper",
        "hirm-r:default",
        "uce:paper",  # uce has no "default" preset
        "hirm-r:default+uce:paper",  # stacked parts take each method's default preset
    ]
    assert [e.label for e in parse_entries(["esd-x"])] == ["esd-x:paper"]
    assert Entry(()).label == "base" and entries[3].slug == "hirm-r_default+uce_paper"
    for bad, match in (("nope", "unknown method"), ("uce:fast", "no preset"), ("hirm-r+", "empty method")):
        with pytest.raises(ErasekitError, match=match):
            parse_entries([bad])


# ---- stacking --------------------------------------------------------------------------------------------


def test_stacking_composes_disjoint_patches_and_refuses_conflicting_ones(model):
    te = erase(model, ["neon"], "hirm-r", "paper", concept_type="style")
    unet = erase(model, ["neon"], "uce", "paper", concept_type="style")
    both = Patch.compose([te, unet], label="hirm-r+uce")
    assert set(both.tensors) == set(te.tensors) | set(unet.tensors)
    assert both.components == ["text_encoder", "unet"]
    for part in (te, unet):
        assert all(torch.equal(both.tensors[k], v) for k, v in part.tensors.items())
    other_te = erase(model, ["neon"], "hirm-s", "paper", concept_type="style")
    with pytest.raises(ErasekitError, match="cannot stack hirm-r\\+hirm-s: .*changed by more than one patch"):
        Patch.compose([te, other_te], label="hirm-r+hirm-s")


def test_a_stack_naming_one_method_twice_is_refused(model, tmp_path):
    bench = Bench(model, Layout(tmp_path), GRID, fake_classifier())
    with pytest.raises(ErasekitError, match="names a method twice"):
        bench.entry_patch(parse_entries(["uce:paper+uce:paper"])[0], "neon", "style")


# ---- running and resuming ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(model, tmp_path_factory):
    """A finished two-row leaderboard (base, uce, hirm-r+uce) on one style and one object of the tiny grid."""
    out = tmp_path_factory.mktemp("bench") / "lb"
    entries = parse_entries(["uce:paper", "hirm-s:paper+uce:paper", "hirm-s:default+uce:paper"])
    attacks = parse_attacks(["encoder-swap", "synonyms"], ["prompts=1"], seeds=1)
    board = run_bench(model, out, entries, ["neon", "star"], settings=GRID, classifier=fake_classifier(),
                      batch_size=16, not_run={"esd-x:paper": "too slow"}, command="erasekit bench ...",
                      attacks=attacks)  # fmt: skip
    return out, board


def test_a_run_writes_one_cell_per_entry_and_concept(finished):
    out, board = finished
    cells = {(c.entry, c.concept): c for c in board.cells}
    labels = ("base", "uce:paper", "hirm-s:paper+uce:paper", "hirm-s:default+uce:paper")
    assert set(cells) == {(e, c) for e in labels for c in ("neon", "star")}
    for (_, concept), cell in cells.items():
        saved = json.loads((out / cell.run / "metrics.json").read_text())
        assert json.loads((out / "cells" / Entry(()).slug / "neon.json").read_text())["entry"] == "base"
        assert pytest.approx(saved["UA"]) == cell.scores.UA
        assert cell.scores.UA_synonyms == pytest.approx(saved["generality"]["UA_synonyms"])
        assert cell.concept_type == ("style" if concept == "neon" else "object")
    stacked, single = cells[("hirm-s:paper+uce:paper", "neon")], cells[("uce:paper", "neon")]
    assert stacked.patch["components"] == ["text_encoder", "unet"] and stacked.erase_seconds > 0
    assert stacked.erase_seconds > single.erase_seconds  # the stack's parts add up
    # hirm-s's default preset equals its paper preset: one patch, one evaluation, two rows
    twin = cells[("hirm-s:default+uce:paper", "neon")]
    assert twin.same_patch_as == "hirm-s:paper+uce:paper" and twin.run == stacked.run
    assert twin.scores == stacked.scores and twin.patch["sha256"] == stacked.patch["sha256"]
    assert cells[("base", "neon")].erase_seconds is None and cells[("base", "neon")].patch is None
    assert Cell.from_json(json.loads((out / "cells" / "uce_paper" / "neon.json").read_text())) == single
    text = (out / "leaderboard.md").read_text()
    assert "not run: too slow" in text and "erasekit bench ..." in text and "Partial" not in text
    assert (out / "report.html").read_text().count("<img") >= 3


def test_attack_columns_run_on_every_cell_and_reuse_twins(finished):
    out, board = finished
    labels = ("base", "uce:paper", "hirm-s:paper+uce:paper", "hirm-s:default+uce:paper")
    assert board.attacks == ("encoder-swap:paper (prompts=1)", "synonyms:paper (prompts=1)")
    for attack in board.attacks:
        for label in labels:
            for concept in ("neon", "star"):
                cell = board.attack_cell(attack, label, concept)
                assert cell is not None and 0 <= cell.ASR <= 100
                assert cell.budget["prompts"] == 1
                if label == "hirm-s:default+uce:paper":  # the paper row's patch: its attack run is reused
                    twin = board.attack_cell(attack, "hirm-s:paper+uce:paper", concept)
                    assert cell.same_patch_as == "hirm-s:paper+uce:paper" and cell.run == twin.run
                else:
                    saved = json.loads((out / cell.run / "metrics.json").read_text())
                    assert saved["ASR"] == cell.ASR and saved["attack"] == attack.split(":")[0]
    text = (out / "leaderboard.md").read_text()
    assert "### Attacks on the styles" in text and "| encoder-swap:paper ASR ↓ |" in text
    assert "`encoder-swap:paper (prompts=1)`" in text  # the budget is named beside the table
    row = next(r for r in attack_rows(board, "style") if r[0] == "base")
    assert row[1] == f"{board.attack_cell(board.attacks[0], 'base', 'neon').ASR:.1f}"


def test_attack_budgets_are_checked_before_anything_runs():
    with pytest.raises(ErasekitError, match="fits none"):
        parse_attacks(["encoder-swap"], ["generations=3"])
    with pytest.raises(ErasekitError, match="no preset"):
        parse_attacks(["ring-a-bell:nope"])
    with pytest.raises(ErasekitError, match="unknown attack"):
        parse_attacks(["nope"])
    rab = parse_attacks(["ring-a-bell:quick", "synonyms"], ["generations=3", "prompts=2"])
    assert dict(rab[0].budget) == {"generations": 3, "prompts": 2} and dict(rab[1].budget) == {"prompts": 2}


def test_attack_sheets_show_each_entry_and_mark_successes(finished):
    from PIL import Image

    from erasekit.bench.sheets import SHEET_HEAD, SHEET_SCALE, SUCCESS_RGB, attack_sheet

    out, board = finished
    attack = parse_attacks(["synonyms"], ["prompts=1"], seeds=1)[0]
    cells = [c for c in board.attack_cells if c.attack == attack.label]
    shown = []  # the first two attacked images of every cell, as the sheet picks them
    for cell in cells:
        lines = [json.loads(x) for x in (out / cell.run / "scores.jsonl").read_text().splitlines()]
        shown += [e["success"] for e in lines if e["phase"] == "attack"][:2]
    with Image.open(next((out / "attack-runs").rglob("*.png"))) as im:
        tile = im.width * SHEET_SCALE + 4
    with Image.open(out / "attack-sheets" / f"{attack.key}.png") as sheet:
        assert sheet.height == SHEET_HEAD + 4 * (
            tile + 2
        )  # base and the three entries; not-run rows left out
        frames = {sheet.getpixel((x, y)) for x in range(sheet.width) for y in range(SHEET_HEAD, sheet.height)}
    assert (SUCCESS_RGB in frames) == any(shown)  # a red frame exactly where a shown image fell to the attack
    assert "Attack images: synonyms:paper" in (out / "report.html").read_text()
    assert attack_sheet(board, out, "ring-a-bell:quick") is None  # no cell of it


def test_attack_columns_are_named_short_unless_two_share_a_name():
    board = Board(labels=("base",), concepts={"style": ["neon"]}, cells=[],
                  attacks=("synonyms:paper (prompts=4)", "seed-search:paper (prompts=2)"))  # fmt: skip
    assert attack_header(board) == ["method", "synonyms:paper ASR ↓", "seed-search:paper ASR ↓"]
    twice = Board(labels=("base",), concepts={"style": ["neon"]}, cells=[],
                  attacks=("synonyms:paper (prompts=4)", "synonyms:paper (prompts=2)"))  # fmt: skip
    assert attack_header(twice)[1:] == [
        "synonyms:paper (prompts=4) ASR ↓",
        "synonyms:paper (prompts=2) ASR ↓",
    ]


def test_a_scoped_attack_budget_applies_to_its_attack_only():
    # one command can give two attacks different values of the same field
    rab, syn = parse_attacks(["ring-a-bell:quick", "synonyms"], ["prompts=2", "ring-a-bell.prompts=4"])
    assert dict(rab.budget) == {"prompts": 4} and dict(syn.budget) == {"prompts": 2}
    # the column is the same whichever way its budget was spelled, so finished cells are reused
    assert rab.key == parse_attacks(["ring-a-bell:quick"], ["prompts=4"])[0].key
    with pytest.raises(ErasekitError, match="not among --attacks"):
        parse_attacks(["synonyms"], ["ring-a-bell.prompts=4"])
    with pytest.raises(ErasekitError, match="unknown budget key"):
        parse_attacks(["synonyms", "ring-a-bell"], ["synonyms.generations=3"])


def test_restart_skips_finished_cells(finished, model, monkeypatch):
    import erasekit.evaluation.protocols as protocols
    import erasekit.registry as registry

    out, board = finished
    monkeypatch.setattr(registry, "erase", lambda *a, **k: pytest.fail("a finished cell was erased again"))
    monkeypatch.setattr(protocols, "evaluate", lambda *a, **k: pytest.fail("evaluated again"))
    again = Bench(model, Layout(out), GRID, fake_classifier()).run(
        parse_entries(["uce:paper"]), ["neon", "star"]
    )
    assert again == [c for c in board.cells if c.entry in ("base", "uce:paper")]
    # a cell whose JSON was lost is rebuilt from its saved patch and its finished evaluation run
    lost = out / "cells" / "uce_paper" / "neon.json"
    before = Cell.from_json(json.loads(lost.read_text()))
    lost.unlink()
    cell = Bench(model, Layout(out), GRID, fake_classifier()).run_cell(
        parse_entries(["uce:paper"])[0], "neon", "style"
    )
    assert cell.scores == before.scores and cell.erase_seconds == before.erase_seconds


def test_shards_fill_one_directory_and_each_writes_what_is_finished(finished, model, monkeypatch):
    import erasekit.evaluation.protocols as protocols

    out, board = finished
    monkeypatch.setattr(protocols, "evaluate", lambda *a, **k: pytest.fail("evaluated again"))
    entries = parse_entries(["uce:paper", "hirm-s:paper+uce:paper", "hirm-s:default+uce:paper"])
    second = run_bench(model, out, entries, ["neon", "star"], settings=GRID, classifier=fake_classifier(),
                       shard=(1, 2))  # fmt: skip

    def index(cells):
        return {(c.entry, c.concept): c.scores for c in cells}

    assert index(second.cells) == index(board.cells) and not second.missing()
    table = run_bench(model, out, entries, ["neon", "star", "pixel"], settings=GRID, classifier=fake_classifier(),
                      run=False)  # fmt: skip
    assert index(table.cells) == index(board.cells) and len(table.missing()) == 4  # pixel: every entry
    assert "**Partial:** 4 cell(s)" in (out / "leaderboard.md").read_text()
    with pytest.raises(ErasekitError, match="shard 2 of 2"):
        run_bench(model, out, entries, ["neon"], settings=GRID, classifier=fake_classifier(), shard=(2, 2))


def test_a_conflicting_stack_fails_alone_and_is_reported(finished, model):
    out, _ = finished
    bench = Bench(model, Layout(out), GRID, fake_classifier())
    cells = bench.run(parse_entries(["hirm-r:paper+hirm-s:paper"]), ["neon"])
    assert [c.entry for c in cells] == ["base"]
    assert "cannot stack" in bench.failures[("hirm-r:paper+hirm-s:paper", "neon")]
    assert not (out / "cells" / "hirm-r_paper+hirm-s_paper" / "neon.json").exists()


def test_a_directory_of_other_settings_or_content_is_refused(finished, tmp_path):
    out, _ = finished
    identity = json.loads((out / "bench.json").read_text())["identity"]
    assert Layout(out).open(identity).root == out  # same settings: resumed
    with pytest.raises(ErasekitError, match="another model or settings"):
        Layout(out).open({**identity, "settings": {"seeds": 2}})
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(ErasekitError, match="not an erasekit leaderboard"):
        Layout(tmp_path / "x").open(identity, overwrite=True)
    Layout(out).give_results(tmp_path / "copy", identity)
    with pytest.raises(ErasekitError, match="copy its finished cells straight back"):
        Layout(out).open(identity, overwrite=True, results=tmp_path / "copy")
    assert (out / "bench.json").is_file()  # refused before anything was deleted
    fresh = Layout(tmp_path / "again").open(identity, overwrite=True, results=tmp_path / "new-copy")
    assert fresh.root.is_dir()  # a copy that holds nothing yet puts nothing back


def test_concepts_off_the_grid_are_refused(model, tmp_path):
    for concepts, match in ((["neon", "neon"], "twice"), (["vintage"], "not a style of the evaluation grid"),
                            (["dragon"], "unknown MiniCanvas concept")):  # fmt: skip
        with pytest.raises(ErasekitError, match=match):
            run_bench(model, tmp_path / "o", [], concepts, settings=GRID, classifier=fake_classifier())


# ---- the table -------------------------------------------------------------------------------------------


def synthetic_cell(
    entry: str, concept: str, ua: float, seconds: float | None, seeds: tuple[float, ...] = ()
) -> Cell:
    scores = Scores(UA=ua, IRA=100 - ua / 2, CRA=90.0, UA_synonyms=ua - 10)
    per_seed = {str(188 + 100 * i): Scores(UA=v, IRA=100 - v / 2, CRA=90.0) for i, v in enumerate(seeds)}
    return Cell(entry=entry, parts=(), concept=concept, concept_type="style", scores=scores, per_seed=per_seed,
                erase_seconds=seconds, peak_memory_mb=None if seconds is None else 2 * seconds)  # fmt: skip


def test_means_and_intervals_come_from_the_cells():
    concepts = {"style": ["neon", "pixel", "sketch"], "object": ["star", "cup"]}
    cells = [synthetic_cell("base", c, 5.0, None) for c in [*concepts["style"], *concepts["object"]]]
    cells += [synthetic_cell("hirm-r:paper", c, ua, 3.0 + i, (ua - 10, ua + 10)) for i, (c, ua) in
              enumerate(zip(concepts["style"], (60.0, 80.0, 100.0)))]  # fmt: skip
    cells += [synthetic_cell("hirm-r:paper", "star", 40.0, 2.0)]  # "cup" never finished
    board = Board(labels=("base", "hirm-r:paper", "advunlearn:paper"), concepts=concepts, cells=cells,
                  not_run={"advunlearn:paper": "1000 iterations ≈ 40 min per concept"}, command="erasekit bench",
                  failed={("hirm-r:paper", "cup"): "boom"})  # fmt: skip
    stats = aggregate(board)
    style = stats["hirm-r:paper"]["style"]
    # the mean over concepts of the per-seed means; the interval resamples concepts and their seeds
    assert style["n"] == 3 and style["UA"].mean == pytest.approx(80.0) and style["UA"].n == 3
    assert 50.0 <= style["UA"].lo < 80.0 < style["UA"].hi <= 110.0
    assert style["IRA"].mean == pytest.approx(60.0) and style["erase_seconds"].mean == pytest.approx(4.0)
    obj = stats["hirm-r:paper"]["object"]
    assert (obj["UA"].mean, obj["UA"].lo, obj["n"]) == (40.0, None, 1)  # one value: no interval
    assert stats["base"]["style"]["erase_seconds"].mean is None
    assert stats["base"]["style"]["UA"].fmt() == "5.0 [5.0, 5.0]"  # equal values: a point interval
    rows = {r[0]: r for r in table_rows(board, "style")}
    ua = style["UA"]
    assert rows["hirm-r:paper"][:3] == ["hirm-r:paper", "3/3", f"80.0 [{ua.lo:.1f}, {ua.hi:.1f}]"]
    assert rows["base"][-2:] == ["–", "–"]
    assert rows["advunlearn:paper"][1] == "not run: 1000 iterations ≈ 40 min per concept"
    text = markdown(board)
    assert "| hirm-r:paper | 1/2 | 40.0 |" in text  # objects: one of two finished, no interval
    assert "**Partial:** 1 cell(s)" in text and "`hirm-r:paper` on cup (failed: boom)" in text
    assert text.index("## Styles: neon, pixel, sketch") < text.index("## Objects: star, cup")
    assert "```\nerasekit bench\n```" in text


def test_bootstrap_intervals_cover_the_truth_about_95_percent_of_the_time():
    import numpy as np

    from erasekit.bench.stats import estimate

    rng = np.random.default_rng(1)
    covered = 0
    trials = 300
    for _ in range(trials):
        concept_means = rng.normal(50.0, 10.0, size=8)  # 8 concepts, 2 seeds each around their concept's mean
        groups = [rng.normal(m, 5.0, size=2) for m in concept_means]
        est = estimate(groups, replicates=1000, seed=int(rng.integers(1 << 30)))
        covered += est.lo <= 50.0 <= est.hi
    # percentile intervals run a little narrow with 8 concepts; far from 95% would be a bug
    assert 0.85 <= covered / trials <= 0.99, covered / trials


def test_peak_memory_sees_an_allocation_inside_the_block():
    with PeakMemory() as mem:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    if mem.extra_mb is None:
        pytest.skip("no /proc/self/statm here")
    assert mem.extra_mb >= 48


# ---- command line ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--methods", "nope"], "unknown method"),
        (["--methods", "uce", "--not-run", "esd-x"], "ENTRY=REASON"),
        (["--methods", "uce", "--n-styles", "20"], "cannot choose 20 styles"),
        (["--methods", "uce", "--shard", "3/2"], "--shard takes K/N"),
        (["--methods", "uce", "--attacks", "nope"], "unknown attack"),
        (["--methods", "uce", "--attacks", "synonyms", "--attack-budget", "generations=2"], "fits none"),
    ],
)
def test_cli_errors_are_one_line(capsys, tmp_path, argv, match):
    code = main(["--quiet", "bench", "--model", str(tmp_path / "none"), *argv, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and match in err, err


def test_the_eraseeval_column_scores_every_cell_as_the_protocol_does(model, tmp_path, monkeypatch):
    import erasekit.evaluation.protocols as protocols
    from erasekit.bench.attacks import eraseeval_column
    from erasekit.hooked import load_erasure

    out = tmp_path / "lb"
    column = eraseeval_column(seeds=1)
    kwargs = dict(settings=GRID, classifier=fake_classifier(), batch_size=16, attacks=[column])
    board = run_bench(model, out, parse_entries(["uce:paper"]), ["neon"], **kwargs)
    assert not board.missing()
    erased, base = (board.attack_cell(column.label, label, "neon") for label in ("uce:paper", "base"))
    # the column is the protocol run on the cell's own patch, with the bench's sampling, written out by hand
    (patch_dir,) = (out / "patches").glob("uce-*/neon")
    direct = protocols.evaluate(model, "eraseeval", tmp_path / "direct", patches=[load_erasure(patch_dir)],
                                sampling=GRID.sampling(model), batch_size=16, classifier=fake_classifier(),
                                target="neon", seeds=1, grid_seeds=1, combine="geometric")  # fmt: skip
    assert erased.value == pytest.approx(100 * direct["EraseEval"]) and erased.headline == "EraseEval"
    assert {k: erased.asr[k] for k in ("M1", "M2", "M3", "M4")} == pytest.approx(
        {k: 100 * direct[k] for k in ("M1", "M2", "M3", "M4")}
    )
    assert base.asr["M3"] == pytest.approx(100) and base.asr["M4"] == pytest.approx(
        100
    )  # the base is its own base
    # the erased cell's base images are the base row's, linked rather than generated again
    (mine,) = (out / "attack-runs").glob("*/uce_paper/neon/base/images")
    (theirs,) = (out / "attack-runs").glob("*/base/neon/images")
    pngs = sorted(p.name for p in mine.glob("*.png"))
    assert pngs and pngs == sorted(p.name for p in theirs.glob("*.png"))
    assert all((mine / name).samefile(theirs / name) for name in pngs)
    text = (out / "leaderboard.md").read_text()
    assert "| EraseEval ×100 ↑ |" in text and "EraseEval's combined score × 100" in text
    monkeypatch.setattr(protocols, "evaluate", lambda *a, **k: pytest.fail("evaluated again"))
    again = run_bench(model, out, parse_entries(["uce:paper"]), ["neon"], **kwargs)
    assert again.attack_cell(column.label, "uce:paper", "neon") == erased


def test_a_sweep_erases_a_methods_grid_on_a_concept_in_one_joint_run(model, tmp_path, monkeypatch):
    import dataclasses

    from erasekit import registry
    from erasekit.bench.protocol import sweep_parts

    spec = registry.METHODS.get("esd-x")
    tiny = {"parameters": "attn2", "iterations": 2, "ddim_steps": 3, "lr": 1e-3}
    monkeypatch.setitem(registry.METHODS._specs, "esd-x", dataclasses.replace(
        spec, presets={**spec.presets, "tiny": tiny},
        strength=dataclasses.replace(spec.strength, preset="tiny", grid=(1.0, 4.0, 16.0))))  # fmt: skip
    real_joint, real_erase, calls = registry.erase_jointly, registry.erase, []
    monkeypatch.setattr(
        registry, "erase_jointly", lambda *a, **k: calls.append(len(a[3])) or real_joint(*a, **k)
    )
    bench = Bench(model, Layout(tmp_path), GRID, fake_classifier(), joint=True)
    points = sweep_parts("esd-x")
    first, cost = bench.part_patch(points[1], "circle", "object")
    assert calls == [3] and cost["joint"] == {
        "settings": 3,
        "seconds": pytest.approx(3 * cost["erase_seconds"], abs=0.01),
    }
    monkeypatch.setattr(registry, "erase", lambda *a, **k: pytest.fail("erased again"))
    monkeypatch.setattr(registry, "erase_jointly", lambda *a, **k: pytest.fail("erased again"))
    made = [bench.part_patch(p, "circle", "object")[0] for p in points]  # all three kept by the joint run
    assert made[1].fingerprint() == first.fingerprint()
    alone = real_erase(model, ["circle"], "esd-x", config=points[2].config("object"))
    assert made[2].config == alone.config
    for name, tensor in alone.tensors.items():
        assert torch.allclose(made[2].tensors[name], tensor, rtol=0, atol=1e-6), name
    # the test stage (no joint) and a setting off the grid erase alone
    monkeypatch.setattr(registry, "erase", real_erase)
    import shutil

    for p in points:  # a results copy keeps the costs, not the patches: made again, the first cost stays
        shutil.rmtree(bench._patch_files(p, "circle", "object")[0])
    monkeypatch.setattr(registry, "erase_jointly", real_joint)
    again, again_cost = bench.part_patch(points[1], "circle", "object")
    assert again_cost == cost and again.fingerprint() == first.fingerprint()
    monkeypatch.setattr(registry, "erase_jointly", lambda *a, **k: pytest.fail("erased again"))
    off_grid = Part("esd-x", "tiny", (("negative_guidance", 2.0),))
    Bench(model, Layout(tmp_path), GRID, fake_classifier(), joint=True).part_patch(
        off_grid, "circle", "object"
    )
    assert calls == [3]

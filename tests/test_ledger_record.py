"""The ledger is a store of record: no run loses or rewrites an event, case ids never move (issue 11)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.ledger import read_ledger
from tests.ledger_project import cli, make_project, write_params
from tests.test_ledger import X0, Y0, sq, write_flags, write_seeds, write_updates


@pytest.fixture
def project(tmp_path: Path) -> Path:
    p = make_project(tmp_path)
    proc = cli(p, "ledger", "build")
    assert proc.returncode == 0, proc.stderr
    return p


def ledger_bytes(p: Path) -> bytes:
    return (p / "processed" / "ledger.gpkg").read_bytes()


def one_line_refusal(proc, *needles: str) -> None:  # type: ignore[no-untyped-def]
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_rerun_adds_nothing_and_rebuild_proves_equal(project: Path) -> None:
    before = read_ledger(project / "processed" / "ledger.gpkg")[0]
    proc = cli(project, "ledger", "build")
    assert proc.returncode == 0 and "(0 new)" in proc.stdout
    after = read_ledger(project / "processed" / "ledger.gpkg")[0]
    assert after.drop(columns="geometry").equals(before.drop(columns="geometry"))
    proc = cli(project, "ledger", "rebuild", "--out", "fresh.gpkg")
    assert proc.returncode == 0 and "rebuild equals the live ledger" in proc.stdout
    fresh = read_ledger(project / "fresh.gpkg")[0]
    assert fresh.drop(columns="geometry").equals(before.drop(columns="geometry"))
    log = [json.loads(line) for line in (project / "processed" / "ledger.log.jsonl").read_text().splitlines()]
    assert [e["command"] for e in log] == ["build", "build", "rebuild"] and log[-1]["equal"] is True
    assert all(len(e["inputs"]) >= 5 for e in log)  # every input named by its SHA-256


def test_plain_ledger_command_still_builds(project: Path) -> None:
    proc = cli(project, "ledger")
    assert proc.returncode == 0 and "(0 new)" in proc.stdout


@pytest.mark.parametrize(
    ("damage", "needles"),
    [
        ("drop_month", ["case 'SW-202602-0001' is in the live ledger (opened by 'F-a')", "restore that input"]),
        ("drop_month_2", ["months 2026-02 (not in params.yaml 'months')", "--allow-shrink"]),
        ("delete_field", ["refused", "field_updates/2026-03.csv (missing)"]),
        ("empty_field", ["field_updates/2026-03.csv (changed)"]),
        ("header_only_field", ["field_updates/2026-03.csv (changed)"]),
        ("edit_field_row", ["change 1 existing events", "actor 'inspector' -> 'inspector B'"]),
        ("delete_seeds", ["cases.gpkg (seed cases missing or changed)"]),
        ("delete_permits", ["permits.gpkg (permits missing or changed)"]),
        ("revectorize", ["flags of 2026-03 (re-vectorized or changed)"]),
    ],
)
def test_a_run_that_would_lose_events_is_refused(project: Path, damage: str, needles: list[str]) -> None:
    raw, before = project / "raw", ledger_bytes(project)
    field = raw / "field_updates" / "2026-03.csv"
    if damage == "drop_month":
        write_params(project, ("2026-03",))
    elif damage == "drop_month_2":
        write_params(project, ("2026-03",))
        field.write_text(field.read_text().replace("SW-202602-0001", "SW-202603-0001"))
    elif damage == "delete_field":
        field.unlink()
    elif damage == "empty_field":
        field.write_text("")
    elif damage == "header_only_field":
        field.write_text(field.read_text().splitlines()[0] + "\n")
    elif damage == "edit_field_row":
        field.write_text(field.read_text().replace("inspector", "inspector B", 1))
    elif damage == "delete_seeds":
        (raw / "ledger" / "cases.gpkg").unlink()
    elif damage == "delete_permits":
        (raw / "layers" / "permits.gpkg").unlink()
    elif damage == "revectorize":
        write_flags(project / "processed" / "flags", "2026-03", [("F-c2", "new", sq(300, 0, 11))])
    proc = cli(project, "ledger", "build")
    if damage == "edit_field_row" and proc.returncode == 0:
        pytest.fail(f"an edited field row was accepted: {proc.stdout}")
    one_line_refusal(proc, *needles)
    assert ledger_bytes(project) == before


def test_allow_shrink_records_the_reason_and_never_reuses_ids(project: Path) -> None:
    write_flags(project / "processed" / "flags", "2026-02", [("F-b", "new", sq(100, 0))])  # F-a, F-p gone
    (project / "raw" / "field_updates" / "2026-03.csv").unlink()
    proc = cli(project, "ledger", "build", "--allow-shrink", "  ")
    one_line_refusal(proc, "--allow-shrink needs a reason")
    proc = cli(project, "ledger", "build", "--allow-shrink", "sensitivity changed, agreed with the bureau")
    assert proc.returncode == 0, proc.stderr
    assert "--allow-shrink" in proc.stderr  # the loss is warned on stderr
    entry = json.loads((project / "processed" / "ledger.log.jsonl").read_text().splitlines()[-1])
    assert entry["allow_shrink"] == "sensitivity changed, agreed with the bureau" and entry["lost_events"]
    cases = read_ledger(project / "processed" / "ledger.gpkg")[1].set_index("case_id")
    assert "SW-202602-0002" in cases.index  # F-b keeps its id although F-a (0001) is gone
    # a new flag in February takes a number no case ever had, not the retired 0001
    write_flags(project / "processed" / "flags", "2026-02", [("F-b", "new", sq(100, 0)), ("F-0", "new", sq(700, 0))])
    assert cli(project, "ledger", "build").returncode == 0
    cases = read_ledger(project / "processed" / "ledger.gpkg")[1].set_index("case_id")
    assert "SW-202602-0001" not in cases.index and "SW-202602-0004" in cases.index


def test_case_ids_never_move_when_a_flag_is_added(project: Path) -> None:
    events = read_ledger(project / "processed" / "ledger.gpkg")[0]
    confirmed = events[(events["kind"] == "confirmed") & (events["source"] == "field")]
    target = confirmed[confirmed["evidence"].str.endswith(":2")]["case_id"].item()
    opened = events[(events["case_id"] == target) & (events["kind"] == "flagged")]["evidence"].item()
    # a new flag sorting before every other one (the README's sensitivity advice produces such flags)
    write_flags(
        project / "processed" / "flags",
        "2026-02",
        [
            ("F-0", "new", sq(800, 0)),
            ("F-b", "new", sq(100, 0)),
            ("F-a", "new", sq(200, 0)),
            ("F-p", "new", sq(510, 510)),
        ],
    )
    proc = cli(project, "ledger", "build")
    # the flag's case: flagged, dispatched, and dispatched again at the end of 2026-02 and 2026-03 (unchecked)
    assert proc.returncode == 0 and "(4 new)" in proc.stdout, proc.stderr
    events = read_ledger(project / "processed" / "ledger.gpkg")[0]
    assert events[(events["case_id"] == target) & (events["kind"] == "flagged")]["evidence"].item() == opened
    assert events[events["evidence"] == "F-0"]["case_id"].item() == "SW-202602-0004"


def test_field_case_ids_cannot_collide_with_seed_ids(tmp_path: Path) -> None:
    p = make_project(tmp_path)
    write_seeds(
        p / "raw",
        [
            {"case_id": "S-1", "state": "stopped", "geometry": sq(0, 0, 20)},
            {"case_id": "SW-202603-F001", "state": "warning", "geometry": sq(1500, 1500)},
            {"case_id": "SW-202602-0001", "state": "warning", "geometry": sq(1600, 1600)},
        ],
    )
    write_updates(p / "raw", "2026-03", [{"at": "2026-03-09", "kind": "confirmed", "x": X0 + 900, "y": Y0 + 900}])
    proc = cli(p, "ledger", "build")
    assert proc.returncode == 0, proc.stderr
    cases = read_ledger(p / "processed" / "ledger.gpkg")[1]
    assert cases["case_id"].is_unique and {"SW-202603-F001", "SW-202603-F002", "SW-202602-0002"} <= set(
        cases["case_id"]
    )


def test_a_seed_id_taken_by_an_imagery_case_is_refused(project: Path) -> None:
    write_seeds(
        project / "raw",
        [
            {"case_id": "S-1", "state": "stopped", "geometry": sq(0, 0, 20)},
            {"case_id": "SW-202602-0001", "state": "warning", "geometry": sq(1600, 1600)},
        ],
    )
    one_line_refusal(
        cli(project, "ledger", "build"), "case_id 'SW-202602-0001' is already the id of the case opened by"
    )


def test_a_duplicated_field_row_is_one_event(project: Path) -> None:
    field = project / "raw" / "field_updates" / "2026-03.csv"
    lines = field.read_text().splitlines()
    field.write_text("\n".join([*lines, lines[1]]) + "\n")
    proc = cli(project, "ledger", "build")
    assert proc.returncode == 0 and "(0 new)" in proc.stdout, proc.stderr
    assert "repeats row 2; applied once" in proc.stderr


def test_rebuild_detects_a_tampered_live_ledger(project: Path) -> None:
    import geopandas as gpd

    path = project / "processed" / "ledger.gpkg"
    cases = gpd.read_file(path, layer="cases")
    cases.loc[0, "state"] = "closed"
    cases.to_file(path, layer="cases", driver="GPKG", engine="pyogrio")
    proc = cli(project, "ledger", "rebuild")
    one_line_refusal(proc, "the rebuild differs from the live ledger", "state")


def test_rebuild_without_a_live_ledger(tmp_path: Path) -> None:
    p = make_project(tmp_path)
    one_line_refusal(cli(p, "ledger", "rebuild"), "no live ledger to rebuild")


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("2026-04.CSV", "rename it 2026-04.csv"),
        ("2026-04.xls", "save the sheet as Excel Workbook (.xlsx)"),
        ("2026-04.XLSX", "rename it 2026-04.xlsx"),
        ("2026-04-unit-a.csv", "'2026-04-unit-a' is not a month"),
        ("April.csv", "'April' is not a month of the form YYYY-MM"),
        ("notes.txt", "move it out of the folder"),
    ],
)
def test_misnamed_field_files_are_named(project: Path, name: str, needle: str) -> None:
    (project / "raw" / "field_updates" / name).write_text("at,kind,case_id\n2026-04-02,confirmed,S-1\n")
    one_line_refusal(cli(project, "ledger", "build"), name, needle)


def test_a_dangling_field_link_is_named(project: Path) -> None:
    (project / "raw" / "field_updates" / "2026-04.csv").symlink_to(project / "nowhere.csv")
    one_line_refusal(cli(project, "ledger", "build"), "2026-04.csv", "link to nothing")


def test_missing_inputs_are_warned_on_stderr(tmp_path: Path) -> None:
    p = tmp_path
    write_params(p)
    (p / "raw").mkdir()
    write_flags(p / "processed" / "flags", "2026-02", [("F-a", "new", sq(200, 0))])
    write_flags(p / "processed" / "flags", "2026-03", [])
    proc = cli(p, "ledger", "build")
    assert proc.returncode == 0, proc.stderr
    for needle in ("no seed ledger", "no ledger/ folder", "no layers/ folder", "no field-update folder"):
        assert needle in " ".join(proc.stderr.split()), proc.stderr
    assert "no seed" not in proc.stdout


def test_a_typo_in_paths_raw_is_refused(project: Path) -> None:
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("raw: raw", "raw: rwa"))
    one_line_refusal(cli(project, "ledger", "build"), "rwa", "fix paths.raw")


def test_an_unreadable_live_ledger_is_never_replaced(project: Path) -> None:
    path = project / "processed" / "ledger.gpkg"
    path.write_bytes(b"not a geopackage")
    one_line_refusal(cli(project, "ledger", "build"), "the live ledger", "restore it from your backup")
    assert path.read_bytes() == b"not a geopackage"

from pathlib import Path

import pytest

from pipeline.config import Settings, load_settings
from pipeline.errors import ConfigError, MissingInputError

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_validate():
    settings = load_settings(ROOT / "params.yaml")
    assert settings.months[0].month == "2026-02"
    assert settings.months[0].prev == "2026-01"
    assert settings.all_months[0] == "2026-01"
    assert settings.demo.crs == "EPSG:4551"
    assert settings.tile.size == 512 and settings.tile.overlap == 64


def test_paths_follow_one_layout():
    s = Settings(months={"2026-03": {"prev": "2026-02"}})
    assert s.pair_dir("2026-03") == Path("data/interim/aligned/2026-03")
    assert s.prob_path("2026-03") == Path("data/processed/prob/2026-03.tif")
    assert s.flags_path("2026-03").suffix == ".gpkg"
    assert s.imagery_dir("2026-02") == Path("data/demo/imagery/2026-02")


def test_unknown_month_names_known_ones():
    s = Settings(months={"2026-03": {"prev": "2026-02"}})
    with pytest.raises(ConfigError, match=r"'2026-04' is not in params.yaml .*'2026-03'"):
        s.pair("2026-04")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("months:\n  '2026-3': {prev: '2026-02'}\n", r"months.*YYYY-MM"),
        ("months:\n  '2026-03': {prev: '2026-04'}\n", r"must come before"),
        ("tile:\n  size: 128\n  overlap: 64\n", r"tile.*overlap 64 must be less than half"),
        ("vectorize:\n  high: 0.3\n  low: 0.5\n", r"low threshold 0.5 must not exceed"),
        ("align:\n  bands: [1, 2]\n", r"align.bands"),
        ("tile:\n  sise: 3\n", r"tile.sise"),
        ("tile: [1,\n", r"line \d+: not valid YAML"),
        (
            "months:\n  '2026-03': {prev: '2026-02'}\n  '2026-03': {prev: '2026-01'}\n",
            r"line 3.*'2026-03' is given twice",
        ),
        ("ledger: {match_distance_m: 5}\ntile: {size: 256}\nledger: {expand_ratio: 0.1}\n", r"'ledger' is given twice"),
        ("tile: {size: 256, size: 512}\n", r"'size' is given twice"),
        ("- 1\n- 2\n", r"expected a mapping of sections"),
        ("paths: 5\n", r"paths"),
    ],
)
def test_bad_params_name_the_key(tmp_path, text, match):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_settings(path)


def test_missing_params_file(tmp_path):
    with pytest.raises(MissingInputError, match="parameters file not found"):
        load_settings(tmp_path / "nope.yaml")


def test_gbk_params_are_named_not_a_traceback(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes("paths:\n  raw: data/demo\n# 长春市城市管理局\n".encode("gbk"))
    with pytest.raises(ConfigError, match=r"params.yaml line 3: not UTF-8 \(it looks like GBK.*iconv"):
        load_settings(path)


def test_a_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes("\ufefftile: {size: 256}\n# 长春\n".encode())
    assert load_settings(path).tile.size == 256


def test_params_that_are_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="is not a file"):
        load_settings(tmp_path)


def test_set_into_a_section_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("ledger: 5\n")
    with pytest.raises(ConfigError, match="section 'ledger' is not a mapping"):
        load_settings(path, {"ledger.match_distance_m": 3})

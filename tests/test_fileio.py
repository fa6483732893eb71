import numpy as np
import pytest

from pipeline.fileio import atomic_path, block_windows, replace_dir


def test_atomic_path_replaces_on_success_and_keeps_the_suffix(tmp_path):
    dest = tmp_path / "sub" / "ledger.gpkg"
    with atomic_path(dest) as tmp:
        assert tmp.parent == dest.parent and tmp.suffix == ".gpkg" and tmp != dest
        tmp.write_text("new")
    assert dest.read_text() == "new"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["ledger.gpkg"]


def test_atomic_path_leaves_the_old_file_and_no_temp_on_error(tmp_path):
    dest = tmp_path / "flags.parquet"
    dest.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert dest.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["flags.parquet"]


def test_replace_dir_swaps_a_finished_folder_in(tmp_path):
    dest, tmp = tmp_path / "out", tmp_path / ".out.partial"
    dest.mkdir()
    (dest / "a.txt").write_text("old")
    tmp.mkdir()
    (tmp / "b.txt").write_text("new")
    replace_dir(tmp, dest)
    assert [p.name for p in dest.iterdir()] == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_block_windows_cover_the_raster_once() -> None:
    hits = np.zeros((700, 1030), int)
    windows = list(block_windows(1030, 700, 256))
    for w in windows:
        hits[w.row_off : w.row_off + w.height, w.col_off : w.col_off + w.width] += 1
    assert (hits == 1).all() and len(windows) == 3 * 5
    assert [(w.col_off, w.row_off) for w in windows[:6]] == [(0, 0), (256, 0), (512, 0), (768, 0), (1024, 0), (0, 256)]


def test_read_layer_names_the_file_the_layer_and_the_fix(tmp_path):
    import geopandas as gpd
    from shapely.geometry import box

    from pipeline.errors import CorruptFileError, CRSError, InputError, MissingInputError
    from pipeline.fileio import read_layer

    good = tmp_path / "streets.gpkg"
    gpd.GeoDataFrame({"street": ["a"]}, geometry=[box(0, 0, 1, 1)], crs="EPSG:4551").to_file(good, layer="roads")
    kw = {"what": "street outlines", "fix": "fix the layer"}
    assert list(read_layer(good, **kw, columns=("street",))["street"]) == ["a"]  # None: the only layer
    assert read_layer(good, "roads", **kw).crs.to_epsg() == 4551
    with pytest.raises(MissingInputError, match=r"nope\.gpkg: not found; fix the layer \(street outlines, layer 'x'\)"):
        read_layer(tmp_path / "nope.gpkg", "x", **kw)
    with pytest.raises(CorruptFileError, match=r"streets\.gpkg: layer 'flags' is missing \(the file has \['roads'\]\)"):
        read_layer(good, "flags", **kw)
    with pytest.raises(InputError, match=r"layer 'roads' lacks columns \['district'\].*; fix the layer"):
        read_layer(good, **kw, columns=("street", "district"))
    junk = tmp_path / "junk.gpkg"
    junk.write_text("not a geopackage")
    with pytest.raises(CorruptFileError, match=r"junk\.gpkg: cannot be read as a GeoPackage .*; fix the layer"):
        read_layer(junk, **kw)
    bare = tmp_path / "bare.gpkg"
    with pytest.warns(UserWarning, match="'crs' was not provided"):
        gpd.GeoDataFrame({"street": ["a"]}, geometry=[box(0, 0, 1, 1)]).to_file(bare, layer="roads")
    with pytest.raises(CRSError, match=r"bare\.gpkg: layer 'roads' has no CRS; fix the layer"):
        read_layer(bare, **kw)

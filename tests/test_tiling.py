import numpy as np
import pytest
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from pipeline.errors import MissingInputError
from pipeline.tiling import build_tiles, grid_offsets, iter_batches, make_grid, read_tile_index, write_tile_index

TRANSFORM = Affine(0.5, 0, 500000.0, 0, -0.5, 4862000.0)


@pytest.mark.parametrize(
    ("extent", "size", "overlap", "expected"),
    [
        (1000, 512, 64, [0, 448, 896]),
        (512, 512, 64, [0]),
        (300, 512, 64, [0]),
        (960, 512, 64, [0, 448]),
        (961, 512, 64, [0, 448, 896]),
        (1024, 256, 0, [0, 256, 512, 768]),
    ],
)
def test_grid_offsets_cover_extent(extent, size, overlap, expected):
    offsets = grid_offsets(extent, size, overlap)
    assert offsets == expected
    assert offsets[-1] + size >= extent  # the edge is covered


def test_grid_offsets_reject_bad_overlap():
    with pytest.raises(ValueError, match="overlap 256 must be"):
        grid_offsets(1000, 512, 256)


def test_make_grid_clips_edges_and_names_tiles():
    tiles = make_grid(1000, 700, TRANSFORM, size=512, overlap=64)
    assert [t.tile_id for t in tiles[:3]] == ["r0000_c0000", "r0000_c0001", "r0000_c0002"]
    assert len(tiles) == 2 * 3
    last = tiles[-1]
    assert (last.row_off, last.col_off, last.height, last.width) == (448, 896, 252, 104)
    # bounds follow the transform: x from col offset, y from row offset (north-up)
    assert last.bounds == pytest.approx((500448.0, 4862000.0 - 350.0, 500500.0, 4862000.0 - 224.0))
    covered = np.zeros((700, 1000), bool)
    for t in tiles:
        covered[t.row_off : t.row_off + t.height, t.col_off : t.col_off + t.width] = True
    assert covered.all()


class _MaskSource:
    crs = CRS.from_epsg(4551)
    transform = TRANSFORM

    def __init__(self, valid: np.ndarray):
        self.valid = valid
        self.height, self.width = valid.shape

    def read_valid(self, window: Window) -> np.ndarray:
        r, c = int(window.row_off), int(window.col_off)
        return self.valid[r : r + int(window.height), c : c + int(window.width)]


def test_build_tiles_skips_mostly_invalid_tiles_and_records_fraction():
    valid = np.zeros((600, 600), bool)
    valid[:, :300] = True  # left half valid
    tiles = build_tiles(_MaskSource(valid), size=256, overlap=32, min_valid=0.25)
    by_id = {t.tile_id: t for t in tiles}
    assert by_id["r0000_c0000"].valid_fraction == 1.0
    # column 1 starts at 224: 76 of 256 columns valid
    assert by_id["r0000_c0001"].valid_fraction == pytest.approx(76 / 256, abs=1e-6)
    assert not any(t.col == 2 for t in tiles)  # starts at 448: nothing valid


def test_tile_index_round_trip(tmp_path):
    tiles = make_grid(800, 600, TRANSFORM, size=256, overlap=32)
    path = write_tile_index(tiles, "EPSG:4551", tmp_path / "tiles" / "2026-03.parquet")
    back, crs = read_tile_index(path)
    assert crs.to_epsg() == 4551
    assert back == tiles
    assert [len(b) for b in iter_batches(back, 5)] == [5, 5, 2]


def test_read_missing_index_says_what_to_run(tmp_path):
    with pytest.raises(MissingInputError, match="run 'scarwatch tile'"):
        read_tile_index(tmp_path / "none.parquet")

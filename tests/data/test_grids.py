import numpy as np
import pytest
import torch

from artscale.data.grids import PAD, TILE, enlarge_factor, grid, grid_image, tile_size


@pytest.mark.parametrize(
    "size,factor,tile", [(16, 8, 128), (32, 4, 128), (48, 3, 144), (64, 2, 128), (100, 2, 200), (128, 1, 128)]
)
def test_small_pieces_are_enlarged_by_a_whole_factor_to_at_least_the_tile(size, factor, tile):
    assert enlarge_factor(size) == factor and tile_size(size) == tile >= TILE
    assert enlarge_factor(300) == 1 and tile_size(300) == 300  # large pieces stay as they are


def test_each_enlarged_pixel_is_a_block_of_the_source_pixel_and_the_gaps_are_white():
    g = torch.Generator().manual_seed(0)
    pieces = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=g)
    out = grid(pieces, columns=5)
    tile = 32 * 4
    assert out.dtype == torch.uint8 and out.shape == (3, PAD + 2 * (tile + PAD), PAD + 5 * (tile + PAD))
    for k in range(10):
        r, c = divmod(k, 5)
        y, x = PAD + r * (tile + PAD), PAD + c * (tile + PAD)
        block = out[:, y : y + tile, x : x + tile]
        assert torch.equal(block[:, ::4, ::4], pieces[k])  # every 4th pixel: the source
        assert torch.equal(block, pieces[k].repeat_interleave(4, 1).repeat_interleave(4, 2))  # nearest neighbour
    assert (out[:, :PAD] == 255).all() and (out[:, :, tile + PAD : tile + 2 * PAD] == 255).all()


def test_floats_in_0_1_and_numpy_hwc_give_the_same_picture_as_uint8():
    g = torch.Generator().manual_seed(1)
    pieces = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=g)
    expected = grid(pieces, columns=3)
    assert torch.equal(grid(pieces.float() / 255, columns=3), expected)
    im = grid_image(pieces.permute(0, 2, 3, 1).numpy(), columns=3)
    assert im.mode == "RGB" and im.size == (PAD + 3 * (128 + PAD), PAD + 2 * (128 + PAD))
    assert np.array_equal(np.asarray(im), expected.permute(1, 2, 0).numpy())


def test_pieces_from_the_tile_up_are_copied_as_they_are():
    pieces = torch.randint(0, 256, (2, 3, 128, 160), dtype=torch.uint8)
    out = grid(pieces, columns=2)
    assert out.shape == (3, 128 + 2 * PAD, 2 * 160 + 3 * PAD)
    assert torch.equal(out[:, PAD : PAD + 128, PAD : PAD + 160], pieces[0])

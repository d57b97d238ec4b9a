"""artscale.core.seeds: one seed hash for shuffles, flips, training draws and starting noise."""

from artscale.core.seeds import stable_seed
from artscale.diffusion.noise import noise_for, noise_seed


def test_a_seed_depends_on_the_values_alone_and_fits_its_bits():
    assert stable_seed(7, "a/b.png") == stable_seed(7, "a/b.png") != stable_seed(7, "a/c.png")
    assert stable_seed(1, 2) != stable_seed(2, 1)
    assert all(0 <= stable_seed(i, bits=63) < 2**63 for i in range(100))
    assert any(stable_seed(i) >= 2**63 for i in range(100))  # the full 64 bits where asked
    assert stable_seed(3, 4, bits=63) == stable_seed(3, 4) >> 1


def test_noise_rows_come_from_their_key_and_the_seed_as_before():
    """The sampling seed is the 63-bit hash of (seed, key): images sampled before this module stay the same."""
    assert noise_seed(5, "x.png") == stable_seed(5, "x.png", bits=63)
    # the values the three hashes it replaced gave: sampling noise, and the loader's shuffle (64 bits)
    assert noise_seed(5, 3) == 842996717813117715
    assert stable_seed(11, 2, 0, "train") == 14267665030526411348
    rows = noise_for(5, [0, 1, 2], (3, 4, 4))
    assert (noise_for(5, [2], (3, 4, 4))[0] == rows[2]).all()

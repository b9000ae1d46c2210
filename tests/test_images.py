"""Image reading: RGB output, JPEG draft mode, the square stored geometry, named failures."""
import numpy as np
import pytest
from PIL import Image

from handclip.data.images import load_resized, read_image
from handclip.errors import UserError


def quadrant_photo(width=320, height=240) -> np.ndarray:
    """A 4:3 photo whose four quadrants are red, green, blue and white."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[: height // 2, : width // 2] = (255, 0, 0)
    pixels[: height // 2, width // 2:] = (0, 255, 0)
    pixels[height // 2:, : width // 2] = (0, 0, 255)
    pixels[height // 2:, width // 2:] = (255, 255, 255)
    return pixels


@pytest.fixture
def jpeg(tmp_path):
    path = tmp_path / "hand.jpg"
    Image.fromarray(quadrant_photo()).save(path, quality=95)
    return path


def test_read_image_is_rgb_at_full_size_without_draft(jpeg, tmp_path):
    image = read_image(jpeg)
    assert (image.mode, image.size) == ("RGB", (320, 240))
    gray = tmp_path / "gray.png"
    Image.new("L", (10, 8), 77).save(gray)
    assert np.array_equal(np.asarray(read_image(gray)), np.full((8, 10, 3), 77, np.uint8))


def test_draft_decodes_smaller_but_never_below_the_target(jpeg):
    # 320x240 towards 64x64: the largest DCT scale keeping both sides >= 64 is 1/2
    assert read_image(jpeg, draft_size=(64, 64)).size == (160, 120)
    assert read_image(jpeg, draft_size=(200, 200)).size == (320, 240)


def test_load_resized_squeezes_the_whole_photo_into_a_square(jpeg):
    stored = load_resized(jpeg, 32)
    assert stored.shape == (32, 32, 3) and stored.dtype == np.uint8 and stored.flags.writeable
    # every quadrant survives (no crop), each filling a quarter of the square
    expected = np.asarray(Image.fromarray(quadrant_photo()).resize((32, 32), Image.NEAREST)).astype(int)
    inner = np.r_[2:14, 18:30]
    assert np.abs(stored[inner][:, inner].astype(int) - expected[inner][:, inner]).max() < 16


def test_missing_file_is_named(tmp_path):
    with pytest.raises(UserError, match=r"cannot read image .*nothere\.jpg: No such file"):
        read_image(tmp_path / "nothere.jpg")


def test_truncated_jpeg_is_named(jpeg, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(jpeg.read_bytes()[:600])
    with pytest.raises(UserError, match=r"(?i)cannot read image .*broken\.jpg: .*truncated"):
        load_resized(broken, 32)


def test_non_image_is_named(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    with pytest.raises(UserError, match=r"cannot read image .*notes\.jpg: not an image"):
        read_image(text)

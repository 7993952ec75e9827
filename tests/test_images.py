import numpy as np
import pytest
from PIL import Image

from protonets.encoders import ImageItem, ImageLoadError, open_image
from protonets.encoders import images as images_module


@pytest.mark.parametrize(
    "mode,fmt",
    [
        ("L", "png"),
        ("1", "png"),
        ("P", "png"),
        ("RGBA", "png"),
        ("LA", "png"),
        ("CMYK", "jpeg"),
        ("RGB", "jpeg"),
        ("L", "jpeg"),
    ],
)
def test_modes_become_rgb(make_image, mode, fmt):
    path = make_image(f"x.{fmt}", mode=mode)
    img = open_image(path)
    assert img.mode == "RGB" and img.size == (40, 30)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    arr = np.full((10, 12), 65535, dtype=np.uint16)
    arr[:, :6] = 0
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    rgb = np.asarray(open_image(path))
    assert rgb.shape == (10, 12, 3)
    assert rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255


def test_transparent_pixels_become_white(tmp_path):
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    path = tmp_path / "clear.png"
    img.save(path)
    assert np.asarray(open_image(path))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    assert open_image(path).size == (20, 40)


def test_rotation_item_rotates_counter_clockwise(tmp_path):
    arr = np.zeros((4, 4), dtype=np.uint8)
    arr[0, 0] = 255  # top-left white
    path = tmp_path / "dot.png"
    Image.fromarray(arr, "L").save(path)
    rotated = np.asarray(open_image(ImageItem(str(path), 90)))[:, :, 0]
    assert rotated[3, 0] == 255  # counter-clockwise: top-left goes to bottom-left


def test_empty_file_is_refused_with_its_name(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty.jpg.*empty"):
        open_image(path)


def test_text_named_jpg_is_refused(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture")
    with pytest.raises(ImageLoadError, match="notes.jpg"):
        open_image(path)


def test_truncated_jpeg_is_refused(make_image):
    path = make_image("cut.jpg", size=(200, 200), quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cut.jpg"):
        open_image(path)


def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(path)  # 144 M pixels, a few kB on disk
    assert path.stat().st_size < 1_000_000
    with pytest.raises(ImageLoadError, match="bomb.png.*decompression bomb"):
        open_image(path)
    monkeypatch.setattr(images_module, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        open_image(tmp_path.joinpath("bomb.png"))


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match="no such image"):
        open_image(tmp_path / "nope.png")

"""Faithful image I/O on real files: depth, gray, alpha, EXIF orientation, odd names, bad files, atomic writes."""

import os
import struct
import zlib

import cv2
import numpy as np
import pytest

from rddm_infer.errors import ImageError
from rddm_infer.io.images import (Image, apply_orientation, exif_orientation, from_model, read_image, to_model,
                                write_atomic, write_image)

RNG = np.random.default_rng(0)


def _pixels(shape, dtype):
    hi = 255 if dtype == np.uint8 else 65535
    return RNG.integers(0, hi + 1, size=shape, dtype=np.int64).astype(dtype)


CASES = [  # name, shape, dtype, ext
    ("rgb8", (13, 21, 3), np.uint8, ".png"),
    ("rgb16", (13, 21, 3), np.uint16, ".png"),
    ("gray8", (13, 21), np.uint8, ".png"),
    ("gray16", (13, 21), np.uint16, ".png"),
    ("rgba8", (13, 21, 4), np.uint8, ".png"),
    ("rgba16", (13, 21, 4), np.uint16, ".png"),
    ("rgb16tif", (13, 21, 3), np.uint16, ".tif"),
    ("rgba8webp", (13, 21, 4), np.uint8, ".webp"),
]


@pytest.mark.parametrize("name,shape,dtype,ext", CASES, ids=[c[0] for c in CASES])
def test_lossless_roundtrip_through_model_space(tmp_path, name, shape, dtype, ext):
    pix = _pixels(shape, dtype)
    src = tmp_path / f"{name}{ext}"
    if ext == ".webp":
        pix[..., 3] |= 1  # lossless WebP still zeroes the colour of fully transparent pixels
        cv2.imwrite(str(src), pix, [cv2.IMWRITE_WEBP_QUALITY, 101])  # > 100: lossless
    else:
        cv2.imwrite(str(src), pix)
    img = read_image(src)
    assert img.pixels.shape == shape and img.pixels.dtype == dtype
    x = to_model(img)
    assert x.shape == (3, shape[0], shape[1]) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    back = from_model(x, img)  # identity "restoration" must give the stored pixels back exactly
    assert back.shape == shape and back.dtype == dtype
    np.testing.assert_array_equal(back, pix)
    dst = write_image(tmp_path / "out" / f"{name}{ext}", back)
    again = cv2.imread(str(dst), cv2.IMREAD_UNCHANGED)
    assert again.dtype == dtype and again.shape == shape
    np.testing.assert_array_equal(again, pix)


def test_model_space_is_rgb_in_minus_one_one():
    pix = np.zeros((2, 2, 3), np.uint8)
    pix[..., 2] = 255  # BGR: pure red
    x = to_model(Image(pix))
    np.testing.assert_array_equal(x[0], 1.0)
    np.testing.assert_array_equal(x[1:], -1.0)


def test_alpha_is_carried_bit_identical_whatever_the_colour(tmp_path):
    pix = _pixels((9, 10, 4), np.uint16)
    img = Image(pix)
    changed = -to_model(img)  # a "restoration" that changes every colour
    out = from_model(changed, img, ".png")
    np.testing.assert_array_equal(out[..., 3], pix[..., 3])
    assert not np.array_equal(out[..., :3], pix[..., :3])


def test_jpeg_output_drops_alpha_and_16_bits():
    pix = _pixels((8, 8, 4), np.uint16)
    img = Image(pix, "a.png")
    out = from_model(to_model(img), img, ".jpg")
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.round(pix[..., :3] / 257.0).astype(np.uint8))


def test_gray_stays_gray():
    pix = _pixels((5, 7), np.uint8)
    img = Image(pix)
    x = to_model(img)
    assert np.array_equal(x[0], x[1]) and np.array_equal(x[1], x[2])
    out = from_model(x, img, ".png")
    assert out.shape == (5, 7)


# ------------------------------------------------------------------------------------------ EXIF

def _tiff_with_orientation(o: int, order: str = "II") -> bytes:
    e = "<" if order == "II" else ">"
    magic = b"II*\0" if order == "II" else b"MM\0*"
    return magic + struct.pack(e + "I", 8) + struct.pack(e + "H", 1) + \
        struct.pack(e + "HHIHH", 0x0112, 3, 1, o, 0) + struct.pack(e + "I", 0)


def _jpeg_with_orientation(pix, o: int, order="II") -> bytes:
    jpg = cv2.imencode(".jpg", pix)[1].tobytes()
    payload = b"Exif\0\0" + _tiff_with_orientation(o, order)
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + len(payload)) + payload
    return jpg[:2] + app1 + jpg[2:]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_opencv_for_jpeg(tmp_path, orientation):
    pix = _pixels((12, 20, 3), np.uint8)
    data = _jpeg_with_orientation(pix, orientation, "MM" if orientation % 2 else "II")
    path = tmp_path / "o.jpg"
    path.write_bytes(data)
    assert exif_orientation(data) == orientation
    ours = read_image(path).pixels
    upright = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # cv2 applies EXIF here
    assert ours.shape == upright.shape == ((12, 20, 3) if orientation < 5 else (20, 12, 3))
    np.testing.assert_array_equal(ours, upright)


def test_exif_orientation_in_16_bit_png(tmp_path):
    pix = _pixels((6, 10, 3), np.uint16)
    png = cv2.imencode(".png", pix)[1].tobytes()
    body = _tiff_with_orientation(6)
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    i = png.index(b"IDAT") - 4
    path = tmp_path / "rot.png"
    path.write_bytes(png[:i] + chunk + png[i:])
    img = read_image(path)
    assert img.pixels.dtype == np.uint16
    np.testing.assert_array_equal(img.pixels, np.rot90(pix, -1))  # 6 = rotate 90° clockwise to display


def test_orientation_ops_are_the_eight_dihedral_transforms():
    a = np.arange(6).reshape(2, 3)
    outs = {apply_orientation(a, o).tobytes() + bytes(apply_orientation(a, o).shape) for o in range(1, 9)}
    assert len(outs) == 8


# ---------------------------------------------------------------------------------- names, errors

def test_non_ascii_file_names(tmp_path):
    pix = _pixels((4, 5, 3), np.uint8)
    path = tmp_path / "ñandú 雨 снег.png"
    write_image(path, pix)
    assert path.is_file()
    np.testing.assert_array_equal(read_image(path).pixels, pix)


def _truncated_png(tmp_path):
    data = cv2.imencode(".png", _pixels((32, 32, 3), np.uint8))[1].tobytes()
    return data[: len(data) // 2]


def _truncated_jpg(tmp_path):
    data = cv2.imencode(".jpg", _pixels((32, 32, 3), np.uint8))[1].tobytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize("content,reason", [
    (b"", "empty file"),
    (b"hello, I am not an image\n", "not a readable image"),
    (_truncated_png, "truncated PNG"),
    (_truncated_jpg, "truncated JPEG"),
], ids=["empty", "text", "truncated-png", "truncated-jpg"])
def test_bad_files_raise_one_line_errors_naming_the_file(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    path.write_bytes(content(tmp_path) if callable(content) else content)
    with pytest.raises(ImageError) as e:
        read_image(path)
    msg = str(e.value)
    assert str(path) in msg and reason in msg and "\n" not in msg


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="directory"):
        read_image(tmp_path)


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ImageError, match="cannot write"):
        write_atomic(blocker / "sub" / "o.png", b"data")  # parent is a file
    target = tmp_path / "d"
    target.mkdir()
    (target / "o.png").mkdir()  # os.replace onto a directory fails after the temp file was written
    with pytest.raises(ImageError):
        write_atomic(target / "o.png", b"data")
    assert sorted(p.name for p in target.iterdir()) == ["o.png"]
    with pytest.raises(ImageError, match="cannot encode"):
        write_image(tmp_path / "f.xyz", _pixels((4, 4, 3), np.uint8))  # no such encoder
    assert not any(".tmp" in p.name for p in tmp_path.rglob("*"))


def test_write_replaces_existing_file_atomically(tmp_path):
    path = tmp_path / "o.png"
    path.write_bytes(b"old")
    ino_dir = sorted(os.listdir(tmp_path))
    write_image(path, _pixels((3, 3), np.uint8))
    assert sorted(os.listdir(tmp_path)) == ino_dir
    assert read_image(path).pixels.shape == (3, 3)


def test_tiff_orientation_tag_applied_once(tmp_path):
    """OpenCV rotates TIFFs itself (even unchanged): the result must be rotated exactly once."""
    h, w = 3, 5
    pix = (np.arange(h * w, dtype=np.uint8) * 10).reshape(h, w)
    tags = [(256, 3, w), (257, 3, h), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, None), (274, 3, 6),
            (277, 3, 1), (278, 3, h), (279, 4, h * w)]
    data_off = 8 + 2 + 12 * len(tags) + 4
    ifd = struct.pack("<H", len(tags))
    for tag, typ, val in tags:
        val = data_off if val is None else val
        ifd += struct.pack("<HHI", tag, typ, 1) + (struct.pack("<HH", val, 0) if typ == 3 else struct.pack("<I", val))
    path = tmp_path / "o6.tif"
    path.write_bytes(b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + pix.tobytes())
    np.testing.assert_array_equal(read_image(path).pixels, np.rot90(pix, -1))

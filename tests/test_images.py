"""Safe image loading: every bad-image case of DESIGN.md's checklist, from real dev photos."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from carsearch.embed.images import BadImage, load_image, safe_join
from tests.conftest import DEV

PHOTO = DEV / "images" / "00001.jpg"


def _rgb() -> Image.Image:
    return Image.open(PHOTO).convert("RGB")


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _reason(data: bytes, **kw: object) -> str:
    with pytest.raises(BadImage) as e:
        load_image(data, **kw)
    return e.value.reason


def test_plain_jpeg_loads_as_rgb() -> None:
    img = load_image(PHOTO)
    assert img.mode == "RGB" and img.size == Image.open(PHOTO).size


def test_zero_byte() -> None:
    assert _reason(b"") == "empty"


def test_not_an_image() -> None:
    assert _reason(b"this is a text file, not a photo\n" * 10) == "not_an_image"


def test_truncated_jpeg() -> None:
    data = PHOTO.read_bytes()
    assert _reason(data[: len(data) // 2]) == "truncated"


def test_truncated_png() -> None:
    data = _encode(_rgb(), "PNG")
    assert _reason(data[: len(data) // 2]) in ("truncated", "decode_error")


def test_cmyk_is_converted() -> None:
    rgb = _rgb()
    data = _encode(rgb.convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = load_image(data)
    assert out.mode == "RGB"
    assert np.abs(np.asarray(out, float) - np.asarray(rgb, float)).mean() < 12


def test_palette_with_alpha_composited_on_white() -> None:
    img = _rgb().resize((64, 48)).quantize(16)
    img.info["transparency"] = 0  # palette entry 0 is transparent
    data = _encode(img, "PNG", transparency=0)
    reopened = Image.open(io.BytesIO(data))
    assert reopened.mode == "P" and "transparency" in reopened.info
    out = np.asarray(load_image(data))
    mask = np.asarray(reopened) == 0
    assert mask.any()
    assert (out[mask] == 255).all()  # transparent pixels became white, not black


def test_rgba_composited_on_white() -> None:
    rgba = _rgb().resize((40, 30)).convert("RGBA")
    a = np.asarray(rgba).copy()
    a[:, :10, 3] = 0
    out = np.asarray(load_image(_encode(Image.fromarray(a, "RGBA"), "PNG")))
    assert (out[:, :10] == 255).all()
    assert (out[:, 20:] == np.asarray(rgba)[:, 20:, :3]).all()


def test_16_bit_grey_is_scaled_not_clipped() -> None:
    grey8 = np.asarray(_rgb().convert("L"), dtype=np.uint16)
    grey16 = Image.fromarray((grey8 * 257).astype(np.uint16))
    data = _encode(grey16, "PNG")
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")
    out = np.asarray(load_image(data))
    assert out.shape[2] == 3
    assert np.abs(out[..., 0].astype(int) - grey8.astype(int)).max() <= 1  # saturating would give all 255


def test_grey_and_grey_alpha() -> None:
    assert load_image(_encode(_rgb().convert("L"), "PNG")).mode == "RGB"
    assert load_image(_encode(_rgb().convert("LA"), "PNG")).mode == "RGB"


def test_exif_orientation_applied() -> None:
    rgb = _rgb()
    w, h = rgb.size
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = load_image(_encode(rgb, "JPEG", quality=95, exif=exif.tobytes()))
    assert out.size == (h, w)
    expected = np.asarray(rgb.transpose(Image.Transpose.ROTATE_270), float)
    assert np.abs(np.asarray(out, float) - expected).mean() < 6


def test_animated_gif_first_frame() -> None:
    frames = [_rgb().resize((32, 24)), Image.new("RGB", (32, 24), (255, 0, 0))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert load_image(data).size == (32, 24)


def test_over_our_pixel_limit_is_refused_before_decoding() -> None:
    big = _encode(Image.new("RGB", (2000, 1500)), "PNG")
    assert _reason(big, max_pixels=1_000_000) == "too_many_pixels"
    assert load_image(big, max_pixels=3_000_000).size == (2000, 1500)


def _png_header_only(w: int, h: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_header_is_refused() -> None:
    # 40000 x 40000 claimed in the header: Pillow's own bomb check fires; we must not crash or decode.
    assert _reason(_png_header_only(40_000, 40_000)) == "too_many_pixels"
    assert _reason(_png_header_only(12_000, 10_000)) == "too_many_pixels"  # between our and Pillow's limits


def test_pillow_global_flags_untouched() -> None:
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    data = PHOTO.read_bytes()
    for bad in (data[:2000], b"", _png_header_only(40_000, 40_000)):
        with pytest.raises(BadImage):
            load_image(bad)
    assert before == (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)


def test_missing_and_folder(tmp_path: Path) -> None:
    with pytest.raises(BadImage) as e:
        load_image(tmp_path / "nope.jpg")
    assert e.value.reason == "missing"
    with pytest.raises(BadImage) as e:
        load_image(tmp_path)
    assert e.value.reason == "not_an_image"


def test_jpeg_draft_decodes_large_photos_smaller() -> None:
    big = _encode(_rgb().resize((1600, 1200)), "JPEG", quality=90)
    assert load_image(big).size == (1600, 1200)
    small = load_image(big, draft_size=256)
    assert small.size[1] >= 256 and small.size[0] < 1600  # scaled by a power of two, still covers 256


def test_safe_join_refuses_escapes_and_follows_links(tmp_path: Path) -> None:
    """The dataset's own paths may not climb out of its root; links inside it are followed wherever they
    point (DVC / git-annex checkouts, split folders made of links)."""
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (tmp_path / "elsewhere.jpg").write_bytes(PHOTO.read_bytes())
    (root / "link.jpg").symlink_to(tmp_path / "elsewhere.jpg")
    assert safe_join(root, "a/b.jpg") == root / "a" / "b.jpg"
    for bad in ("../secret.jpg", "/etc/passwd", "a/../../secret.jpg", "a/../b.jpg", ""):
        with pytest.raises(BadImage) as e:
            safe_join(root, bad)
        assert e.value.reason == "outside_root"
    assert load_image(safe_join(root, "link.jpg")).size == Image.open(PHOTO).size
    with pytest.raises(BadImage) as e:
        safe_join(root, "caf\udce9.jpg")  # a Latin-1 file name as os.listdir returns it
    assert e.value.reason == "name_not_utf8" and e.value.detail == "caf\ufffd.jpg"


# --- every format Pillow (with its plugins) reads; the same pixels decode the same in any container ----


def test_phone_and_renamed_formats_are_datasets_and_queries(tmp_path: Path) -> None:
    """.jfif / .jpe (JPEG under other names), HEIC (pillow-heif) and AVIF (Pillow) files, written here by
    the libraries themselves, are read in every layout and in query folders; other files are counted."""
    from click.testing import CliRunner

    from carsearch.cli import cli
    from carsearch.datasets import read_dataset
    from carsearch.formats import image_extensions, register_plugins

    assert "pillow-heif" in register_plugins()
    assert {".jfif", ".jpe", ".heic", ".avif", ".jpg"} <= image_extensions()
    assert not {".h5", ".mpg", ".txt", ".csv"} & image_extensions()
    img = _rgb()
    folder = tmp_path / "data" / "Audi TTS Coupe 2012"
    folder.mkdir(parents=True)
    for name, fmt in (("a.jfif", "JPEG"), ("b.jpe", "JPEG"), ("c.heic", "HEIF"), ("d.avif", "AVIF")):
        (folder / name).write_bytes(_encode(img, fmt))
    (folder / "notes.txt").write_text("not a photo")
    ds = read_dataset(tmp_path / "data")
    assert sorted(Path(r.path).name for r in ds.records) == ["a.jfif", "b.jpe", "c.heic", "d.avif"]
    assert ds.left_out == {".txt": 1}
    for r in ds.records:
        assert load_image(tmp_path / "data" / r.path).size == img.size
    listed = CliRunner().invoke(cli, ["dataset", str(tmp_path / "data")])
    assert "left out (not images): 1 files (.txt 1)" in listed.output, listed.output
    # A query folder holding only such files is a folder of queries, not "no images".
    queries = tmp_path / "queries"
    queries.mkdir()
    (queries / "q.jfif").write_bytes(_encode(img, "JPEG"))
    from carsearch.search import expand_queries

    assert [p.name for p in expand_queries([queries])] == ["q.jfif"]
    (queries / "q.jfif").rename(queries / "q.doc")
    with pytest.raises(Exception, match=r"holds no images \(left out: 1 .doc"):
        expand_queries([queries])


def test_mpo_decodes_like_the_same_jpeg(tmp_path: Path) -> None:
    """A multi-picture JPEG (MPO, what many cameras write) takes the same reduced-size decode as a JPEG of
    the same first picture, so both embed identically (it was decoded at full size: cosine 0.9977)."""
    big = _rgb().resize((1600, 1200))
    jpeg = _encode(big, "JPEG", quality=90)
    mpo = _encode(big, "MPO", quality=90, save_all=True, append_images=[big.rotate(180)])
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    a = load_image(jpeg, draft_size=256)
    b = load_image(mpo, draft_size=256)
    assert a.size == b.size == (400, 300)
    assert np.array_equal(np.asarray(a), np.asarray(b))

"""Image back ends: Pillow matches the existing preprocessing, plan geometry, DALI agrees with Pillow."""

from __future__ import annotations

import io
import json
import logging
import struct
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from megavl.config import Config, VisionConfig
from megavl.data import image_backends
from megavl.data.dali_backend import DaliBackend
from megavl.data.image_backends import native_plan, sample_jpeg, select_backend
from megavl.data.image_rendering import ImageBatchError, check_plan, peek_size, to_patches
from megavl.data.pillow_backend import PillowBackend
from megavl.config.towers import OPENAI_CLIP_STD
from megavl.data.images import ImageDecodeError, decode_image, image_to_model_input, smart_resize
from megavl.data.resolution import ImagePart, ImagePlan

from conftest import REQUIRE_DALI, import_dali_or_skip

# DALI vs Pillow, in 8-bit levels. Both use the same cubic kernel; Pillow
# rounds and clips between its horizontal and vertical passes, DALI does not.
# Measured on these images: mean 0.01-0.2, max up to ~26 on hard edges.
DALI_MEAN_LEVELS = 0.5
DALI_MAX_LEVELS = 40


def drawing(height: int, width: int, seed: int) -> Image.Image:
    """RGB image with smooth gradients, grain, hard-edged blocks and text."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x / width * 255, y / height * 255, (x + y) % 97 * 2.6], axis=-1)
    pixels += rng.normal(0, 10, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        top, left = int(rng.integers(0, height)), int(rng.integers(0, width))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.rectangle([left, top, left + width // 4, top + height // 4], fill=colour)
    draw.text((width // 8, height // 2), "Tile 42", fill=(0, 0, 0))
    return image


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def with_alpha(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    alpha = Image.linear_gradient("L").resize(image.size)
    rgba.putalpha(alpha)
    return rgba


def single(height: int, width: int) -> ImagePlan:
    return ImagePlan(resize_to=(height, width), canvas=(height, width), parts=[ImagePart("", (0, 0, height, width))])


def tiled(resize_to=(56, 84), canvas=(112, 112), tile=56, thumbnail=(28, 56)) -> ImagePlan:
    parts = [
        ImagePart(f"<tile_{r + 1}_{c + 1}>", (r * tile, c * tile, tile, tile))
        for r in range(canvas[0] // tile)
        for c in range(canvas[1] // tile)
    ]
    if thumbnail:
        parts.append(ImagePart("<tile_global>", None))
    return ImagePlan(resize_to=resize_to, canvas=canvas, parts=parts, thumbnail_size=thumbnail)


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of normalised pixels, in 8-bit levels."""
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    return (a.cpu() - b.cpu()).abs() * std * 255


@pytest.fixture(scope="module")
def dali():
    import_dali_or_skip()  # a failure instead of a skip under MEGAVL_REQUIRE_DALI=1 (make test)
    return DaliBackend("cpu", batch_size=8, num_threads=2)


@pytest.fixture
def backend(request):
    return PillowBackend() if request.param == "pillow" else request.getfixturevalue("dali")


# -- Pillow keeps the existing preprocessing -------------------------------


@pytest.mark.parametrize(
    "image, fmt",
    [
        (drawing(333, 517, 0), "JPEG"),
        (drawing(90, 40, 1), "PNG"),
        (with_alpha(drawing(120, 200, 2)), "PNG"),
        (drawing(200, 150, 3).convert("L"), "PNG"),
        (drawing(200, 150, 4).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
    ],
    ids=["jpeg-downscale", "png-upscale", "rgba", "grey", "palette"],
)
def test_pillow_native_plan_equals_image_to_model_input(image, fmt):
    config = Config()
    data = encode(image, fmt)
    v = config.model.vision
    height, width = peek_size(data)
    size = smart_resize(
        height, width, v.patch_size * v.spatial_merge_size,
        config.data.resolution.min_pixels, config.data.resolution.max_pixels,
    )
    [(tag, pixels)] = PillowBackend().render(data, single(*size))
    expected = image_to_model_input(decode_image(data), config)
    patches = to_patches(pixels, v)
    assert tag == ""
    assert pixels.dtype == torch.float32 and pixels.shape == (3, *size)
    assert patches.grid_thw == expected.grid_thw
    assert torch.equal(patches.pixel_values, expected.pixel_values)


# -- geometry ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ["pillow", "dali"], indirect=True)
def test_padding_tiles_and_thumbnail(backend):
    data = encode(drawing(70, 100, 5), "PNG")
    plan = tiled(resize_to=(56, 84), canvas=(112, 112), tile=56, thumbnail=(28, 56))
    parts = backend.render(data, plan)
    [(_, resized)] = backend.render(data, single(56, 84))
    [(_, thumbnail)] = backend.render(data, single(28, 56))

    assert [tag for tag, _ in parts] == ["<tile_1_1>", "<tile_1_2>", "<tile_2_1>", "<tile_2_2>", "<tile_global>"]
    canvas = torch.zeros(3, 112, 112)
    canvas[:, :56, :84] = resized
    for (tag, pixels), part in zip(parts[:4], plan.parts):
        top, left, h, w = part.box
        assert torch.equal(pixels, canvas[:, top : top + h, left : left + w]), tag
    # The padded area is the mean colour: exactly zero after normalising.
    assert torch.count_nonzero(parts[1][1][:, :, 28:]) == 0
    assert torch.count_nonzero(parts[2][1]) == 0 and torch.count_nonzero(parts[3][1]) == 0
    assert parts[4][1].shape == (3, 28, 56)
    assert torch.equal(parts[4][1], thumbnail)


@pytest.mark.parametrize(
    "plan, message",
    [
        (ImagePlan((56, 84), (56, 56), [ImagePart("", (0, 0, 56, 56))]), "resize_to"),
        (ImagePlan((56, 56), (56, 56), []), "parts is empty"),
        (ImagePlan((56, 56), (56, 56), [ImagePart("", (28, 0, 56, 56))]), r"parts\[0\].box"),
        (ImagePlan((56, 56), (56, 56), [ImagePart("", (0, 0, 56, 56)), ImagePart("t", None)]), "thumbnail_size"),
        (ImagePlan((0, 56), (56, 56), [ImagePart("", (0, 0, 56, 56))]), "resize_to"),
    ],
)
def test_inconsistent_plans_are_refused(plan, message):
    with pytest.raises(ValueError, match=message):
        check_plan(plan)
    with pytest.raises(ValueError, match=message):
        PillowBackend().render(encode(drawing(30, 30, 0), "PNG"), plan)


def test_to_patches_follows_vision_config():
    pixels = torch.randn(3, 56, 84)
    patches = to_patches(pixels, VisionConfig())
    assert patches.grid_thw == (1, 4, 6)
    assert patches.pixel_values.shape == (24, 3 * 2 * 14 * 14)
    with pytest.raises(ValueError, match="model.vision.in_channels = 4"):
        to_patches(pixels, VisionConfig(in_channels=4))


# -- DALI agrees with Pillow ------------------------------------------------

AGREEMENT_CASES = {
    "jpeg-rgb-down": (drawing(600, 800, 10), "JPEG", single(224, 308)),
    "jpeg-rgb-up": (drawing(150, 200, 11), "JPEG", single(392, 532)),
    "jpeg-grey": (drawing(300, 240, 12).convert("L"), "JPEG", single(252, 196)),
    "png-rgb-down": (drawing(500, 700, 13), "PNG", single(140, 196)),
    "png-rgb-up": (drawing(60, 90, 14), "PNG", single(112, 168)),
    "png-grey": (drawing(200, 300, 15).convert("L"), "PNG", single(168, 252)),
    "png-palette": (drawing(200, 300, 16).convert("P", palette=Image.Palette.ADAPTIVE), "PNG", single(224, 336)),
    "png-near-identity": (drawing(120, 90, 18), "PNG", single(112, 84)),
    "jpeg-tiles-thumbnail": (drawing(500, 700, 19), "JPEG", tiled((336, 448), (448, 448), 224, (224, 224))),
}


@pytest.mark.parametrize("case", list(AGREEMENT_CASES))
def test_dali_cpu_agrees_with_pillow(case, dali):
    image, fmt, plan = AGREEMENT_CASES[case]
    data = encode(image, fmt)
    expected = PillowBackend().render(data, plan)
    got = dali.render(data, plan)
    assert [tag for tag, _ in got] == [tag for tag, _ in expected]
    for (tag, a), (_, b) in zip(got, expected):
        assert a.shape == b.shape and a.dtype == torch.float32, tag
        diff = levels(a, b)
        assert diff.mean() <= DALI_MEAN_LEVELS and diff.max() <= DALI_MAX_LEVELS, (
            f"{case} {tag}: mean {diff.mean():.3f}, max {diff.max():.1f} levels"
        )


# -- images DaliBackend hands to Pillow -------------------------------------
# Not DALI-agreement cases: DALI does not reproduce Pillow's colour handling of these
# (alpha is composited on white; 16-bit grey is Pillow's mode I;16), so DaliBackend
# must render them with its Pillow back end, pixel for pixel.


def encode_png(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def grey_16_bit(height: int, width: int) -> Image.Image:
    ramp = np.linspace(0, 65535, height * width).reshape(height, width).astype(np.uint16)
    return Image.fromarray(ramp)


PILLOW_ROUTED_CASES = {
    "png-rgba": (encode_png(with_alpha(drawing(200, 300, 17))), single(168, 252)),
    "png-grey-alpha": (encode_png(with_alpha(drawing(120, 160, 20)).convert("LA")), single(112, 168)),
    "png-palette-transparent": (
        encode_png(drawing(120, 160, 21).convert("P", palette=Image.Palette.ADAPTIVE), transparency=0),
        single(112, 168),
    ),
    "png-grey-16-bit": (encode_png(grey_16_bit(90, 120)), single(84, 112)),
}


@pytest.fixture
def routes(dali, monkeypatch):
    """Which batch indices a DaliBackend renders with Pillow and which with its DALI pipelines."""
    seen = {"pillow": [], "dali": []}
    to_pillow, to_dali = dali._render_with_pillow, dali._run

    def pillow(index, data, plan):
        seen["pillow"].append(index)
        return to_pillow(index, data, plan)

    def pipeline(items, chunk, with_thumbnail):
        seen["dali"].extend(chunk)
        return to_dali(items, chunk, with_thumbnail)

    monkeypatch.setattr(dali, "_render_with_pillow", pillow)
    monkeypatch.setattr(dali, "_run", pipeline)
    return seen


@pytest.mark.parametrize("case", list(PILLOW_ROUTED_CASES))
def test_dali_backend_renders_transparent_and_16_bit_images_with_pillow(case, dali, routes):
    data, plan = PILLOW_ROUTED_CASES[case]
    control = encode(drawing(120, 160, 22), "PNG")  # an opaque 8-bit PNG: DALI's own
    got = dali.render_batch([(control, plan), (data, plan)])
    assert routes == {"pillow": [1], "dali": [0]}
    # The very pixels of the Pillow back end, not merely close ones.
    [expected] = PillowBackend().render_batch([(data, plan)])
    assert [tag for tag, _ in got[1]] == [tag for tag, _ in expected]
    for (_, a), (_, b) in zip(got[1], expected):
        assert torch.equal(a, b), case


def test_transparent_pixels_render_white_through_the_dali_backend(dali):
    # Fully transparent black: DALI would decode it black, Pillow composites it on white.
    image = Image.new("RGBA", (56, 56), (0, 0, 0, 0))
    [(_, pixels)] = dali.render(encode_png(image), single(56, 56))
    [(_, white)] = PillowBackend().render(encode_png(Image.new("RGB", (56, 56), (255, 255, 255))), single(56, 56))
    assert torch.equal(pixels, white)


def test_dali_batch_keeps_order_across_pipelines(dali):
    # Plain, thumbnail and Pillow-routed (alpha, 16-bit) images interleaved, more than one pipeline batch.
    agreeing = [(encode(image, fmt), plan) for image, fmt, plan in AGREEMENT_CASES.values()]
    routed = list(PILLOW_ROUTED_CASES.values())
    items = (agreeing[:4] + routed[:2] + agreeing[4:] + routed[2:]) * 2
    got = dali.render_batch(items)
    expected = PillowBackend().render_batch(items)
    assert len(got) == len(items)
    for parts, reference, item in zip(got, expected, items):
        assert [t for t, _ in parts] == [t for t, _ in reference]
        for (_, a), (_, b) in zip(parts, reference):
            assert a.shape == b.shape and levels(a, b).mean() <= DALI_MEAN_LEVELS
            if item in routed:
                assert torch.equal(a, b)


def test_missing_dali_skips_or_fails_as_the_environment_asks(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import nvidia.dali raises ImportError
    monkeypatch.delenv(REQUIRE_DALI, raising=False)
    with pytest.raises(pytest.skip.Exception, match="NVIDIA DALI is not installed"):
        import_dali_or_skip()
    monkeypatch.setenv(REQUIRE_DALI, "0")
    with pytest.raises(pytest.skip.Exception):
        import_dali_or_skip()
    monkeypatch.setenv(REQUIRE_DALI, "1")
    with pytest.raises(pytest.fail.Exception, match=r"MEGAVL_REQUIRE_DALI=1 but NVIDIA DALI cannot be imported"):
        import_dali_or_skip()


# -- bad bytes --------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares a size and holds no pixels: a bomb's header, cheaply."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_peek_size_reads_the_header_and_refuses_bad_bytes():
    assert peek_size(encode(drawing(33, 57, 0), "PNG")) == (33, 57)
    assert peek_size(png_header(10_000, 3)) == (3, 10_000)
    with pytest.raises(ImageDecodeError, match="unreadable image"):
        peek_size(b"not an image at all")
    with pytest.raises(ImageDecodeError, match="decompression bomb.*10000x10000"):
        peek_size(png_header(10_000, 10_000))
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        peek_size(png_header(100_000, 100_000))  # above Pillow's own limit too
    with pytest.raises(ImageDecodeError, match="decompression bomb.*max_image_pixels = 1000"):
        peek_size(encode(drawing(40, 40, 0), "PNG"), max_image_pixels=1000)


@pytest.mark.parametrize("backend", ["pillow", "dali"], indirect=True)
def test_bad_images_fail_with_their_index(backend):
    good = encode(drawing(60, 80, 0), "JPEG")
    truncated = good[: len(good) // 2]
    plan = single(56, 84)
    with pytest.raises(ImageDecodeError, match="corrupt"):
        backend.render(truncated, plan)
    with pytest.raises(ImageDecodeError, match="unreadable"):
        backend.render(b"\x00" * 100, plan)
    for bad, index in [(truncated, 2), (b"garbage", 1), (png_header(9000, 9000), 0)]:
        items = [(good, plan)] * 3
        items[index] = (bad, plan)
        with pytest.raises(ImageBatchError) as error:
            backend.render_batch(items)
        assert error.value.index == index and f"image {index} of the batch" in str(error.value)
    # A failure leaves the back end usable.
    assert len(backend.render_batch([(good, plan)] * 3)) == 3


def test_render_refuses_images_above_the_back_ends_limit():
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        PillowBackend(max_image_pixels=1000).render(encode(drawing(40, 40, 0), "PNG"), single(28, 28))


# -- choosing a back end ----------------------------------------------------


@pytest.fixture
def fresh_selection(monkeypatch):
    monkeypatch.setattr(image_backends, "_SELECTED", {})


def test_select_backend_names(fresh_selection):
    pillow = select_backend("pillow", torch.device("cpu"))
    assert isinstance(pillow, PillowBackend)
    assert select_backend("pillow", torch.device("cpu")) is pillow
    with pytest.raises(ValueError, match=r"data.image_backend = 'opencv'.*auto, dali, pillow"):
        select_backend("opencv")


def test_select_backend_without_dali(fresh_selection, monkeypatch, caplog):
    def missing():
        raise ModuleNotFoundError("No module named 'nvidia.dali'")

    monkeypatch.setattr(image_backends, "_import_dali", missing)
    with pytest.raises(ImportError, match=r"data.image_backend = 'dali'.*pip install 'megavl\[dali\]'"):
        select_backend("dali", torch.device("cpu"))
    with caplog.at_level(logging.INFO, logger="megavl.data.image_backends"):
        assert isinstance(select_backend("auto", torch.device("cpu")), PillowBackend)
    assert "DALI is not installed" in caplog.text


def test_select_dali_on_cpu(fresh_selection, dali):
    backend = select_backend("dali", torch.device("cpu"))
    assert isinstance(backend, DaliBackend) and backend.name == "dali-cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_dali_gpu_needs_cuda(dali):
    with pytest.raises(RuntimeError, match="needs CUDA"):
        DaliBackend("gpu")


def test_auto_measures_and_logs(fresh_selection, dali, caplog):
    with caplog.at_level(logging.INFO, logger="megavl.data.image_backends"):
        chosen = select_backend("auto", torch.device("cpu"))
    assert chosen.name in ("pillow", "dali-cpu")
    assert select_backend("auto", torch.device("cpu")) is chosen  # measured once per process
    message = next(r.getMessage() for r in caplog.records if "ms/image" in r.getMessage())
    assert "pillow" in message and "dali-cpu" in message and message.endswith(f"using {chosen.name}")


def test_sample_jpeg_and_native_plan():
    data = sample_jpeg(300, 500, seed=3)
    assert peek_size(data) == (300, 500) and data == sample_jpeg(300, 500, seed=3)
    plan = native_plan(300, 500)
    assert plan.resize_to == smart_resize(300, 500) and plan.canvas == plan.resize_to


def test_a_run_resolves_auto_once_and_a_resumed_run_keeps_its_choice():
    from megavl.data.image_backends import resolve_image_backend

    assert resolve_image_backend("pillow") == "pillow"
    assert resolve_image_backend("dali", previous="pillow") == "dali"  # an explicit choice wins
    assert resolve_image_backend("auto", previous="dali") == "dali"
    assert resolve_image_backend("auto", previous="pillow") == "pillow"
    assert resolve_image_backend("auto") in ("pillow", "dali")


# -- each tower's pixel statistics ------------------------------------------


@pytest.mark.parametrize(
    "overrides, mean, std",
    [
        ([], (0.5,) * 3, (0.5,) * 3),  # SigLIP's own: [0, 1] -> [-1, 1]
        (["model.vision.image_mean=[0.2,0.3,0.4]", "model.vision.image_std=[0.1,0.2,0.25]"],
         (0.2, 0.3, 0.4), (0.1, 0.2, 0.25)),
    ],
    ids=["siglip-kind", "explicit"],
)
def test_records_are_normalised_with_the_towers_statistics(overrides, mean, std):
    """A padded fixed-size image renders, through the record decoder, as (x / 255 - mean) / std of the
    tower, with padding at exactly 0 (the mean colour), and equals image_to_model_input's pixels."""
    from megavl.config import load_config
    from megavl.data.records import RecordDecoder

    from conftest import ROOT, tiny_tokenizer

    config = load_config(str(ROOT / "examples" / "configs" / "tiny_siglip_cpu.yaml"), overrides)
    colour = (200, 30, 90)
    data = encode(Image.new("RGB", (84, 42), colour), "PNG")  # wide: fixed_fit pads the bottom half
    decoder = RecordDecoder(tiny_tokenizer(["a picture"]), config, 0, PillowBackend())
    record = {"conversations": [{"role": "user", "content": "<image>what?"}, {"role": "assistant", "content": "a"}]}
    planned = decoder.plan("k", {"json": json.dumps(record).encode(), "img0.png": data})
    [(_, plan)] = planned.images
    assert (plan.mean, plan.std) == (mean, std)
    [sample] = decoder.render([planned])
    [(tag, pixels)] = PillowBackend().render(data, plan)
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(colour, mean, std)])
    assert torch.allclose(pixels[:, :42], expected.view(3, 1, 1).expand(3, 42, 84), atol=1e-6)
    assert torch.equal(pixels[:, 42:], torch.zeros(3, 42, 84))
    assert torch.equal(sample.images[0].pixel_values, to_patches(pixels, config.model.vision).pixel_values)
    # The converters' and generation's path gives the same pixels for an image of the planned size.
    resized = image_to_model_input(Image.new("RGB", (84, 84), colour), config).pixel_values
    assert torch.allclose(resized.view(-1, 3, 14 * 14)[:, :, 0], expected.expand(resized.shape[0], 3), atol=1e-6)


def test_pixel_statistics_are_checked():
    from megavl.config import ConfigError, load_config, validate

    from conftest import ROOT

    for overrides, message in ((["model.vision.image_mean=[0.5,0.5]"], r"model.vision.image_mean = \[0.5, 0.5\]: "
                                "give one value per channel"),
                               (["model.vision.image_std=[0.5,0,0.5]"], r"model.vision.image_std .* must be > 0")):
        with pytest.raises(ConfigError, match=message):
            validate(load_config(str(ROOT / "examples" / "configs" / "tiny_siglip_cpu.yaml"), overrides), world_size=1)

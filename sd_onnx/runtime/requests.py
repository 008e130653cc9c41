"""What a generation asks for (txt2img, hires fix, img2img), checked once against A1111's ranges and our limits."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from sd_onnx.errors import UsageError

MAX_SEED = 2**32 - 1  # the range a random seed is drawn from, as in A1111
SEED_LIMIT = 2**64  # what a given seed may be: torch's generators take 64 bits (the CPU one uses the low 32)
# A1111's UI bounds: sides up to 2048 px (ui-config.json raises them; here SD_ONNX_MAX_SIZE), at most 8 images a
# batch and 100 batches. Past them a CPU run takes days and cannot be stopped between steps.
DEFAULT_MAX_SIZE = 2048
MAX_BATCH_SIZE = 8
MAX_BATCH_COUNT = 100
MIN_SIZE = 64
RESIZE_MODES = {0: "Just resize", 1: "Crop and resize", 2: "Resize and fill", 3: "Just resize (latent upscale)"}


def max_size() -> int:
    raw = os.environ.get("SD_ONNX_MAX_SIZE", "")
    try:
        return int(raw) if raw else DEFAULT_MAX_SIZE
    except ValueError:
        raise UsageError(f"SD_ONNX_MAX_SIZE must be a whole number of pixels, got {raw!r}") from None


def check_side(name: str, value: object) -> None:
    limit = max_size()
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_SIZE or value % 8:
        raise UsageError(f"{name} must be a multiple of 8 and at least {MIN_SIZE}, got {value}")
    if value > limit:
        raise UsageError(f"{name} {value} is over the limit of {limit} px (set SD_ONNX_MAX_SIZE to raise it)")


def check_text(name: str, text: object) -> None:
    if not isinstance(text, str):
        raise UsageError(f"{name} must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # undecodable bytes on the command line arrive as lone surrogates
        raise UsageError(f"the {name} is not valid UTF-8 text (undecodable byte at character {e.start})") from None


@dataclass
class GenerateRequest:
    """txt2img, with A1111's "Hires. fix" when enable_hr is set."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "Euler a"
    seed: int = -1
    width: int = 512
    height: int = 512
    batch_size: int = 1
    batch_count: int = 1
    randn_source: str = "cpu"
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = 0
    denoising_strength: float = 0.7

    def validate(self) -> None:
        from sd_onnx.runtime.samplers import SAMPLER_NAMES

        check_text("prompt", self.prompt)
        check_text("negative prompt", self.negative_prompt)
        check_side("width", self.width)
        check_side("height", self.height)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise UsageError(f"steps must be at least 1, got {self.steps}")
        if self.sampler not in SAMPLER_NAMES:
            raise UsageError(f"unknown sampler '{self.sampler}'; valid names: {', '.join(SAMPLER_NAMES)}")
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise UsageError(f"batch size must be between 1 and {MAX_BATCH_SIZE}, got {self.batch_size}")
        if not 1 <= self.batch_count <= MAX_BATCH_COUNT:
            raise UsageError(f"batch count must be between 1 and {MAX_BATCH_COUNT}, got {self.batch_count}")
        if not 0 <= self.cfg_scale <= 100:
            raise UsageError(f"CFG scale must be between 0 and 100, got {self.cfg_scale}")
        last = self.seed + self.batch_size * self.batch_count - 1
        if self.seed != -1 and not (0 <= self.seed and last < SEED_LIMIT):
            raise UsageError(f"seed must be -1 (random) or between 0 and 2**64 - 1 for every image, got {self.seed}")
        if self.randn_source not in ("cpu", "gpu"):
            raise UsageError(f"noise source must be 'cpu' or 'gpu', got '{self.randn_source}'")
        if self.uses_strength and not 0 <= self.denoising_strength <= 1:
            raise UsageError(f"denoising strength must be between 0 and 1, got {self.denoising_strength}")
        if self.enable_hr:
            self._validate_hires()

    @property
    def uses_strength(self) -> bool:
        return self.enable_hr

    def _validate_hires(self) -> None:
        from sd_onnx.runtime.upscale import upscaler_names

        names = upscaler_names()  # the built-in ones and the models installed under $SD_ONNX_HOME/upscalers
        if self.hr_upscaler not in names:
            raise UsageError(f"unknown hires upscaler '{self.hr_upscaler}'; valid: {', '.join(names)}")
        if self.hr_second_pass_steps < 0:
            raise UsageError(f"hires steps must be 0 (same as steps) or more, got {self.hr_second_pass_steps}")
        if self.hr_resize_x < 0 or self.hr_resize_y < 0 or not 1 <= self.hr_scale <= 8:
            raise UsageError("hires scale must be between 1 and 8, and hires resize sizes 0 or more")
        w, h = self.hr_size
        check_side("hires width", w)
        check_side("hires height", h)

    @property
    def hr_upscale_to(self) -> tuple[int, int]:
        """A1111's hr_upscale_to_x/y: the second pass's size before truncation to the resize box."""
        if self.hr_resize_x == 0 and self.hr_resize_y == 0:
            return int(self.width * self.hr_scale), int(self.height * self.hr_scale)
        if self.hr_resize_y == 0:
            return self.hr_resize_x, self.hr_resize_x * self.height // self.width
        if self.hr_resize_x == 0:
            return self.hr_resize_y * self.width // self.height, self.hr_resize_y
        if self.width / self.height < self.hr_resize_x / self.hr_resize_y:
            return self.hr_resize_x, self.hr_resize_x * self.height // self.width
        return self.hr_resize_y * self.width // self.height, self.hr_resize_y

    @property
    def hr_size(self) -> tuple[int, int]:
        """The hires image's size: the upscaled size cut to the resize box when both sides are given, in whole
        latent pixels (A1111 truncates the latent the same way; a side that is not a multiple of 8 is rounded
        down, where A1111 would hand the VAE a size it rounds itself)."""
        w, h = self.hr_upscale_to
        if self.hr_resize_x and self.hr_resize_y:
            w, h = min(w, self.hr_resize_x), min(h, self.hr_resize_y)
        return w // 8 * 8, h // 8 * 8

    @property
    def hr_steps(self) -> int:
        return self.hr_second_pass_steps or self.steps


@dataclass
class Img2ImgRequest(GenerateRequest):
    """img2img: `init_image` (a path or a PIL image) is resized by `resize_mode`, encoded and partly re-noised."""

    width: int = 0  # 0: the init image's, rounded to a multiple of 8
    height: int = 0
    init_image: Path | str | Image.Image | None = None
    resize_mode: int = 0
    denoising_strength: float = 0.75
    # inpainting (A1111's img2img "Inpaint" tab): white in the mask is repainted
    mask: Path | str | Image.Image | None = None
    mask_blur: int = 4
    inpainting_fill: int = 1  # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: bool = False  # "Only masked"
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: bool = False
    inpainting_mask_weight: float = 1.0  # inpainting (9-channel) models only

    @property
    def uses_strength(self) -> bool:
        return True

    def validate(self) -> None:
        """Also opens the init image (one line if it is missing or not an image) and takes a width or height of 0
        from it, rounded to the nearest multiple of 8."""
        from sd_onnx.runtime.images import open_image

        if self.enable_hr:
            raise UsageError("hires fix is a txt2img option; img2img takes the size it should make directly")
        if self.init_image is None:
            raise UsageError("img2img needs an init image")
        if not isinstance(self.init_image, Image.Image):
            self.init_image = open_image(Path(self.init_image))
        if self.mask is not None:
            self._validate_mask(open_image)
        if not self.width:
            self.width = max(MIN_SIZE, round(self.init_image.width / 8) * 8)
        if not self.height:
            self.height = max(MIN_SIZE, round(self.init_image.height / 8) * 8)
        if self.resize_mode not in RESIZE_MODES:
            raise UsageError(f"resize mode must be one of {', '.join(f'{k} ({v})' for k, v in RESIZE_MODES.items())}, "
                             f"got {self.resize_mode}")
        super().validate()

    def _validate_mask(self, open_image) -> None:
        from sd_onnx.runtime.masks import binary_mask

        if not isinstance(self.mask, Image.Image):
            self.mask = open_image(Path(self.mask), keep_alpha=True)
        if self.resize_mode == 3:
            raise UsageError("resize mode 3 (latent upscale) cannot take a mask; use 0, 1 or 2")
        if not 0 <= self.mask_blur <= 64:
            raise UsageError(f"mask blur must be between 0 and 64, got {self.mask_blur}")
        if self.inpainting_fill not in (0, 1, 2, 3):
            raise UsageError(f"inpainting fill must be 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing), "
                             f"got {self.inpainting_fill}")
        if not 0 <= self.inpaint_full_res_padding <= 256:
            raise UsageError(f"only-masked padding must be between 0 and 256 px, got {self.inpaint_full_res_padding}")
        if not 0 <= self.inpainting_mask_weight <= 1:
            raise UsageError(f"inpainting mask weight must be between 0 and 1, got {self.inpainting_mask_weight}")
        image_ratio = self.init_image.width / self.init_image.height
        mask_ratio = self.mask.width / self.mask.height
        if abs(image_ratio / mask_ratio - 1) > 0.05:  # A1111 would stretch one onto the other
            raise UsageError(f"the mask ({self.mask.width}x{self.mask.height}) and the image ({self.init_image.width}x"
                             f"{self.init_image.height}) have different shapes; make the mask from the image")
        binary = binary_mask(self.mask)
        if self.inpainting_mask_invert:
            binary = binary.point(lambda v: 255 - v)
        if not binary.getbbox():
            raise UsageError("the mask is empty (nothing white to repaint): nothing to do; use img2img without --mask "
                             "to change the whole picture")

"""A1111's parameters text, both ways: real A1111 texts, round trips of nasty values, request fields.

The A1111 texts below are written in the exact layout of AUTOMATIC1111/stable-diffusion-webui's
`create_infotext` (modules/processing.py): prompt, "Negative prompt: ..." when there is one, and the
settings joined with ", ", values through `quote()` (modules/infotext_utils.py).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sd_onnx.errors import UsageError
from sd_onnx.runtime.infotext import SAMPLER_NAMES, format_infotext, parse_infotext, request_fields

# (text, prompt, negative prompt, settings)
A1111_TEXTS = [
    pytest.param(  # the example in parse_generation_parameters' docstring (A1111 before 1.9: no Schedule type)
        "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, "
        "by Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate\n"
        "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, "
        "poorly drawn face, mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b",
        "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, "
        "by Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate",
        "ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly drawn face, mutation, "
        "mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing",
        {"Steps": "20", "Sampler": "Euler a", "CFG scale": "7", "Seed": "965400086", "Size": "512x512",
         "Model hash": "45dee52b"},
        id="docstring-example"),
    pytest.param(  # txt2img, 1.10: Schedule type apart from the sampler, TI hashes quoted, Version
        "masterpiece, best quality, 1girl, (blue eyes:1.2), looking at viewer, <lora:add_detail:0.5>\n"
        "Negative prompt: (worst quality, low quality:1.4), EasyNegative\n"
        "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3052374216, Size: 512x768, "
        "Model hash: 7f96a1a9ca, Model: anything-v5, Lora hashes: \"add_detail: 7c6bad76eb54\", "
        "TI hashes: \"EasyNegative: c74b4e810b03\", Version: v1.10.1",
        "masterpiece, best quality, 1girl, (blue eyes:1.2), looking at viewer, <lora:add_detail:0.5>",
        "(worst quality, low quality:1.4), EasyNegative",
        {"Steps": "25", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7", "Seed": "3052374216",
         "Size": "512x768", "Model hash": "7f96a1a9ca", "Model": "anything-v5",
         "Lora hashes": "add_detail: 7c6bad76eb54", "TI hashes": "EasyNegative: c74b4e810b03",
         "Version": "v1.10.1"},
        id="txt2img-1.10"),
    pytest.param(  # hires fix, two Loras in one quoted value, no negative prompt
        "a photo of a cat, (sitting on a windowsill:1.1), sunlight, <lora:a:1> <lora:b:0.3>\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1234, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.7, Hires upscale: 2, "
        "Hires steps: 10, Hires upscaler: Latent, "
        "Lora hashes: \"a: 7c6bad76eb54, b: d1131f7207d6\", Version: v1.10.1",
        "a photo of a cat, (sitting on a windowsill:1.1), sunlight, <lora:a:1> <lora:b:0.3>",
        "",
        {"Steps": "20", "Sampler": "Euler a", "Schedule type": "Automatic", "CFG scale": "7", "Seed": "1234",
         "Size": "512x512", "Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly", "Denoising strength": "0.7",
         "Hires upscale": "2", "Hires steps": "10", "Hires upscaler": "Latent",
         "Lora hashes": "a: 7c6bad76eb54, b: d1131f7207d6", "Version": "v1.10.1"},
        id="hires-fix"),
    pytest.param(  # img2img: Denoising strength, Mask blur, a float CFG scale
        "oil painting of a harbour at dusk\n"
        "Negative prompt: lowres\n"
        "Steps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 768x512, Model hash: 6ce0161689, "
        "Model: v1-5-pruned-emaonly, Denoising strength: 0.55, Mask blur: 4, Version: v1.6.0",
        "oil painting of a harbour at dusk",
        "lowres",
        {"Steps": "30", "Sampler": "Euler a", "CFG scale": "7.5", "Seed": "42", "Size": "768x512",
         "Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly", "Denoising strength": "0.55", "Mask blur": "4",
         "Version": "v1.6.0"},
        id="img2img"),
    pytest.param(  # multi-line prompt (BREAK), a negative prompt over two lines, CPU noise, a batch
        "a castle on a hill\nBREAK\nstormy sky, (lightning:1.3)\n"
        "Negative prompt: blurry,\nwatermark, text\n"
        "Steps: 28, Sampler: DPM++ SDE, Schedule type: Karras, CFG scale: 6.5, Seed: 7, Size: 640x640, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Batch size: 4, Batch pos: 2, RNG: CPU, Version: v1.9.4",
        "a castle on a hill\nBREAK\nstormy sky, (lightning:1.3)",
        "blurry,\nwatermark, text",
        {"Steps": "28", "Sampler": "DPM++ SDE", "Schedule type": "Karras", "CFG scale": "6.5", "Seed": "7",
         "Size": "640x640", "Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly", "Batch size": "4",
         "Batch pos": "2", "RNG": "CPU", "Version": "v1.9.4"},
        id="multi-line"),
    pytest.param(  # quotes and a colon-less quoted phrase in the prompt; a model name A1111 quoted
        "a neon sign that says \"OPEN 24/7\", rain, 'film grain', [[subtle]]\n"
        "Steps: 20, Sampler: DDIM, Schedule type: Automatic, CFG scale: 7, Seed: 99, Size: 512x512, "
        "Model hash: 6ce0161689, Model: \"my, model: v2\", Version: v1.10.1",
        "a neon sign that says \"OPEN 24/7\", rain, 'film grain', [[subtle]]",
        "",
        {"Steps": "20", "Sampler": "DDIM", "Schedule type": "Automatic", "CFG scale": "7", "Seed": "99",
         "Size": "512x512", "Model hash": "6ce0161689", "Model": "my, model: v2", "Version": "v1.10.1"},
        id="quotes"),
    pytest.param(  # hires fix by target size instead of scale
        "portrait\n"
        "Steps: 20, Sampler: Euler, Schedule type: Automatic, CFG scale: 5, Seed: 5, Size: 512x512, "
        "Denoising strength: 0.45, Hires resize: 1024x1536, Hires steps: 15, Hires upscaler: R-ESRGAN 4x+",
        "portrait",
        "",
        {"Steps": "20", "Sampler": "Euler", "Schedule type": "Automatic", "CFG scale": "5", "Seed": "5",
         "Size": "512x512", "Denoising strength": "0.45", "Hires resize": "1024x1536", "Hires steps": "15",
         "Hires upscaler": "R-ESRGAN 4x+"},
        id="hires-resize"),
]


@pytest.mark.parametrize(("text", "prompt", "negative", "settings"), A1111_TEXTS)
def test_reads_a1111_texts(text, prompt, negative, settings):
    got = parse_infotext(text)
    assert got == (prompt, negative, settings)
    assert list(got[2]) == list(settings)  # in A1111's order


@pytest.mark.parametrize(("text", "prompt", "negative", "settings"), A1111_TEXTS)
def test_writes_what_a1111_writes(text, prompt, negative, settings):
    # Same fields and values in, same bytes out: quoting and layout match create_infotext's.
    assert format_infotext(prompt, negative, settings) == text


def _a1111_parse(text: str) -> tuple[str, str, dict[str, str]]:
    """What A1111's parse_generation_parameters makes of a text, its prompt and settings steps only
    (modules/infotext_utils.py), restated here to check what A1111 reads from our files."""
    pair = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
    *lines, last = text.strip().split("\n")
    if len(pair.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = "", "", False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[16:].strip()
        if in_negative:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    settings = {}
    for k, v in pair.findall(last):
        if v and v[0] == v[-1] == '"':
            try:
                v = json.loads(v)
            except ValueError:
                pass
        if v:
            settings[k] = v
    return prompt, negative, settings


@pytest.mark.parametrize(("text", "prompt", "negative", "settings"), A1111_TEXTS)
def test_the_restated_a1111_parser_agrees_on_a1111_texts(text, prompt, negative, settings):
    # Guards the restatement above: without this, the A1111-compatibility checks below could pass vacuously.
    assert _a1111_parse(text) == (prompt, negative, settings)


SETTINGS = {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7.0, "Seed": 1, "Size": "512x512"}


def test_cfg_scale_is_written_unrounded():
    text = format_infotext("p", "", {**SETTINGS, "CFG scale": 7.1234567})
    assert "CFG scale: 7.1234567," in text
    assert request_fields(parse_infotext(text)[2])["cfg_scale"] == 7.1234567


@pytest.mark.parametrize(("value", "written"), [(7.0, "7"), (7.5, "7.5"), (0.1 + 0.2, "0.30000000000000004"),
                                                 (1e-07, "1e-07"), (12345678.9, "12345678.9"), (2.0, "2"),
                                                 (1e300, "1e+300"), (-0.5, "-0.5")])
def test_floats_are_written_as_a1111_ui_writes_them(value, written):
    # A whole number as an int (what A1111 writes for gradio's ints), any other float exactly (repr).
    text = format_infotext("p", "", {**SETTINGS, "Denoising strength": value})
    assert parse_infotext(text)[2]["Denoising strength"] == written
    assert float(written) == value


@pytest.mark.parametrize("model", ['my, model', 'v1: final', 'two\nlines', 'say "hi", ok', '"quoted"',
                                   'back\\slash: "x"', ' padded ', 'ünïcødé, 模型', 'tab\tand\rcr', '"', 'a"b'])
def test_values_with_separators_round_trip(model):
    text = format_infotext("p", "n", {**SETTINGS, "Model": model, "Version": "v1"})
    assert len(text.split("\n")) == 3  # the settings stay on one line
    prompt, negative, settings = parse_infotext(text)
    assert (prompt, negative, settings["Model"], settings["Version"]) == ("p", "n", model, "v1")
    assert _a1111_parse(text)[2]["Model"] == model  # A1111 reads the same value


def test_values_are_quoted_exactly_as_a1111_quotes():
    text = format_infotext("p", "", {**SETTINGS, "Model": "my, model", "Lora hashes": "a: 1, b: 2",
                                     "VAE": "a\"b", "Note": "naïve, ok"})
    last = text.split("\n")[-1]
    assert last.endswith(', Model: "my, model", Lora hashes: "a: 1, b: 2", VAE: a"b, Note: "naïve, ok"')


def test_a_prompt_line_starting_negative_prompt_round_trips():
    prompt = "a poster\nNegative prompt: the title of the poster"
    text = format_infotext(prompt, "blurry", SETTINGS)
    assert text.startswith("a poster\n\\Negative prompt: the title of the poster\nNegative prompt: blurry\n")
    assert parse_infotext(text)[:2] == (prompt, "blurry")
    # A1111 reads the protected line as prompt text (with its backslash), not as the negative prompt.
    assert _a1111_parse(text)[:2] == ("a poster\n\\Negative prompt: the title of the poster", "blurry")


@pytest.mark.parametrize("prompt", ["Negative prompt: x", "  Negative prompt:", "\\Negative prompt: x",
                                    "a\n\\\\Negative prompt:\n b", "\t\\Negative prompt:y"])
@pytest.mark.parametrize("negative", ["", "n", "n\nNegative prompt: m", "Negative prompt: m", "a\n \\Negative prompt:"])
def test_protected_lines_round_trip(prompt, negative):
    assert parse_infotext(format_infotext(prompt, negative, SETTINGS)) == (prompt, negative, _strings(SETTINGS))


def test_ordinary_prompts_are_written_unchanged():
    prompt = "a (cat:1.2), \\(not emphasis\\), negative prompt: lower case\nsecond line"
    text = format_infotext(prompt, "x", SETTINGS)
    assert text.startswith(prompt + "\nNegative prompt: x\n")
    assert _a1111_parse(text)[:2] == (prompt, "x")


def test_last_line_is_settings_only_with_three_pairs():
    assert parse_infotext("a cat\nSteps: 20, Seed: 1") == ("a cat\nSteps: 20, Seed: 1", "", {})
    assert parse_infotext("a cat\nSteps: 20, Seed: 1, Size: 8x8") == ("a cat", "", {"Steps": "20", "Seed": "1",
                                                                                     "Size": "8x8"})
    assert parse_infotext("Steps: 20, Seed: 1, Size: 8x8") == ("", "", {"Steps": "20", "Seed": "1", "Size": "8x8"})


def test_parse_details_follow_a1111():
    text = "p\nSteps: 20, VAE: , Seed: 1, Seed: 2, Size: 512x768, Model: \"not json\\\"\n"
    # an empty value is dropped, a later key wins, a quoted value that is not JSON stays as written,
    # whitespace after the settings line is ignored, and Size stays one string
    assert parse_infotext(text) == ("p", "", {"Steps": "20", "Seed": "2", "Size": "512x768",
                                              "Model": "\"not json\\\""})


def test_empty_values_and_none_are_left_out():
    text = format_infotext("p", "", {"Steps": 20, "Model hash": "", "Model": None, "Seed": 3, "Size": "8x8"})
    assert text == "p\nSteps: 20, Seed: 3, Size: 8x8"


def test_bad_field_names_are_refused():
    with pytest.raises(ValueError, match="field name"):
        format_infotext("p", "", {**SETTINGS, "Bad:key": 1})


def _strings(settings: dict[str, object]) -> dict[str, str]:
    return {k: (str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)) for k, v in settings.items()}


_PIECES = ["cat", " ", "  ", ",", ", ", ":", ": ", "\"", "'", "\\", "\n", "\n\n", "(", ")", "[", "]", "(word:1.2)",
           "Negative prompt:", "Negative prompt: ", "\\Negative prompt:", "Steps: 20, Seed: 1, Size: 8x8", "\t",
           "é", "模型", "\r", "{}", "<lora:x:0.5>", "BREAK", "=", "\u2028"]


def _nasty(rng: random.Random, max_pieces: int = 8) -> str:
    return "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, max_pieces)))


def test_round_trip_property():
    rng = random.Random(1234)
    for _ in range(3000):
        prompt, negative = _nasty(rng), _nasty(rng)
        cfg = rng.choice([7.0, rng.uniform(0, 30), round(rng.uniform(0, 30), rng.randint(0, 4))])
        settings = {"Steps": rng.randint(1, 150), "Sampler": rng.choice(SAMPLER_NAMES), "CFG scale": cfg,
                    "Seed": rng.randint(0, 2**32 - 1), "Size": f"{rng.randrange(64, 2048, 8)}x512",
                    "Model hash": "6ce0161689", "Model": _nasty(rng, 4) or "m", "Version": "sd-onnx 0.1.0"}
        text = format_infotext(prompt, negative, settings)
        got_prompt, got_negative, got = parse_infotext(text)
        assert (got_prompt, got_negative) == (prompt, negative), text
        assert list(got) == list(settings)
        assert {k: v for k, v in got.items() if k != "CFG scale"} == {
            k: v for k, v in _strings(settings).items() if k != "CFG scale"}
        assert float(got["CFG scale"]) == cfg
        fields = request_fields(got)
        assert (fields["steps"], fields["cfg_scale"], fields["seed"], fields["model"]) == (
            settings["Steps"], cfg, settings["Seed"], settings["Model"])


def test_round_trip_matches_a1111_for_ordinary_prompts():
    # Prompts without a line that starts with "Negative prompt:" and without edge whitespace on lines:
    # A1111's reader gets back exactly what we wrote, as ours does.
    rng = random.Random(99)
    pieces = [p for p in _PIECES if "Negative" not in p and p.strip() and p not in ("\r", "\u2028")]
    checked = 0
    for _ in range(1000):
        prompt, negative = ("".join(rng.choice(pieces + [" "]) for _ in range(rng.randint(1, 8))) for _ in "pn")
        if any(line != line.strip() or not line for line in (prompt + "\n" + negative).split("\n")):
            continue
        text = format_infotext(prompt, negative, {**SETTINGS, "Model": _nasty(rng, 4) or "m"})
        assert _a1111_parse(text) == parse_infotext(text)
        checked += 1
    assert checked > 100


# request_fields

def test_request_fields_txt2img():
    _, _, settings = parse_infotext(A1111_TEXTS[1].values[0])
    assert request_fields(settings) == {
        "steps": 25, "sampler": "DPM++ 2M Karras", "cfg_scale": 7.0, "seed": 3052374216, "width": 512,
        "height": 768, "model": "anything-v5", "model_hash": "7f96a1a9ca", "randn_source": "gpu"}


def test_request_fields_hires_and_img2img():
    hires = request_fields(parse_infotext(A1111_TEXTS[2].values[0])[2])
    assert hires["enable_hr"] is True and hires["hr_scale"] == 2.0 and isinstance(hires["hr_scale"], float)
    assert (hires["hr_second_pass_steps"], hires["hr_upscaler"], hires["denoising_strength"]) == (10, "Latent", 0.7)
    assert hires["sampler"] == "Euler a"
    resize = request_fields(parse_infotext(A1111_TEXTS[6].values[0])[2])
    assert (resize["enable_hr"], resize["hr_resize_x"], resize["hr_resize_y"]) == (True, 1024, 1536)
    assert "hr_scale" not in resize
    img2img = request_fields(parse_infotext(A1111_TEXTS[3].values[0])[2])
    assert (img2img["cfg_scale"], img2img["denoising_strength"], img2img["mask_blur"]) == (7.5, 0.55, 4)
    assert "enable_hr" not in img2img
    batch = request_fields(parse_infotext(A1111_TEXTS[4].values[0])[2])
    assert (batch["batch_size"], batch["randn_source"], batch["sampler"]) == (4, "cpu", "DPM++ SDE Karras")
    assert request_fields({"Resize mode": "2"}) == {"resize_mode": 2, "randn_source": "gpu"}


@pytest.mark.parametrize(("sampler", "schedule", "ours"), [
    ("DPM++ 2M", None, "DPM++ 2M"),  # before A1111 1.9 (and sd-onnx): the name as written
    ("DPM++ 2M Karras", None, "DPM++ 2M Karras"),
    ("DPM++ 2M", "Karras", "DPM++ 2M Karras"),
    ("DPM++ 2M", "karras", "DPM++ 2M Karras"),
    ("DPM++ 2M", "Automatic", "DPM++ 2M Karras"),  # A1111 1.9+: DPM++ 2M's default schedule is Karras
    ("DPM++ 2M", "Uniform", "DPM++ 2M"),
    ("DPM++ SDE", "Karras", "DPM++ SDE Karras"),
    ("DPM++ SDE", "Automatic", "DPM++ SDE Karras"),
    ("DPM++ 2M Karras", "Automatic", "DPM++ 2M Karras"),  # the name's suffix wins
    ("Euler a", "Automatic", "Euler a"),
    ("Euler", "Uniform", "Euler"),
    ("DDIM", "Karras", "DDIM"),  # A1111's timestep samplers take no schedule
    ("UniPC", "Automatic", "UniPC"),
    ("Some New Sampler", None, "Some New Sampler"),  # left for the request's validation to name
])
def test_sampler_and_schedule(sampler, schedule, ours):
    settings = {"Sampler": sampler} | ({"Schedule type": schedule} if schedule else {})
    assert request_fields(settings)["sampler"] == ours


@pytest.mark.parametrize(("sampler", "schedule", "message"), [
    ("Euler a", "Karras", "'Euler a Karras', which sd-onnx does not have"),
    ("DPM2", "Automatic", "'DPM2 Karras', which sd-onnx does not have"),
    ("DPM++ 2M", "Exponential", "'Schedule type': 'Exponential' is not a schedule sd-onnx has"),
    ("DPM++ SDE", "Uniform", "'DPM++ SDE', which sd-onnx does not have"),
])
def test_unsupported_schedules_are_refused(sampler, schedule, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        request_fields({"Sampler": sampler, "Schedule type": schedule})


def test_sampler_names_match_the_samplers_module():
    from sd_onnx.runtime.samplers import SAMPLER_NAMES as RUNTIME_NAMES

    assert SAMPLER_NAMES == RUNTIME_NAMES


@pytest.mark.parametrize(("rng", "source"), [("CPU", "cpu"), ("GPU", "gpu"), ("NV", "gpu")])
def test_rng(rng, source):
    assert request_fields({"RNG": rng})["randn_source"] == source


def test_missing_rng_means_gpu_as_in_a1111():
    assert request_fields({"Steps": "20"})["randn_source"] == "gpu"
    assert request_fields({}) == {}


@pytest.mark.parametrize(("field", "value"), [
    ("Steps", "20.5"), ("Steps", "twenty"), ("Steps", "2_0"), ("Seed", "-"), ("Seed", "1e9"),
    ("CFG scale", "seven"), ("CFG scale", "nan"), ("CFG scale", "inf"), ("CFG scale", "7_0"),
    ("Size", "512"), ("Size", "512x"), ("Size", "512 x 512"), ("Hires resize", "1024x1536x2"),
    ("Hires upscale", "2x"), ("Hires steps", "ten"), ("Denoising strength", ""), ("Batch size", "1.0"),
    ("Mask blur", "4px"), ("Resize mode", "Just resize"), ("RNG", "XPU"), ("RNG", "cpu"),
])
def test_unconvertible_values_raise_one_line_usage_errors(field, value):
    with pytest.raises(UsageError) as info:
        request_fields({field: value})
    message = str(info.value)
    assert f"'{field}'" in message and "\n" not in message


def test_unknown_fields_are_ignored():
    assert request_fields({"Steps": "20", "Face restoration": "CodeFormer", "ENSD": "31337", "Batch pos": "x",
                           "Schedule type": "Karras"}) == {"steps": 20, "randn_source": "gpu"}


def test_the_module_is_torch_free():
    heavy = "{'torch', 'diffusers', 'transformers', 'numpy'}"
    code = f"import sys, sd_onnx.runtime.infotext; print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy}))"
    root = str(Path(__file__).resolve().parents[1])  # this checkout's sd_onnx, whatever the venv installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "[]"

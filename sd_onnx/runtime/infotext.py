"""A1111's generation parameters text (the PNG "parameters" chunk), written and read back.

The format, as AUTOMATIC1111/stable-diffusion-webui writes it (modules/processing.py, `create_infotext`)::

    <prompt, any number of lines>
    Negative prompt: <negative prompt, any number of lines>     (only when the negative is not empty)
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, ...

and reads it (modules/infotext_utils.py, formerly generation_parameters_copypaste.py,
`parse_generation_parameters`): the last line is the settings line only if it holds at least three
`key: value` pairs (`re_param`), otherwise it belongs to the prompt; every other line is prompt text
until a line that starts with "Negative prompt:", from where on it is negative prompt text. A value
that contains ',', ':' or a newline is written as a JSON string (`quote`) and read back with
json.loads (`unquote`).

Where this module departs from A1111, and why:

* Ambiguous lines. A1111's format cannot hold a prompt line that itself starts with
  "Negative prompt:": A1111 reads everything from that line on as the negative prompt (and drops
  the label from such a line inside a negative prompt too). `format_infotext` therefore writes such
  a line, and a line that starts with backslashes followed by "Negative prompt:", with one more
  backslash in front (after the line's leading whitespace); `parse_infotext` takes one backslash off
  such a line again. No other prompt text is altered, so files with ordinary prompts read in A1111
  exactly as before; A1111 reads a protected line as prompt text, with its backslash.
* Whitespace. A1111 strips the whole text and every line; `parse_infotext` keeps the prompts'
  whitespace (the text after "Negative prompt:" loses just the one space the writer puts there), so
  that what `format_infotext` wrote comes back exactly. CLIP's tokenizer collapses whitespace, so an
  A1111 file reads to the same conditioning either way.
* Quoting. Values are quoted exactly as A1111's `quote` does, and in two more cases A1111's reader
  would otherwise change: a value that starts with '"' (`unquote` would strip it) and one with
  leading or trailing whitespace (the `re_param` pattern eats it). A1111 reads both back as written.

Round trips are exact for any prompt, negative prompt and values when there are at least three
settings; with fewer, the settings line is prompt text to A1111 as to this parser.

Standard library only: the runtime does not import torch, diffusers or transformers.
"""

from __future__ import annotations

import json
import math
import re

from sd_onnx.errors import UsageError

# One `key: value` pair of the settings line, with the same grammar as A1111's `re_param`: a key of
# word characters, spaces, '-' and '/' (at least two characters), then either a JSON string (escapes
# allowed) or anything up to the next comma.
_PAIR = re.compile(r"""
    \s* (?P<key> \w [\w \-/]+ ) : \s*
    (?P<value> " (?: \\. | [^\\"] )+ " | [^,]* )
    (?: , | $ )
""", re.VERBOSE)
_KEY = re.compile(r"\w[\w \-/]+")
_SIZE = re.compile(r"(\d+)x(\d+)")
_INT = re.compile(r"[+-]?\d+")

NEGATIVE_LABEL = "Negative prompt:"
_PROTECTED = re.compile(r"(\s*)(\\*)" + re.escape(NEGATIVE_LABEL))  # a line's start, after str.lstrip's whitespace
_MIN_SETTINGS = 3  # A1111: `if len(re_param.findall(lastline)) < 3:` the last line is prompt text

# sd-onnx's sampler names (sd_onnx/runtime/samplers.py SAMPLER_NAMES, which imports numpy; a test keeps the two equal).
SAMPLER_NAMES = ("Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ SDE Karras",
                 "DDIM", "PLMS", "LCM", "UniPC")
# A1111 1.9+ samplers whose "Automatic" schedule is Karras (sd_samplers_kdiffusion.py: {'scheduler': 'karras'}).
_KARRAS_BY_DEFAULT = frozenset({"DPM++ 2M", "DPM++ SDE", "DPM++ 2S a", "DPM2", "DPM2 a", "Restart"})
# A1111's timestep samplers (sd_samplers_timesteps.py) take no sigma schedule, whatever "Schedule type" says.
_TIMESTEP_SAMPLERS = frozenset({"DDIM", "PLMS", "UniPC"})


def format_infotext(prompt: str, negative_prompt: str, settings: dict[str, object]) -> str:
    """A1111's parameters text: the prompt, "Negative prompt: ..." (when not empty), then the settings line.

    `settings` maps A1111 field names to values, written in the order given; None and "" are left out.
    """
    lines = [_protect(line) for line in prompt.split("\n")]
    if negative_prompt:
        first, *rest = negative_prompt.split("\n")
        lines.append(f"{NEGATIVE_LABEL} {first}")  # the label's own line needs no protection
        lines.extend(_protect(line) for line in rest)
    pairs = []
    for key, value in settings.items():
        if value is None or value == "":
            continue
        if not _KEY.fullmatch(key):
            raise ValueError(f"infotext field name {key!r} cannot be read back (A1111 allows letters, digits, "
                             f"'_', ' ', '-' and '/')")
        pairs.append(f"{key}: {_quote(_text(value))}")
    if pairs:
        lines.append(", ".join(pairs))
    return "\n".join(lines)


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, settings) from a parameters text; settings are the raw strings, unquoted.

    Like A1111's `parse_generation_parameters`, without its defaults and conversions ("Size: 512x768"
    stays one string): the last line is the settings line only with at least three `key: value` pairs,
    a value in double quotes is read as a JSON string when it is one, a later duplicate key wins, and
    a key with an empty value is left out. Whitespace and protected lines: see the module docstring.
    """
    body, last = text, ""
    head, newline, tail = text.rstrip().rpartition("\n")
    if len(_PAIR.findall(tail)) >= _MIN_SETTINGS:
        body, last = (head if newline else ""), tail
    prompt: list[str] = []
    negative: list[str] = []
    target = prompt
    for line in body.split("\n"):
        stripped = line.lstrip()
        if stripped.startswith(NEGATIVE_LABEL):
            target = negative
            line = stripped[len(NEGATIVE_LABEL):]
            line = line[1:] if line.startswith(" ") else line
        elif (m := _PROTECTED.match(line)) and m.group(2):
            line = line[:m.end(1)] + line[m.end(1) + 1:]
        target.append(line)
    settings: dict[str, str] = {}
    for m in _PAIR.finditer(last):
        value = m.group("value")
        if value:  # A1111 skips an empty value (its `v[0]` raises and the pair is dropped)
            settings[m.group("key")] = _unquote(value)
    return "\n".join(prompt), "\n".join(negative), settings


def request_fields(settings: dict[str, str]) -> dict[str, object]:
    """Our request fields from A1111's, typed; unknown fields are ignored.

    Raises UsageError, naming the field, for a value that cannot be converted. Decisions:

    * "Sampler" with "Schedule type" (A1111 1.9+ writes them apart: "DPM++ 2M, Schedule type: Karras")
      become one of our names: Karras -> "<sampler> Karras"; Uniform -> the sampler itself (our
      non-Karras samplers use the model's own sigmas, A1111's "uniform"); Automatic -> the sampler's
      A1111 default, Karras for DPM++ 2M/DPM++ SDE/DPM2 (A1111 1.9+); DDIM, PLMS and UniPC ignore it
      as A1111's timestep samplers do. A name already ending in " Karras" keeps its schedule (A1111's
      `get_sampler_and_scheduler` lets the name's suffix win). Without "Schedule type" (A1111 before
      1.9, and sd-onnx) the sampler name is used as written: then "DPM++ 2M" meant uniform sigmas.
    * "RNG": CPU -> "cpu"; GPU and NV -> "gpu": our "gpu" source is A1111's NV one (noise.py,
      PhiloxRandn), which A1111 wrote to reproduce CUDA's torch.randn, its GPU source on NVIDIA cards.
      A settings line without RNG gets "gpu", as in A1111 ("Missing RNG means the default was set,
      which is GPU RNG" in parse_generation_parameters); sd-onnx writes "RNG: CPU" for CPU noise.
    """
    out: dict[str, object] = {}
    for field, (name, convert) in _SIMPLE.items():
        if field in settings:
            out[name] = convert(field, settings[field])
    if "Sampler" in settings:
        out["sampler"] = _sampler(settings["Sampler"], settings.get("Schedule type"))
    if "Size" in settings:
        out["width"], out["height"] = _size("Size", settings["Size"])
    if "Hires upscale" in settings:
        out["enable_hr"] = True
        out["hr_scale"] = _float("Hires upscale", settings["Hires upscale"])
    if "Hires resize" in settings:
        out["enable_hr"] = True
        out["hr_resize_x"], out["hr_resize_y"] = _size("Hires resize", settings["Hires resize"])
    if "RNG" in settings:
        out["randn_source"] = _rng(settings["RNG"])
    elif settings:
        out["randn_source"] = "gpu"
    return out


def _text(value: object) -> str:
    if isinstance(value, float) and math.isfinite(value):
        # A1111 writes the number its caller hands in with str() (create_infotext: `f'{k}: {quote(v)}'`,
        # and quote() returns a non-string as it is): no rounding. From its UI, gradio hands a whole number
        # in as an int, so A1111's own files say "CFG scale: 7" (see the example in the docstring of
        # parse_generation_parameters) and "Denoising strength: 0.75". We write the same: a whole float
        # as an int (as our old `:g` did, so those files do not change), any other float as repr(), the
        # shortest text that reads back to the same float (7.1234567, not `:g`'s 7.12346). Past 1e16 repr's
        # exponent form is kept, rather than hundreds of digits.
        return str(int(value)) if value.is_integer() and abs(value) < 1e16 else repr(value)
    return str(value)


def _quote(text: str) -> str:
    # A1111's quote(): json.dumps(text, ensure_ascii=False) when the text holds ',', '\n' or ':'.
    if any(c in text for c in ",\n:") or text.startswith('"') or text != text.strip():
        return json.dumps(text, ensure_ascii=False)
    return text


def _unquote(value: str) -> str:
    # A1111's unquote(): a value in double quotes is a JSON string, unless json.loads fails on it.
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:
            pass
    return value


def _protect(line: str) -> str:
    m = _PROTECTED.match(line)
    return line[:m.end(1)] + "\\" + line[m.end(1):] if m else line


def _fail(field: str, value: str, what: str) -> UsageError:
    return UsageError(f"infotext field '{field}': {value!r} is not {what}")


def _int(field: str, value: str) -> int:
    if not _INT.fullmatch(value.strip()):
        raise _fail(field, value, "a whole number")
    return int(value)


def _float(field: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or "_" in value:
        raise _fail(field, value, "a number")
    return number


def _str(field: str, value: str) -> str:
    return value


def _size(field: str, value: str) -> tuple[int, int]:
    m = _SIZE.fullmatch(value.strip())
    if not m:
        raise _fail(field, value, "a size WIDTHxHEIGHT")
    return int(m.group(1)), int(m.group(2))


def _rng(value: str) -> str:
    source = {"CPU": "cpu", "GPU": "gpu", "NV": "gpu"}.get(value.strip())
    if source is None:
        raise _fail("RNG", value, "a noise source (CPU, GPU or NV)")
    return source


def sampler_for(name: str, schedule: str | None) -> str:
    """Our sampler name for A1111's sampler and schedule type (the infotext's "Schedule type", the API's
    `scheduler` field as a label: Automatic, Uniform, Karras); None reads the name as written (A1111 before 1.9).
    Raises UsageError for a combination sd-onnx does not have."""
    return _sampler(name, schedule)


def _sampler(name: str, schedule: str | None) -> str:
    base = name
    if name.endswith(" Karras"):
        base, schedule = name[:-len(" Karras")], "Karras"
    if schedule is None:
        return name
    if base in _TIMESTEP_SAMPLERS:
        return base
    kind = schedule.strip().casefold()
    if kind == "automatic":
        kind = "karras" if base in _KARRAS_BY_DEFAULT else "uniform"
    if kind == "karras":
        result = f"{base} Karras"
    elif kind == "uniform":
        result = base
    else:
        raise _fail("Schedule type", schedule, "a schedule sd-onnx has (Automatic, Uniform or Karras)")
    if result not in SAMPLER_NAMES:
        raise UsageError(f"infotext fields 'Sampler' and 'Schedule type': {name!r} with {schedule!r} is {result!r}, "
                         f"which sd-onnx does not have (samplers: {', '.join(SAMPLER_NAMES)})")
    return result


_SIMPLE = {
    "Steps": ("steps", _int),
    "CFG scale": ("cfg_scale", _float),
    "Seed": ("seed", _int),
    "Batch size": ("batch_size", _int),
    "Denoising strength": ("denoising_strength", _float),
    "Hires steps": ("hr_second_pass_steps", _int),
    "Hires upscaler": ("hr_upscaler", _str),
    "Model": ("model", _str),
    "Model hash": ("model_hash", _str),
    "Resize mode": ("resize_mode", _int),
    "Mask blur": ("mask_blur", _int),
}

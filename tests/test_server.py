"""`sd-onnx serve`: the real server (uvicorn on a loopback port) driven with a plain HTTP client — A1111's shapes,
the same image as `generate`, the queue, interrupt, disconnects, limits and bad input."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from sd_onnx.cli import main  # noqa: E402
from sd_onnx.server import check_exposure, is_loopback, parse_auth  # noqa: E402
from sd_onnx.server.app import Limits, create_app  # noqa: E402
from sd_onnx.server.catalog import Catalog  # noqa: E402
from tests.serving import Server  # noqa: E402

SMALL = {"steps": 2, "width": 64, "height": 64}
# a job long enough to watch, queue behind and interrupt: about 80 ms a step on the tiny model at 256 px
LONG = {"prompt": "a long job", "steps": 60, "width": 256, "height": 256, "seed": 5}


@pytest.fixture(scope="module")
def home(tiny_model, tmp_path_factory):
    """A private $SD_ONNX_HOME with the tiny model installed under two names (for switching models)."""
    root = tmp_path_factory.mktemp("server-home")
    (root / "models").mkdir()
    folder = tiny_model("sd1")
    (root / "models" / "tiny-a").symlink_to(folder, target_is_directory=True)
    (root / "models" / "tiny-b").symlink_to(folder, target_is_directory=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SD_ONNX_HOME", str(root))
        yield root


@pytest.fixture(scope="module")
def server(home):
    app = create_app(Catalog("tiny-a"), limits=Limits(max_body_bytes=4 * 2**20, max_steps=150))
    running = Server(app)
    yield running
    running.stop()


def png(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def b64_of(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def wait_for(predicate, timeout: float = 60, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def in_thread(fn, *args):
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", fn(*args)), daemon=True)
    thread.start()
    return thread, box


def test_list_endpoints_have_a1111_shapes(server):
    status, models = server.call("GET", "/sdapi/v1/sd-models")
    assert status == 200 and [m["model_name"] for m in models] == ["tiny-a", "tiny-b"]
    assert set(models[0]) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    assert models[0]["title"] == f"tiny-a [{models[0]['hash']}]" and models[0]["sha256"].startswith(models[0]["hash"])
    _, samplers = server.call("GET", "/sdapi/v1/samplers")
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    assert {"Euler a", "DPM++ 2M Karras", "UniPC"} <= {s["name"] for s in samplers}
    _, schedulers = server.call("GET", "/sdapi/v1/schedulers")
    assert [s["name"] for s in schedulers] == ["automatic", "uniform", "karras"]
    assert set(schedulers[0]) == {"name", "label", "aliases", "default_rho", "need_inner_model"}
    _, upscalers = server.call("GET", "/sdapi/v1/upscalers")
    assert [u["name"] for u in upscalers] == ["None", "Lanczos", "Nearest"]
    assert set(upscalers[0]) == {"name", "model_name", "model_path", "model_url", "scale"}
    _, modes = server.call("GET", "/sdapi/v1/latent-upscale-modes")
    assert modes[0] == {"name": "Latent"} and len(modes) == 6
    assert server.call("GET", "/sdapi/v1/embeddings") == (200, {"loaded": {}, "skipped": {}})
    assert server.call("GET", "/sdapi/v1/loras") == (200, [])
    _, memory = server.call("GET", "/sdapi/v1/memory")
    assert memory["ram"]["total"] > 0 and "cuda" in memory
    _, flags = server.call("GET", "/sdapi/v1/cmd-flags")
    assert flags["api"] is True
    _, options = server.call("GET", "/sdapi/v1/options")
    assert options["sd_model_checkpoint"] == models[0]["title"] and options["randn_source"] == "GPU"
    _, progress = server.call("GET", "/sdapi/v1/progress")
    assert set(progress) == {"progress", "eta_relative", "state", "current_image", "textinfo"}
    assert {"job", "job_count", "job_no", "sampling_step", "sampling_steps", "interrupted",
            "skipped"} <= set(progress["state"])
    assert server.call("POST", "/sdapi/v1/refresh-checkpoints")[0] == 200


def test_txt2img_response_and_same_image_as_generate(server, home, tmp_path):
    body = {"prompt": "a red cube", "negative_prompt": "blurry", "seed": 1234, "sampler_name": "Euler", **SMALL}
    status, result = server.call("POST", "/sdapi/v1/txt2img", body)
    assert status == 200 and set(result) == {"images", "parameters", "info"}
    assert result["parameters"]["prompt"] == "a red cube" and result["parameters"]["steps"] == 2
    info = json.loads(result["info"])
    assert info["all_seeds"] == [1234] and info["sd_model_name"].startswith("tiny-a") and info["notes"] == []
    served = png(result["images"][0])
    assert info["infotexts"][0] == served.info["parameters"]

    # the CLI with the same parameters; the server's default noise is A1111's (GPU)
    folder = home / "models" / "tiny-a"
    assert main(["generate", "a red cube", "-n", "blurry", "--seed", "1234", "--sampler", "Euler", "--steps", "2",
                 "--width", "64", "--height", "64", "--randn-source", "gpu", "--model", str(folder),
                 "-o", str(tmp_path / "gpu"), "-q"]) == 0
    made = Image.open(next((tmp_path / "gpu").glob("*.png")))
    assert np.array_equal(np.asarray(made.convert("RGB")), np.asarray(served.convert("RGB")))
    assert made.info["parameters"] == served.info["parameters"]

    # A1111's randn_source option set to CPU: the CLI's default noise
    assert server.call("POST", "/sdapi/v1/options", {"randn_source": "CPU"})[0] == 200
    try:
        _, result = server.call("POST", "/sdapi/v1/txt2img", body)
    finally:
        server.call("POST", "/sdapi/v1/options", {"randn_source": "GPU"})
    assert main(["generate", "a red cube", "-n", "blurry", "--seed", "1234", "--sampler", "Euler", "--steps", "2",
                 "--width", "64", "--height", "64", "--model", str(folder), "-o", str(tmp_path / "cpu"), "-q"]) == 0
    made = Image.open(next((tmp_path / "cpu").glob("*.png")))
    served = png(result["images"][0])
    assert np.array_equal(np.asarray(made.convert("RGB")), np.asarray(served.convert("RGB")))
    assert "RNG: CPU" in served.info["parameters"]


@pytest.mark.parametrize("sampler,scheduler,expected", [
    ("DPM++ 2M Karras", None, "DPM++ 2M Karras"),  # the older combined name
    ("DPM++ 2M", None, "DPM++ 2M"),  # no scheduler: the name as written (A1111 before 1.9)
    ("DPM++ 2M", "karras", "DPM++ 2M Karras"),
    ("DPM++ 2M", "Automatic", "DPM++ 2M Karras"),  # A1111 1.9: automatic is Karras for DPM++ 2M
    ("DPM++ 2M", "uniform", "DPM++ 2M"),
    ("Euler a", "automatic", "Euler a"),  # what webuiapi sends by default
    ("DDIM", "karras", "DDIM"),  # timestep samplers take no schedule
])
def test_both_sampler_conventions(server, sampler, scheduler, expected):
    status, result = server.call("POST", "/sdapi/v1/txt2img", {"prompt": "x", "seed": 1, "sampler_name": sampler,
                                                               "scheduler": scheduler, **SMALL})
    assert status == 200, result
    assert f"Sampler: {expected}," in json.loads(result["info"])["infotexts"][0]


def test_sampler_index_is_the_fallback_and_euler_the_default(server):
    status, result = server.call("POST", "/sdapi/v1/txt2img", SMALL)  # no prompt: A1111's default ""
    assert status == 200 and json.loads(result["info"])["prompt"] == ""
    _, result = server.call("POST", "/sdapi/v1/txt2img", {"prompt": "x", "seed": 1, **SMALL})
    assert json.loads(result["info"])["sampler_name"] == "Euler"  # A1111's API default (sampler_index "Euler")
    _, result = server.call("POST", "/sdapi/v1/txt2img", {"prompt": "x", "seed": 1, "sampler_index": "LMS", **SMALL})
    assert json.loads(result["info"])["sampler_name"] == "LMS"


def test_a1111_fields_we_lack_are_accepted_and_noted(server):
    body = {"prompt": "x", "seed": 1, **SMALL, "restore_faces": True, "tiling": False, "styles": [],
            "alwayson_scripts": {"controlnet": {"args": []}}, "script_args": [], "subseed": -1,
            "override_settings": {"CLIP_stop_at_last_layers": 2}, "something_new": 3, "send_images": True}
    status, result = server.call("POST", "/sdapi/v1/txt2img", body)
    assert status == 200
    notes = json.loads(result["info"])["notes"]
    assert any("restore_faces" in n for n in notes) and any("alwayson_scripts" in n for n in notes)
    assert any("override_settings" in n for n in notes) and any("something_new" in n for n in notes)
    assert not any("tiling" in n or "styles" in n or "subseed" in n for n in notes)  # defaults are not noted
    status, result = server.call("POST", "/sdapi/v1/txt2img", {"prompt": "x", **SMALL, "send_images": False})
    assert status == 200 and result["images"] == []


def test_a_full_webuiapi_style_body_gets_no_notes(server):
    """The body A1111 clients send with every field at its default (webuiapi's txt2img, for one)."""
    body = {"enable_hr": False, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0,
            "hr_resize_y": 0, "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0,
            "prompt": "x", "styles": [], "seed": 4, "subseed": -1, "subseed_strength": 0.0,
            "seed_resize_from_h": 0, "seed_resize_from_w": 0, "batch_size": 1, "n_iter": 1, "cfg_scale": 7.0,
            "restore_faces": False, "tiling": False, "do_not_save_samples": False, "do_not_save_grid": False,
            "negative_prompt": "", "eta": 1.0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1,
            "override_settings": {}, "override_settings_restore_afterwards": True, "sampler_name": "Euler a",
            "sampler_index": "Euler a", "script_name": None, "script_args": [], "send_images": True,
            "save_images": False, "alwayson_scripts": {}, "scheduler": "Automatic", **SMALL}
    status, result = server.call("POST", "/sdapi/v1/txt2img", body)
    assert status == 200 and json.loads(result["info"])["notes"] == []


def test_img2img(server):
    picture = Image.new("RGB", (64, 64), (200, 30, 30))
    body = {"prompt": "x", "seed": 2, "init_images": [b64_of(picture)], "denoising_strength": 0.5, **SMALL}
    status, result = server.call("POST", "/sdapi/v1/img2img", body)
    assert status == 200 and png(result["images"][0]).size == (64, 64)
    assert "Denoising strength: 0.5" in json.loads(result["info"])["infotexts"][0]
    assert result["parameters"]["init_images"] is None  # A1111 echoes them only with include_init_images
    data_url = "data:image/png;base64," + b64_of(picture)
    assert server.call("POST", "/sdapi/v1/img2img", {**body, "init_images": [data_url]})[0] == 200
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))  # repaint the right half
    status, result = server.call("POST", "/sdapi/v1/img2img", {**body, "mask": b64_of(mask)})
    assert status == 200
    infotext = json.loads(result["info"])["infotexts"][0]
    # A1111's API defaults: mask blur 4, "Only masked" with no padding, masked content "fill"
    for field in ("Mask blur: 4", "Inpaint area: Only masked", "Masked area padding: 0", "Masked content: fill"):
        assert field in infotext, infotext
    out = np.asarray(png(result["images"][0]), dtype=int)
    assert (out[:, :20] == np.asarray(picture, dtype=int)[:, :20]).all()  # outside the blurred mask: the input
    status, error = server.call("POST", "/sdapi/v1/img2img", {**body, "mask": b64_of(Image.new("L", (64, 64)))})
    assert status == 422 and "the mask is empty" in error["detail"]
    status, error = server.call("POST", "/sdapi/v1/img2img", {"prompt": "x", **SMALL})
    assert status == 422 and "init_images" in error["detail"]


def test_extras_and_png_info(server):
    picture = Image.new("RGB", (40, 30), (10, 120, 200))
    status, result = server.call("POST", "/sdapi/v1/extra-single-image",
                                 {"image": b64_of(picture), "upscaling_resize": 2, "upscaler_1": "Lanczos"})
    assert status == 200 and set(result) == {"html_info", "image"} and png(result["image"]).size == (80, 60)
    status, result = server.call("POST", "/sdapi/v1/extra-single-image",
                                 {"image": b64_of(picture), "resize_mode": 1, "upscaling_resize_w": 64,
                                  "upscaling_resize_h": 64, "upscaler_1": "Nearest", "upscaler_2": "Lanczos",
                                  "extras_upscaler_2_visibility": 0.5})
    assert status == 200 and png(result["image"]).size == (64, 64)  # upscaled to cover, then cropped
    status, result = server.call("POST", "/sdapi/v1/extra-batch-images",
                                 {"imageList": [{"data": b64_of(picture), "name": "a.png"}] * 2,
                                  "upscaling_resize": 1.5})
    assert status == 200 and [png(i).size for i in result["images"]] == [(60, 45)] * 2
    status, error = server.call("POST", "/sdapi/v1/extra-single-image", {"image": b64_of(picture),
                                                                         "upscaler_1": "Latent"})
    assert status == 422 and "Latent" in error["detail"]
    status, error = server.call("POST", "/sdapi/v1/extra-single-image", {"image": b64_of(picture),
                                                                         "upscaling_resize": 200})
    assert status == 422 and "limit" in error["detail"]

    _, made = server.call("POST", "/sdapi/v1/txt2img", {"prompt": "a cat\nsecond line", "negative_prompt": "dog",
                                                        "seed": 9, **SMALL})
    status, info = server.call("POST", "/sdapi/v1/png-info", {"image": made["images"][0]})
    assert status == 200 and set(info) == {"info", "items", "parameters"}
    assert info["info"] == json.loads(made["info"])["infotexts"][0]
    assert info["parameters"]["Prompt"] == "a cat\nsecond line" and info["parameters"]["Negative prompt"] == "dog"
    assert info["parameters"]["Seed"] == "9" and info["parameters"]["Size-1"] == "64"
    assert server.call("POST", "/sdapi/v1/png-info", {"image": b64_of(picture)}) == (
        200, {"info": "", "items": {}, "parameters": {}})


def test_progress_preview_and_interrupt_mid_job(server):
    thread, box = in_thread(server.call, "POST", "/sdapi/v1/txt2img", {**LONG, "steps": 150})
    progress = wait_for(lambda: (p := server.call("GET", "/sdapi/v1/progress")[1])["state"]["sampling_step"] >= 2
                        and p, what="the job to start sampling")
    assert progress["state"]["job"] == "txt2img" and progress["state"]["sampling_steps"] == 150
    assert 0 < progress["progress"] < 1 and progress["eta_relative"] > 0
    preview = png(progress["current_image"])
    assert preview.size == (32, 32)  # the latent's size: A1111's cheap approximation
    assert server.call("GET", "/sdapi/v1/progress?skip_current_image=true")[1]["current_image"] is None
    started = time.time()
    assert server.call("POST", "/sdapi/v1/interrupt") == (200, {})
    thread.join(timeout=60)
    status, result = box["result"]
    assert status == 200 and time.time() - started < 10
    assert len(result["images"]) == 1 and png(result["images"][0]).size == (256, 256)  # what was made so far
    assert json.loads(result["info"])["sd_onnx"]["interrupted"] is True
    # the next job is not interrupted
    status, result = server.call("POST", "/sdapi/v1/txt2img", {"prompt": "x", **SMALL})
    assert status == 200 and json.loads(result["info"])["sd_onnx"]["interrupted"] is False


def test_skip_ends_the_current_batch_only(server):
    thread, box = in_thread(server.call, "POST", "/sdapi/v1/txt2img", {**LONG, "n_iter": 2})
    wait_for(lambda: server.call("GET", "/sdapi/v1/progress", )[1]["state"]["sampling_step"] >= 1, what="sampling")
    assert server.call("POST", "/sdapi/v1/skip")[0] == 200
    thread.join(timeout=120)
    status, result = box["result"]
    assert status == 200 and len(result["images"]) == 2


def test_queue_keeps_arrival_order_under_8_concurrent_clients(server):
    blocker, blocker_box = in_thread(server.call, "POST", "/sdapi/v1/txt2img", LONG)
    wait_for(lambda: server.call("GET", "/sdapi/v1/progress")[1]["state"]["job"], what="the blocker to run")
    clients = []
    for i in range(8):
        clients.append(in_thread(server.call, "POST", "/sdapi/v1/txt2img", {"prompt": f"client {i}", "seed": i,
                                                                            **SMALL}))
        # the next client is sent once this one is in the queue, so the send order is the arrival order
        wait_for(lambda: server.call("GET", "/sdapi/v1/progress")[1]["state"]["queue_pending"] == i + 1,
                 what=f"client {i} to be queued")
    for thread, _ in [*clients, (blocker, None)]:
        thread.join(timeout=120)
    records = []
    for i, (_, box) in enumerate(clients):
        status, result = box["result"]
        assert status == 200 and len(result["images"]) == 1
        info = json.loads(result["info"])
        assert info["prompt"] == f"client {i}" and info["all_seeds"] == [i]  # each client got its own images
        records.append(info["sd_onnx"])
    first = json.loads(blocker_box["result"][1]["info"])["sd_onnx"]
    assert [r["arrival"] for r in records] == sorted(r["arrival"] for r in records)
    assert [r["run"] for r in records] == list(range(first["run"] + 1, first["run"] + 9))  # in order, none lost


def test_client_that_leaves_while_queued_loses_its_place_and_nothing_else(server):
    blocker, blocker_box = in_thread(server.call, "POST", "/sdapi/v1/txt2img", LONG)
    wait_for(lambda: server.call("GET", "/sdapi/v1/progress")[1]["state"]["job"], what="the blocker to run")
    body = json.dumps({"prompt": "I will leave", **SMALL}).encode()
    leaver = socket.create_connection(("127.0.0.1", server.port))
    leaver.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    wait_for(lambda: server.call("GET", "/sdapi/v1/progress")[1]["state"]["queue_pending"] == 1, what="queued")
    leaver.close()
    wait_for(lambda: server.call("GET", "/sdapi/v1/progress")[1]["state"]["queue_pending"] == 0, what="withdrawn")
    assert server.call("GET", "/sdapi/v1/progress")[1]["state"]["job"] == "txt2img"  # the blocker runs on
    stayer, stayer_box = in_thread(server.call, "POST", "/sdapi/v1/txt2img", {"prompt": "I stay", **SMALL})
    blocker.join(timeout=120)
    stayer.join(timeout=120)
    first = json.loads(blocker_box["result"][1]["info"])["sd_onnx"]
    status, result = stayer_box["result"]
    assert status == 200 and blocker_box["result"][0] == 200
    assert json.loads(result["info"])["sd_onnx"]["run"] == first["run"] + 1  # the leaver's job never ran


def test_options_switch_the_model(server):
    _, models = server.call("GET", "/sdapi/v1/sd-models")
    other = models[1]["title"]
    assert server.call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": other}) == (200, None)
    try:
        assert server.call("GET", "/sdapi/v1/options")[1]["sd_model_checkpoint"] == other
        _, result = server.call("POST", "/sdapi/v1/txt2img", {"prompt": "x", **SMALL})
        assert json.loads(result["info"])["sd_model_name"] == other
        assert "Model: tiny-b" in json.loads(result["info"])["infotexts"][0]
    finally:
        server.call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": "tiny-a"})
    assert server.call("GET", "/sdapi/v1/options")[1]["sd_model_checkpoint"] == models[0]["title"]


def test_refresh_checkpoints_finds_new_folders(server, home):
    link = home / "models" / "tiny-c"
    link.symlink_to(home / "models" / "tiny-a", target_is_directory=True)
    try:
        assert "tiny-c" not in [m["model_name"] for m in server.call("GET", "/sdapi/v1/sd-models")[1]]
        assert server.call("POST", "/sdapi/v1/refresh-checkpoints")[0] == 200
        assert "tiny-c" in [m["model_name"] for m in server.call("GET", "/sdapi/v1/sd-models")[1]]
    finally:
        link.unlink()
        server.call("POST", "/sdapi/v1/refresh-checkpoints")


def big_png(width: int, height: int) -> str:
    return b64_of(Image.new("L", (width, height)))  # one colour: a few kilobytes for many pixels


@pytest.mark.parametrize("case,path,payload,status,words", [
    ("bad JSON", "/sdapi/v1/txt2img", b'{"prompt": "x",', 422, "JSON"),
    ("not an object", "/sdapi/v1/txt2img", b"[1, 2]", 422, ""),
    ("wrong type", "/sdapi/v1/txt2img", {"prompt": "x", "steps": "many"}, 422, "steps"),
    ("unknown sampler", "/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "Euler z"}, 404, "Sampler not found"),
    ("scheduler we lack", "/sdapi/v1/txt2img", {"prompt": "x", "scheduler": "exponential"}, 422, "exponential"),
    ("size over limit", "/sdapi/v1/txt2img", {"prompt": "x", "width": 4096}, 422, "limit of 2048"),
    ("not multiple of 8", "/sdapi/v1/txt2img", {"prompt": "x", "width": 100}, 422, "multiple of 8"),
    ("steps over limit", "/sdapi/v1/txt2img", {"prompt": "x", "steps": 151}, 422, "limit of 150"),
    ("batch over limit", "/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 9, **SMALL}, 422, "batch size"),
    ("count over limit", "/sdapi/v1/txt2img", {"prompt": "x", "n_iter": 101, **SMALL}, 422, "batch count"),
    ("negative cfg", "/sdapi/v1/txt2img", {"prompt": "x", "cfg_scale": -1, **SMALL}, 422, "CFG"),
    ("bad base64", "/sdapi/v1/img2img", {"prompt": "x", "init_images": ["%%%"]}, 422, "Invalid encoded image"),
    ("not a picture", "/sdapi/v1/img2img", {"prompt": "x", "init_images": [base64.b64encode(b"hello").decode()]},
     422, "Invalid encoded image"),
    ("a file path", "/sdapi/v1/png-info", {"image": "/etc/passwd"}, 422, "not as URLs or file paths"),
    ("a URL", "/sdapi/v1/png-info", {"image": "http://127.0.0.1/x.png"}, 422, "not as URLs"),
    ("too many pixels", "/sdapi/v1/png-info", {"image": big_png(4200, 4100)}, 413, "pixels"),
    ("body too large", "/sdapi/v1/png-info", {"image": "A" * (5 * 2**20)}, 413, "limit of 4194304 bytes"),
    ("model by path", "/sdapi/v1/options", {"sd_model_checkpoint": "/etc"}, 404, "not found"),
    ("model unknown", "/sdapi/v1/options", {"sd_model_checkpoint": "nope [123]"}, 404, "not found"),
    ("bad randn source", "/sdapi/v1/options", {"randn_source": "quantum"}, 422, "randn_source"),
    ("bad upscaler", "/sdapi/v1/extra-single-image", {"image": big_png(8, 8), "upscaler_1": "ESRGAN_4x"}, 422,
     "ESRGAN_4x"),
    ("unknown route", "/sdapi/v1/nothing-here", {}, 404, "Not Found"),
    ("hires upscaler", "/sdapi/v1/txt2img", {"prompt": "x", "enable_hr": True, "hr_upscaler": "SwinIR", **SMALL},
     422, "SwinIR"),
])
def test_bad_input_is_a_4xx_with_an_a1111_error_body(server, case, path, payload, status, words):
    raw = payload if isinstance(payload, bytes) else None
    got, error = server.call("POST", path, None if raw else payload, raw=raw)
    assert got == status, (case, error)
    assert set(error) == {"error", "detail", "body", "errors"}, case
    assert words in json.dumps(error), (case, error)
    assert server.call("GET", "/sdapi/v1/progress")[0] == 200  # still serving
    assert server.call("POST", "/sdapi/v1/txt2img", {"prompt": "x", **SMALL})[0] == 200


def test_page_and_assets_are_served_without_external_urls(server):
    status, html = server.call("GET", "/")
    assert status == 200 and "<form" in html
    for asset in ("/static/app.js", "/static/style.css"):
        status, text = server.call("GET", asset)
        assert status == 200 and "http://" not in text and "https://" not in text  # no CDN
    assert "https://" not in html and "http://" not in html


def test_api_auth(home):
    app = create_app(Catalog("tiny-a"), credentials={"alice": "s3cret:x", "bob": "pw"})
    running = Server(app)
    try:
        status, error = running.call("GET", "/sdapi/v1/sd-models")
        assert status == 401 and error["detail"] == "Incorrect username or password"
        wrong = "Basic " + base64.b64encode(b"alice:nope").decode()
        assert running.call("GET", "/sdapi/v1/sd-models", headers={"Authorization": wrong})[0] == 401
        assert running.call("GET", "/", headers={"Authorization": wrong})[0] == 401
        right = "Basic " + base64.b64encode(b"alice:s3cret:x").decode()
        assert running.call("GET", "/sdapi/v1/sd-models", headers={"Authorization": right})[0] == 200
        assert running.call("GET", "/", headers={"Authorization": right})[0] == 200
        request = urllib.request.Request(running.url("/sdapi/v1/options"))
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        assert e.value.headers["WWW-Authenticate"].startswith("Basic")
    finally:
        running.stop()


def test_exposure_rules():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
    assert parse_auth("a:b,c:d:e") == {"a": "b", "c": "d:e"}
    from sd_onnx.errors import UsageError

    with pytest.raises(UsageError, match="--api-auth"):
        check_exposure("0.0.0.0", None, False)
    check_exposure("0.0.0.0", "a:b", False)
    check_exposure("0.0.0.0", None, True)
    with pytest.raises(UsageError):
        parse_auth("nopassword")
    assert main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2  # refused before anything loads


def test_serve_command_serves(home):
    """`sd-onnx serve` itself, in a subprocess: up, answering, and gone on SIGTERM."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "SD_ONNX_HOME": str(home), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "sd_onnx", "serve", "--model", "tiny-b", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        def ready():
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/sdapi/v1/options", timeout=2) as r:
                    return json.loads(r.read())
            except OSError:
                return None
        options = wait_for(ready, timeout=120, what="sd-onnx serve to answer")
        assert options["sd_model_checkpoint"].startswith("tiny-b")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_server_is_torch_free(home):
    """The server imports the runtime only: building the app loads no torch, diffusers or transformers."""
    code = ("import sys\n"
            "from sd_onnx.server.app import create_app\n"
            "from sd_onnx.server.catalog import Catalog\n"
            "create_app(Catalog('tiny-a'))\n"
            "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
            "assert not bad, bad\n")
    env = {**os.environ, "SD_ONNX_HOME": str(home), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)


def test_loras_and_embeddings_are_listed_and_used(server, home, tiny_checkpoint):
    """/loras and /embeddings list what `<lora:NAME:W>` and embedding words can name; a txt2img with a LoRA tag
    applies it (a different image, Lora hashes in the infotext)."""
    import diffusers

    from tests.test_embeddings import write_embeddings
    from tests.test_generate import reference_pipeline
    from tests.test_lora import lora_layers, write_lora

    pipe = reference_pipeline(tiny_checkpoint("sd1"), diffusers.EulerDiscreteScheduler)
    (home / "loras").mkdir(exist_ok=True)
    write_lora(home / "loras" / "inkstyle.safetensors", lora_layers(pipe), "kohya", seed=3)
    write_embeddings(home / "embeddings", pipe.text_encoder.config.hidden_size)
    (home / "embeddings" / "broken.pt").write_bytes(b"not a torch file")
    status, loras = server.call("GET", "/sdapi/v1/loras")
    assert status == 200 and [entry["name"] for entry in loras] == ["inkstyle"]
    status, embeddings = server.call("GET", "/sdapi/v1/embeddings")
    assert status == 200 and embeddings["loaded"]["tiemb"]["vectors"] == 2 and "broken" in embeddings["skipped"]
    body = {"prompt": "a cat", "seed": 5, **SMALL}
    plain = server.call("POST", "/sdapi/v1/txt2img", body)[1]
    status, styled = server.call("POST", "/sdapi/v1/txt2img", {**body, "prompt": "a cat <lora:inkstyle:1>"})
    assert status == 200 and "Lora hashes" in json.loads(styled["info"])["infotexts"][0]
    assert png(styled["images"][0]).tobytes() != png(plain["images"][0]).tobytes()

"""`ibkit chat` (a scripted stdin session) and `ibkit serve` (the JSON API on 127.0.0.1) on a tiny model."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
from PIL import Image
from tiny_models import T5_TEXT, VISION, qformer_tokenizer, tiny_llm_tokenizer

from ibkit import Processor

FAST = {"num_beams": 1, "max_new_tokens": 3}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from test_model import tiny_model

    root = tmp_path_factory.mktemp("ask")
    model = tiny_model(T5_TEXT, qformer_vocab=30523)
    processor = Processor(qformer_tokenizer(), tiny_llm_tokenizer("t5"), image_size=VISION["image_size"])
    model.save_pretrained(root / "model", processor=processor)
    Image.new("RGB", (30, 30), (200, 20, 20)).save(root / "red.png")
    Image.new("RGB", (30, 30), (20, 20, 200)).save(root / "blue.png")
    return root


def test_chat_answers_a_scripted_session(workspace):
    script = "\n".join([
        "what is this?",  # no image yet
        f"/image {workspace / 'missing.png'}",
        f"/image {workspace / 'red.png'}",
        "what colour is it?",
        "/set num_beams 2",
        "/set max_new_tokens 2",
        "what colour is it?",
        "/help",
        "/nonsense",
        "/quit",
        "never asked",
    ]) + "\n"
    done = subprocess.run(
        [sys.executable, "-m", "ibkit", "chat", str(workspace / "model"), "--device=cpu",
         f"--generation={json.dumps(FAST)}"],
        input=script, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "num_beams=1" in lines[1] and "max_new_tokens=3" in lines[1]  # the settings are shown at the start
    assert lines[2] == "no image yet: /image PATH first"
    assert lines[3].startswith("cannot load the image: missing_file") and "missing.png" in lines[3]
    assert lines[4] == f"image: {workspace / 'red.png'} (30x30)"
    from ibkit.app.assistant import Assistant, ModelSource
    from ibkit.app.chat import EMPTY_ANSWER

    assistant = Assistant.load(ModelSource(str(workspace / "model"), device="cpu"), FAST)
    red = Image.open(workspace / "red.png").convert("RGB")
    expected = [assistant.ask([red], ["what colour is it?"])[0],
                assistant.ask([red], ["what colour is it?"], num_beams=2, max_new_tokens=2)[0]]
    assert lines[5] == (expected[0] or EMPTY_ANSWER)
    assert "num_beams=2" in lines[6] and "max_new_tokens=2" in lines[7]
    assert lines[8] == (expected[1] or EMPTY_ANSWER)
    assert "/image PATH" in done.stdout and "unknown command /nonsense" in done.stdout
    assert "never asked" not in done.stdout and len(done.stdout.split("unknown command")) == 2


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_web_page_answers_on_loopback(workspace):
    from ibkit.app.assistant import Assistant, ModelSource
    from ibkit.app.serve import make_server

    assistant = Assistant.load(ModelSource(str(workspace / "model"), device="cpu"), FAST)
    server = make_server(assistant, port=0)
    host, port = server.server_address[:2]
    assert host == "127.0.0.1"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(base + "/", timeout=30) as response:
            assert "/api/ask" in response.read().decode()
        png = io.BytesIO()
        Image.open(workspace / "red.png").save(png, format="PNG")
        image = base64.b64encode(png.getvalue()).decode()
        status, body = _post(base + "/api/ask", {"image": image, "question": "what colour is it?"})
        assert status == 200, body
        expected = assistant.ask([Image.open(workspace / "red.png").convert("RGB")], ["what colour is it?"])[0]
        assert body["answer"] == expected and body["settings"]["num_beams"] == 1
        status, body = _post(base + "/api/ask", {"image": image, "question": "and?", "settings": {"max_new_tokens": 1}})
        assert status == 200 and body["settings"]["max_new_tokens"] == 1 and len(body["answer"].split()) <= 1
        assert assistant.settings()["max_new_tokens"] == 3  # a request's settings do not stick
        status, body = _post(base + "/api/ask", {"image": "not base64!", "question": "what?"})
        assert status == 400 and "base64" in body["error"]
        status, body = _post(base + "/api/ask", {"image": image})
        assert status == 400 and "question" in body["error"]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert not thread.is_alive()

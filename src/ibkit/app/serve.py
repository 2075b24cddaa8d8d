"""``ibkit serve MODEL_DIR``: a small web page and JSON API on 127.0.0.1 over one model.

Built on the standard library's ``http.server`` rather than Gradio: the page is one form (image,
question, settings) and one JSON endpoint, which needs no dependency, starts instantly, and is
tested without a browser. It serves the loopback address only and answers one request at a time (the
model is not shared between threads); it is a local demo, not a production server.

API: ``GET /api/settings`` -> the generation settings; ``POST /api/ask`` with JSON ``{"image": base64
(PNG/JPEG bytes), "question": str, "settings": {optional generation overrides}}`` -> ``{"answer",
"settings"}``. Bad requests get a 400 with ``{"error": ...}``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from ibkit.app.assistant import Assistant, ModelSource

log = logging.getLogger(__name__)
HOST = "127.0.0.1"
MAX_BODY = 32 * 1024 * 1024  # an upload larger than this is refused (413)

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>ibkit</title>
<style>body{font-family:sans-serif;max-width:46em;margin:2em auto}textarea,input{width:100%}
#answer{white-space:pre-wrap;border:1px solid #ccc;padding:.5em;min-height:2em}img{max-width:100%}</style>
</head><body>
<h2>ibkit: ask about an image</h2>
<p><input type="file" id="file" accept="image/*"></p><img id="preview">
<p><textarea id="question" rows="2" placeholder="What is in this image?"></textarea></p>
<p>generation settings (JSON, sent with the question):<br><textarea id="settings" rows="3"></textarea></p>
<p><button id="ask">Ask</button></p><div id="answer"></div>
<script>
let image = null;
fetch('/api/settings').then(r => r.json()).then(s => {
  document.getElementById('settings').value = JSON.stringify(s, null, 1); });
document.getElementById('file').onchange = e => {
  const reader = new FileReader();
  reader.onload = () => { document.getElementById('preview').src = reader.result;
                          image = reader.result.split(',')[1]; };
  reader.readAsDataURL(e.target.files[0]); };
document.getElementById('ask').onclick = async () => {
  const out = document.getElementById('answer');
  if (!image) { out.textContent = 'choose an image first'; return; }
  out.textContent = '...';
  let settings = {};
  try { settings = JSON.parse(document.getElementById('settings').value || '{}'); }
  catch (e) { out.textContent = 'settings: ' + e; return; }
  const r = await fetch('/api/ask', {method: 'POST', headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({image: image, question: document.getElementById('question').value, settings: settings})});
  const body = await r.json();
  out.textContent = r.ok ? body.answer : 'error: ' + body.error; };
</script></body></html>
"""


class BadRequest(ValueError):
    """A request the API cannot answer (400)."""


def answer_request(assistant: Assistant, body: dict[str, Any]) -> dict[str, Any]:
    """The ``/api/ask`` logic: decode the image, ask, return the answer and the settings used."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    question = body.get("question")
    if not isinstance(question, str) or not question.strip():
        raise BadRequest("'question' must be a non-empty string")
    settings = body.get("settings") or {}
    if not isinstance(settings, dict):
        raise BadRequest("'settings' must be an object")
    try:
        data = base64.b64decode(body.get("image") or "", validate=True)
        image = Image.open(io.BytesIO(data)).convert("RGB")
    except (binascii.Error, UnidentifiedImageError, OSError, TypeError) as error:
        raise BadRequest(f"'image' must be a base64-encoded PNG or JPEG ({type(error).__name__})") from None
    used = {**assistant.settings(), **settings}
    overrides = {k: v for k, v in settings.items() if k != "prompt"}
    prompt = settings.get("prompt")
    saved = assistant.prompt
    try:
        if prompt is not None:
            assistant.set("prompt", prompt)
        answer = assistant.ask([image], [question], **overrides)[0]
    except (TypeError, ValueError) as error:
        raise BadRequest(f"cannot answer with these settings: {error}") from None
    finally:
        assistant.prompt = saved
    return {"answer": answer, "settings": used}


def make_server(assistant: Assistant, port: int = 7860) -> HTTPServer:
    """An HTTP server on 127.0.0.1:``port`` (0: any free port, see ``server.server_address``)."""

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, payload: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _json(self, status: int, data: dict[str, Any]) -> None:
            self._send(status, json.dumps(data).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path in ("/", "/index.html"):
                self._send(200, PAGE.encode(), "text/html; charset=utf-8")
            elif self.path == "/api/settings":
                self._json(200, assistant.settings())
            else:
                self._json(404, {"error": f"no page {self.path}"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/api/ask":
                self._json(404, {"error": f"no endpoint {self.path}"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self._json(413, {"error": f"request larger than {MAX_BODY} bytes"})
                return
            try:
                body = json.loads(self.rfile.read(length) or b"null")
                self._json(200, answer_request(assistant, body))
            except json.JSONDecodeError as error:
                self._json(400, {"error": f"the body is not JSON: {error}"})
            except BadRequest as error:
                self._json(400, {"error": str(error)})

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
            log.info("%s - %s", self.address_string(), format % args)

    return HTTPServer((HOST, port), Handler)


def serve(
    model: str,
    port: int = 7860,
    checkpoint: str | None = None,
    generation: dict[str, Any] | None = None,
    llm_dtype: str | None = None,
    device: str | None = None,
) -> int:
    """A local web page (upload an image, ask, see the answer and settings) and JSON API on 127.0.0.1.

    Args:
        model: the model folder (e.g. outputs/demo/instruct/model).
        port: the port on 127.0.0.1 (0: any free one).
        checkpoint: an ``ibkit fit`` checkpoint whose trained weights go over the folder.
        generation: generation settings over the default (5 beams, up to 256 new tokens).
        llm_dtype: dtype of the LLM (e.g. bfloat16 on a GPU).
        device: cuda or cpu (default: cuda when available).
    """
    assistant = Assistant.load(ModelSource(model, checkpoint, llm_dtype, device), generation)
    server = make_server(assistant, port)
    host, bound = server.server_address[:2]
    print(f"ibkit serve: http://{host}:{bound}/  (POST /api/ask; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0

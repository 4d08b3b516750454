"""The watermark through the server and the CLI, on the real SmolLM2: a server started with a
key watermarks answers (unless a request says `watermark: false`), POST /v1/watermark/detect
and `python -m jaxinfer.launch.detect` score them, and the key shows in no response or log."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from jaxinfer import watermark
from jaxinfer.serving import EngineConfig
from jaxinfer.serving.engine import Engine
from jaxinfer.serving.server import APIError, ServerState, _watermark_key
from tests.test_serving import MODEL, serving

KEY = "server test key 1234"
CONFIG = EngineConfig(max_batch_size=2, max_seq_len=128, page_size=16, num_pages=2 * 8 + 1,
                      decode_steps=4, max_queue_size=8)
PROMPT = "Once upon a time, in a small village at the edge of a dark forest,"


@pytest.fixture(scope="module")
def url(smollm2):
    state = ServerState(MODEL, watermark_key=KEY)
    assert KEY not in repr(state)
    with serving(state) as url:
        engine = Engine(smollm2, CONFIG)
        engine.warmup()
        state.attach(engine)
        yield url


def complete(url: str, **fields) -> str:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 96, "temperature": 1.0, "seed": 7,
            "ignore_eos": True, **fields}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert KEY not in response.text
    return response.json()["choices"][0]["text"]


def detect(url: str, text: str, **fields) -> httpx.Response:
    response = httpx.post(f"{url}/v1/watermark/detect", json={"text": text, **fields},
                          timeout=60)
    assert KEY not in response.text
    return response


def test_answers_are_watermarked_by_default_and_not_when_asked_off(url, smollm2, caplog):
    caplog.set_level(logging.DEBUG)
    with ThreadPoolExecutor(2) as pool:  # decoded side by side, in one batch
        marked, plain = pool.map(lambda fields: complete(url, **fields), [{}, {"watermark": False}])
    # 96 tokens at temperature 1: z ~ 8 when marked (measured), N(0, 1) when not.
    found = detect(url, marked).json()
    assert found["z_score"] > 4 and found["p_value"] < 1e-4, found
    assert detect(url, marked, key=KEY).json() == found  # the server's key is the default
    assert detect(url, plain).json()["z_score"] < 3
    assert detect(url, marked, key="not the key").json()["z_score"] < 3
    ids = smollm2.tokenizer.encode(marked, add_bos=False)
    assert found["tokens"] == len(ids)
    assert (found["z_score"], found["tokens_scored"]) == pytest.approx(
        watermark.detect(ids, KEY)[::2])
    assert KEY not in caplog.text


@pytest.mark.parametrize("value", ["true", 1, "yes"])
def test_a_watermark_field_that_is_not_a_boolean_is_a_400(url, value):
    response = httpx.post(f"{url}/v1/completions", json={
        "model": MODEL, "prompt": PROMPT, "max_tokens": 2, "watermark": value}, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "watermark"


@pytest.mark.parametrize("body, param", [
    ({"text": "Hello there, how are you?", "key": ""}, "key"),
    ({"text": ""}, "text"),
    ({"text": "Hi"}, "text"),  # one token: nothing to score
    ({"key": KEY}, "text"),
    ({"text": "Hello there", "key": 17}, "key"),
    ({"text": "Hello there", "key": "\ud800"}, "key"),
])
def test_bad_detect_requests_get_a_400_naming_the_field(url, body, param):
    response = httpx.post(f"{url}/v1/watermark/detect", content=json.dumps(body),  # ASCII
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert KEY not in response.text


def test_a_server_without_a_key_refuses_watermark_true():
    class Body:
        watermark = True

    with pytest.raises(APIError, match="--watermark_key") as refused:
        _watermark_key(ServerState(MODEL), Body())
    assert refused.value.status == 400
    Body.watermark = None
    assert _watermark_key(ServerState(MODEL), Body()) is None
    assert _watermark_key(ServerState(MODEL, watermark_key=KEY), Body()) == KEY


def test_the_detect_cli_prints_the_detectors_score_and_never_the_key(smollm2, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    text = "The quick brown fox jumps over the lazy dog, then naps under an old oak tree."
    run = subprocess.run([sys.executable, "-m", "jaxinfer.launch.detect", f"--text={text}",
                          f"--key=@{key_file}"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert KEY not in run.stdout + run.stderr
    found = json.loads(run.stdout)
    z, p_value, scored = watermark.detect(smollm2.tokenizer.encode(text, add_bos=False), KEY)
    assert (found["z_score"], found["p_value"], found["tokens_scored"]) == pytest.approx(
        (z, p_value, scored), abs=1e-4)

"""`gemma4 serve`'s app on a real uvicorn server on loopback, driven by the official `openai`
client: every answer equals the package's own `stream_generate` on the same input."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from checkpoints import PERSON, WEATHER, add_tool_tokens
from conftest import free_port, random_image, tones

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from mlx_gemma4 import load, stream_generate  # noqa: E402
from mlx_gemma4.server import MediaPolicy, ServerSettings, create_app  # noqa: E402

KEY = "test-key"
HELLO = [{"role": "user", "content": "hello there"}]


@dataclass
class Served:
    url: str
    client: openai.OpenAI
    app: object
    reference: tuple  # (model, processor) loaded apart, for the expected answers
    folder: Path

    def solo(self, prompt, **kwargs) -> dict:
        """What `stream_generate` answers (greedy unless told)."""
        kwargs.setdefault("temperature", 0.0)
        pieces = list(stream_generate(*self.reference, prompt, **kwargs))
        return {
            "text": "".join(p.text for p in pieces),
            "thought": "".join(p.thought for p in pieces),
            "finish_reason": pieces[-1].finish_reason,
            "tokens": len(pieces),
            "prompt_tokens": pieces[-1].prompt_tokens,
            "tool_calls": [c for p in pieces for c in p.tool_calls],
        }

    def post(self, path: str, key: str | None = KEY, headers=None, **kwargs) -> httpx.Response:
        headers = {**(headers or {}), **({"Authorization": f"Bearer {key}"} if key else {})}
        kwargs.setdefault("timeout", 60)
        return httpx.post(self.url + path, headers=headers, **kwargs)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()


@pytest.fixture(scope="module")
def served(chat_checkpoint, tmp_path_factory):
    source, _ = chat_checkpoint("multimodal")
    folder = tmp_path_factory.mktemp("served")
    shutil.copytree(source, folder, dirs_exist_ok=True)
    add_tool_tokens(folder)
    model, processor = load(folder)
    settings = ServerSettings(
        model_name="tiny",
        api_key=KEY,
        prefix_cache_bytes=2**26,
        max_concurrency=16,  # the load test's 32 clients queue for the engine
        transcription_max_tokens=12,
        max_body_bytes=2**20,
        media=MediaPolicy(
            allow_local_paths=True, max_media_bytes=2**19, max_image_pixels=200 * 150
        ),
    )
    app = create_app(model, processor, settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    yield Served(url, client, app, load(folder), folder)
    server.should_exit = True
    thread.join(30)
    assert not thread.is_alive()


def chat(served: Served, messages, **kwargs):
    kwargs.setdefault("temperature", 0)
    return served.client.chat.completions.create(model="tiny", messages=messages, **kwargs)


def streamed(served: Served, messages, **kwargs) -> tuple[dict, list]:
    """A streamed chat answer put together: text, thought, calls, finish, usage; and chunks."""
    kwargs.setdefault("temperature", 0)
    chunks = list(
        served.client.chat.completions.create(
            model="tiny",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            **kwargs,
        )
    )
    text, thought, calls, finish = "", "", {}, None
    for chunk in chunks:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        text += delta.content or ""
        thought += getattr(delta, "reasoning_content", None) or ""
        for call in delta.tool_calls or []:
            calls.setdefault(call.index, call)
        finish = chunk.choices[0].finish_reason or finish
    whole = dict(text=text, thought=thought, calls=calls, finish=finish, usage=chunks[-1].usage)
    return whole, chunks


# --------------------------------------------------------------------------- answers


def test_plain_and_streamed_answers_equal_stream_generate(served):
    expected = served.solo(HELLO, max_tokens=12)
    answer = chat(served, HELLO, max_tokens=12)
    choice = answer.choices[0]
    assert choice.message.content == expected["text"]
    assert choice.finish_reason == expected["finish_reason"]
    assert answer.usage.completion_tokens == expected["tokens"]
    assert answer.usage.prompt_tokens == expected["prompt_tokens"]
    assert answer.usage.total_tokens == expected["tokens"] + expected["prompt_tokens"]
    assert answer.object == "chat.completion" and answer.model == "tiny"

    whole, chunks = streamed(served, HELLO, max_completion_tokens=12)
    assert whole["text"] == expected["text"]
    assert whole["finish"] == expected["finish_reason"]
    assert whole["usage"].completion_tokens == expected["tokens"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(chunks) > 3  # token by token, not one block


def test_sampling_fields_reach_the_engine(served):
    settings = dict(max_tokens=10, temperature=1.2, top_k=30, top_p=0.9, min_p=0.05, seed=11)
    expected = served.solo(HELLO, **settings)
    extra = {"top_k": 30, "min_p": 0.05}
    answer = chat(
        served,
        HELLO,
        max_tokens=10,
        temperature=1.2,
        top_p=0.9,
        seed=11,
        extra_body=extra,
    )
    assert answer.choices[0].message.content == expected["text"]
    text = expected["text"]
    if len(text) > 4:  # a stop string cuts where stream_generate cuts
        stop = text[2:4]
        cut = served.solo(HELLO, stop=[stop], **settings)
        answer = chat(
            served,
            HELLO,
            max_tokens=10,
            temperature=1.2,
            top_p=0.9,
            seed=11,
            stop=stop,
            extra_body=extra,
        )
        assert answer.choices[0].message.content == cut["text"]
        assert answer.choices[0].finish_reason == "stop"


def test_repetition_penalty_reaches_the_engine(served):
    expected = served.solo(HELLO, max_tokens=16, repetition_penalty=1.5)
    assert expected["text"] != served.solo(HELLO, max_tokens=16)["text"]
    answer = chat(served, HELLO, max_tokens=16, extra_body={"repetition_penalty": 1.5})
    assert answer.choices[0].message.content == expected["text"]


def test_thoughts_go_to_reasoning_content():
    """A random tiny model never opens its thought channel: the routing on its own."""
    from mlx_gemma4.engine import BatchResponse
    from mlx_gemma4.server.completions import Outcome, Reply

    outcome, reply = Outcome(), Reply("chat.completion", "tiny")
    steps = [("", "Let me see. "), ("", "Yes."), ("Hi!", "")]
    deltas = [
        outcome.add(BatchResponse(0, 5, text, thought, None, 7, n, 3))
        for n, (text, thought) in enumerate(steps, start=1)
    ]
    assert deltas == [
        {"reasoning_content": "Let me see. "},
        {"reasoning_content": "Yes."},
        {"content": "Hi!"},
    ]
    message = reply.whole(outcome)["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": "Hi!",
        "reasoning_content": "Let me see. Yes.",
    }
    assert reply.whole(outcome)["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}


def test_the_next_turn_reports_its_cached_prompt_tokens(served):
    first = [{"role": "user", "content": "tell me a story about a cat"}]
    answer = chat(served, first, max_tokens=6)
    turn = first + [
        {"role": "assistant", "content": answer.choices[0].message.content},
        {"role": "user", "content": "and then?"},
    ]
    again = chat(served, turn, max_tokens=6)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 10 < cached < again.usage.prompt_tokens
    assert again.choices[0].message.content == served.solo(turn, max_tokens=6)["text"]


def test_thinking_flag_and_reasoning_effort(served):
    expected = served.solo(HELLO, max_tokens=10, enable_thinking=True)
    plain = served.solo(HELLO, max_tokens=10)
    assert expected["prompt_tokens"] != plain["prompt_tokens"]  # the flag changes the prompt
    for flags in (
        {"chat_template_kwargs": {"enable_thinking": True}},
        {"reasoning_effort": "high"},
    ):
        answer = chat(served, HELLO, max_tokens=10, extra_body=flags)
        assert answer.usage.prompt_tokens == expected["prompt_tokens"]
        assert answer.choices[0].message.content == expected["text"]
        assert (getattr(answer.choices[0].message, "reasoning_content", None) or "") == expected[
            "thought"
        ]


def test_text_completions_and_models(served):
    expected = served.solo("Once upon a time", max_tokens=8)
    answer = served.client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0
    )
    assert answer.choices[0].text == expected["text"]
    assert answer.usage.completion_tokens == expected["tokens"]
    pieces = served.client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(p.choices[0].text for p in pieces if p.choices) == expected["text"]
    assert [m.id for m in served.client.models.list().data] == ["tiny"]
    assert served.client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError, match="serves 'tiny' only"):
        served.client.models.retrieve("gpt-4o")
    health = served.health()
    assert health["status"] == "ok" and health["model"] == "tiny"
    page = httpx.get(served.url + "/")  # the chat page and its files, open like /health
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert httpx.get(served.url + "/static/chat.js").status_code == 200
    assert error_of(httpx.get(served.url + "/static/nothing.js"))["code"] == "not_found"


ASK_WEATHER = [{"role": "user", "content": "weather in Oslo?"}]


def test_tool_calls_plain_and_streamed_then_the_tool_answer(served):
    forced = {"type": "function", "function": {"name": "get_weather"}}
    expected = served.solo(ASK_WEATHER, max_tokens=60, tools=[WEATHER], tool_choice=forced)
    (call,) = expected["tool_calls"]
    answer = chat(served, ASK_WEATHER, max_tokens=60, tools=[WEATHER], tool_choice=forced)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" == expected["finish_reason"]
    (got,) = choice.message.tool_calls
    assert got.function.name == "get_weather"
    assert json.loads(got.function.arguments) == call.arguments
    assert got.id.startswith("call_")

    whole, _ = streamed(served, ASK_WEATHER, max_tokens=60, tools=[WEATHER], tool_choice=forced)
    assert whole["finish"] == "tool_calls"
    (delta,) = whole["calls"].values()
    assert delta.index == 0 and delta.type == "function"
    assert delta.function.name == "get_weather"
    assert json.loads(delta.function.arguments) == call.arguments

    # the client runs the tool and sends its result back, as OpenAI's clients do
    turn = [
        *ASK_WEATHER,
        {"role": "assistant", "content": None, "tool_calls": [got.model_dump()]},
        {"role": "tool", "tool_call_id": got.id, "content": json.dumps({"temp": 21})},
    ]
    after = served.solo(turn, max_tokens=8, tools=[WEATHER])
    answer = chat(served, turn, max_tokens=8, tools=[WEATHER])
    assert answer.choices[0].message.content == after["text"]
    assert answer.usage.prompt_tokens == after["prompt_tokens"]


def test_json_schema_and_json_object_answers(served):
    import jsonschema

    expected = served.solo(ASK_WEATHER, max_tokens=80, json_schema=PERSON)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    answer = chat(served, ASK_WEATHER, max_tokens=80, response_format=fmt)
    text = answer.choices[0].message.content
    assert text == expected["text"]
    jsonschema.validate(json.loads(text), PERSON)
    whole, _ = streamed(served, ASK_WEATHER, max_tokens=80, response_format=fmt)
    assert whole["text"] == text
    answer = chat(served, ASK_WEATHER, max_tokens=80, response_format={"type": "json_object"})
    assert (
        answer.choices[0].message.content
        == served.solo(ASK_WEATHER, max_tokens=80, json_schema=True)["text"]
    )


# --------------------------------------------------------------------------- media


def png_data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_an_image_as_data_url_and_as_local_path(served, tmp_path):
    image = random_image(96, 64, seed=1)
    question = {"type": "text", "text": "what is this?"}
    ours = [{"role": "user", "content": [{"type": "image", "image": image}, question]}]
    expected = served.solo(ours, max_tokens=8)
    for url in (png_data_url(image), str(tmp_path / "a.png")):
        image.save(tmp_path / "a.png")
        parts = [{"type": "image_url", "image_url": {"url": url}}, question]
        answer = chat(served, [{"role": "user", "content": parts}], max_tokens=8)
        assert answer.choices[0].message.content == expected["text"]
        assert answer.usage.prompt_tokens == expected["prompt_tokens"]


def test_a_video_as_data_url(served, tmp_path):
    pytest.importorskip("av")
    from test_video import write_video

    clip = write_video(tmp_path / "clip.mp4", n_frames=3)
    question = {"type": "text", "text": "what happens?"}
    ours = [{"role": "user", "content": [{"type": "video", "video": str(clip)}, question]}]
    expected = served.solo(ours, max_tokens=6)
    url = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    parts = [{"type": "video_url", "video_url": {"url": url}}, question]
    answer = chat(served, [{"role": "user", "content": parts}], max_tokens=6)
    assert answer.choices[0].message.content == expected["text"]
    assert answer.usage.prompt_tokens == expected["prompt_tokens"]


def test_image_detail_sets_the_soft_token_budget(served):
    image = random_image(200, 150, seed=2)
    question = {"type": "text", "text": "what is this?"}
    ours = [{"role": "user", "content": [{"type": "image", "image": image}, question]}]
    lengths = set()
    for detail, budget in (("low", 70), ("auto", 280)):
        expected = served.solo(ours, max_tokens=4, max_soft_tokens=budget)
        lengths.add(expected["prompt_tokens"])
        url = {"url": png_data_url(image), "detail": detail}
        parts = [{"type": "image_url", "image_url": url}, question]
        answer = chat(served, [{"role": "user", "content": parts}], max_tokens=4)
        assert answer.usage.prompt_tokens == expected["prompt_tokens"]
        assert answer.choices[0].message.content == expected["text"]
    assert len(lengths) == 2  # the two budgets give the image different token counts


def wav_bytes(wave: np.ndarray) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, wave, 16000, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def test_input_audio_and_transcription(served):
    from mlx_gemma4.transcription import transcribe_wave

    wave = tones(1.5)
    question = {"type": "text", "text": "what is this?"}
    ours = [{"role": "user", "content": [{"type": "audio", "audio": wave}, question]}]
    expected = served.solo(ours, max_tokens=8)
    audio = {"data": base64.b64encode(wav_bytes(wave)).decode(), "format": "wav"}
    parts = [{"type": "input_audio", "input_audio": audio}, question]
    answer = chat(served, [{"role": "user", "content": parts}], max_tokens=8)
    assert answer.choices[0].message.content == expected["text"]

    from mlx_gemma4.options import SamplingOptions

    reference = transcribe_wave(
        *served.reference, wave, "tones.wav", sampling=SamplingOptions(max_tokens=12)
    )
    result = served.client.audio.transcriptions.create(
        model="tiny", file=("tones.wav", wav_bytes(wave))
    )
    assert result.text == reference.text
    srt = served.post(
        "/v1/audio/transcriptions",
        files={"file": ("tones.wav", wav_bytes(wave))},
        data={"response_format": "srt"},
    )
    assert srt.status_code == 200 and srt.text.startswith("1\n00:00:00,000 --> 00:00:01,500")
    english = transcribe_wave(
        *served.reference,
        wave,
        "tones.wav",
        translate_to="English",
        sampling=SamplingOptions(max_tokens=12),
    )
    translated = served.post(
        "/v1/audio/translations", files={"file": ("tones.wav", wav_bytes(wave))}
    )
    assert translated.json() == {"text": english.text}


# --------------------------------------------------------------------------- security, errors


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    return body["error"]


def test_requests_without_the_api_key_get_401(served):
    for key in (None, "wrong"):
        response = served.post("/v1/chat/completions", key=key, json={"messages": HELLO})
        assert response.status_code == 401
        assert error_of(response)["type"] == "authentication_error"
    wrong = openai.OpenAI(base_url=served.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(served.url + "/health").status_code == 200  # open: no secrets there


@pytest.mark.parametrize(
    "body, status, says",
    [
        (b'{"messages": [', 400, "not valid JSON"),
        ({"messages": HELLO, "temperature": "hot"}, 400, "temperature"),
        ({"messages": []}, 400, "messages"),
        ({}, 400, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
        ({"messages": HELLO, "n": 2}, 400, "n"),
        ({"messages": HELLO, "max_tokens": 0}, 400, "max_tokens"),
        ({"messages": HELLO, "logprobs": True}, 400, "logprobs: not offered"),
        ({"messages": HELLO, "frequency_penalty": 0.5}, 400, "use repetition_penalty"),
        ({"messages": HELLO, "max_tokens": 5000}, 400, "context of 4096 tokens"),
        ({"messages": HELLO, "tool_choice": "required"}, 400, "no tools are given"),
        (
            {"messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {}}},
            400,
            "response_format.json_schema.schema",
        ),
        (b"x" * (2**20 + 1), 413, "larger than the server's limit"),
        (iter([b"x" * 2**19] * 3), 413, "larger than the server's limit"),
    ],
    ids=[
        "malformed json",
        "wrong type",
        "no messages",
        "empty body",
        "bad role",
        "n",
        "max_tokens 0",
        "logprobs",
        "frequency_penalty",
        "over-long",
        "tool_choice without tools",
        "schema missing",
        "body too large",
        "chunked body too large",
    ],
)
def test_bad_requests_get_an_openai_error(served, body, status, says):
    kwargs = {"json": body} if isinstance(body, dict) else {"content": body}
    response = served.post(
        "/v1/chat/completions", headers={"Content-Type": "application/json"}, **kwargs
    )
    assert response.status_code == status, response.text
    error = error_of(response)
    assert says in error["message"]
    assert "\n" not in error["message"]


def image_request(url: str) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]
    return {"messages": [{"role": "user", "content": parts}], "max_tokens": 2}


def test_media_that_may_not_be_read_is_refused(served, tmp_path):
    secret = tmp_path / "secret.png"
    random_image(8, 8).save(secret)
    big = base64.b64encode(b"\0" * (2**19 + 1024)).decode()
    cases = [
        ("https://example.com/cat.png", "remote URLs are not fetched"),
        (str(tmp_path / "sub" / ".." / "secret.png"), "'..' is not allowed"),
        ("secret.png", "must be absolute"),
        (str(tmp_path / "missing.png"), "no such image file"),
        ("data:image/png;base64,@@@", "not valid base64"),
        ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "not a readable"),
        ("data:image/png;base64," + big, "limit"),
        ("gopher://x", "unsupported URL scheme"),
        (png_data_url(random_image(200, 151)), "pixel limit"),
    ]
    for url, says in cases:
        response = served.post("/v1/chat/completions", json=image_request(url))
        assert response.status_code == 400, (url, response.text)
        error = error_of(response)
        assert says in error["message"], (url, error)
        assert "messages[0].content[0]" in error["message"]


# --------------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def lasting(served):
    """A prompt the tiny model answers at length, for requests that must still be running
    when a test acts on them: HELLO's answer ends after 9 tokens, within a second or two of a
    loaded machine."""
    messages = [{"role": "user", "content": "hello there, tell me about the sea and the sky"}]
    assert served.solo(messages, max_tokens=200)["finish_reason"] == "length"
    return messages


def test_a_client_that_leaves_cancels_its_sequence(served, lasting):
    before = served.health()["cancelled"]
    stream = served.client.chat.completions.create(
        model="tiny", messages=lasting, max_tokens=3000, temperature=0, stream=True
    )
    for _, _chunk in zip(range(4), stream, strict=False):
        pass
    stream.close()
    deadline = time.monotonic() + 20
    while served.health()["cancelled"] == before:
        assert time.monotonic() < deadline, "the sequence was not cancelled"
        time.sleep(0.05)
    assert served.health()["running"] == 0
    # a client that gives up on a whole (not streamed) answer cancels it too
    body = {"messages": lasting, "max_tokens": 3000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        served.post("/v1/chat/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 20
    while served.health()["cancelled"] == before + 1:
        assert time.monotonic() < deadline, "the whole answer was not cancelled"
        time.sleep(0.05)
    assert served.health()["running"] == 0


def wait_for(served: Served, what: str, condition) -> dict:
    deadline = time.monotonic() + 20
    while not condition(health := served.health()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return health


def test_a_client_that_leaves_while_waiting_for_a_slot_is_dropped(served, lasting):
    before = served.health()["cancelled"]
    streams = [  # the fixture's 16 slots, all taken
        served.client.chat.completions.create(
            model="tiny", messages=lasting, max_tokens=3000, temperature=0, stream=True
        )
        for _ in range(16)
    ]
    try:
        for stream in streams:
            next(iter(stream))
        body = {"messages": HELLO, "max_tokens": 4, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            served.post("/v1/chat/completions", json=body, timeout=1.0)
        health = wait_for(
            served, "the waiting request was not dropped", lambda h: h["cancelled"] > before
        )
        assert health["waiting"] == 0 and health["running"] == 16
    finally:
        for stream in streams:
            stream.close()
    wait_for(served, "the streams were not cancelled", lambda h: h["running"] == 0)
    assert served.health()["cancelled"] == before + 17


def test_32_concurrent_clients_all_get_their_own_answers(served):
    prompts = [
        [{"role": "user", "content": f"question number {i} " * (1 + i % 3)}] for i in range(8)
    ]
    expected = [served.solo(p, max_tokens=6 + i % 4)["text"] for i, p in enumerate(prompts)]
    client = openai.AsyncOpenAI(
        base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=120
    )

    async def ask(i: int, stream: bool) -> tuple[int, str, str | None]:
        settings = dict(model="tiny", messages=prompts[i], max_tokens=6 + i % 4, temperature=0)
        if not stream:
            answer = await client.chat.completions.create(**settings)
            return i, answer.choices[0].message.content, answer.choices[0].finish_reason
        text, finish = "", None
        async for chunk in await client.chat.completions.create(**settings, stream=True):
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        return i, text, finish

    async def one_client(c: int) -> list[tuple[int, str, str | None]]:
        # half the clients stream; each asks about three different prompts in turn
        return [await ask((c + r) % len(prompts), stream=c % 2 == 1) for r in range(3)]

    async def everyone():
        try:
            return await asyncio.wait_for(
                asyncio.gather(*(one_client(c) for c in range(32))), timeout=180
            )
        finally:
            await client.close()

    start = time.monotonic()
    results = asyncio.run(everyone())
    elapsed = time.monotonic() - start
    answers = [answer for per_client in results for answer in per_client]
    assert len(answers) == 96
    for i, text, finish in answers:
        assert text == expected[i]
        assert finish in ("stop", "length")
    assert elapsed < 180
    assert served.health()["running"] == 0


def test_a_template_that_refuses_the_conversation_is_a_request_error(chat_checkpoint):
    """A checkpoint's own chat template may raise (Jinja's raise_exception): one line, a 400."""
    from mlx_gemma4.engine import BatchGenerator
    from mlx_gemma4.errors import ServerRequestError
    from mlx_gemma4.server.driver import EngineDriver, Job, ServerStopping

    refusing = "{{ raise_exception('Conversation roles must alternate') }}"
    model, processor = load(chat_checkpoint("dense", chat_template=refusing)[0])
    driver = EngineDriver(model, lambda: BatchGenerator(model, processor))
    driver.start()
    loop = asyncio.new_event_loop()
    try:
        refused = driver.submit(Job(HELLO, {}, loop))
        with pytest.raises(ServerRequestError, match="cannot render them: Conversation roles"):
            refused.result(timeout=60)
        assert driver.stats() == {"running": 0, "waiting": 0, "cancelled": 0}
        driver.stop()
        with pytest.raises(ServerStopping):  # answered at once, never left waiting
            driver.submit(Job(HELLO, {}, loop)).result(timeout=5)
    finally:
        driver.stop()
        loop.close()


def test_the_server_listens_only_once_its_engine_runs(chat_checkpoint):
    """The app's startup (after which uvicorn listens, /health included) waits for the engine
    thread's generator: a split model's is made only once every rank has loaded, so a client
    that can connect is never left waiting on a follower that is still loading. A stop that
    comes first ends the wait."""
    from mlx_gemma4.engine import BatchGenerator
    from mlx_gemma4.server.driver import EngineDriver

    model, processor = load(chat_checkpoint("dense")[0])
    for stop_first in (False, True):
        go_on = threading.Event()

        def slow_generator(go_on=go_on):
            go_on.wait(60)  # a generator that takes as long as the test says
            return BatchGenerator(model, processor)

        driver = EngineDriver(model, slow_generator)
        driver.start()
        waited = threading.Thread(target=driver.wait_until_running)
        waited.start()
        try:
            waited.join(0.5)
            assert waited.is_alive()
            if stop_first:
                driver.stop_soon()
            else:
                go_on.set()
            waited.join(10)
            assert not waited.is_alive()
            assert (driver.generator is None) == stop_first
        finally:
            go_on.set()
            driver.stop()

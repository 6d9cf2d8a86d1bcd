"""The chat page (GET /) in headless Chromium, against a real `gemma4 serve` on loopback.

Debian's `chromium` and `chromium-driver` drive it through Selenium; the tests skip, saying why,
only when no browser, driver or Selenium can be found (.ci/run installs them)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import time
import urllib.request

import pytest
from conftest import random_image, start_serve

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

BROWSER = next(filter(None, map(shutil.which, ["chromium", "chromium-browser"])), None)
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    BROWSER is None or DRIVER is None,
    reason="no headless browser: install Debian's chromium and chromium-driver "
    "(apt-get install -y chromium chromium-driver)",
)
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def checkpoint(chat_checkpoint):
    folder, _reference = chat_checkpoint("multimodal")
    return folder


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """`gemma4 serve` on a free loopback port, ready (GET /health answers 200)."""
    log = (tmp_path_factory.mktemp("serve") / "server.log").open("w+")
    process, url = start_serve(checkpoint, stdout=log, stderr=subprocess.STDOUT, timeout=60)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for argument in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]:
        options.add_argument(argument)
    options.add_argument("--window-size=420,860")  # a phone-width window
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, server):
    """The chat page, fresh, greedy and bounded: temperature 0 and MAX_TOKENS set in Settings."""
    browser.get(f"{server}/")
    browser.execute_script("localStorage.clear(); sessionStorage.clear();")
    browser.get(f"{server}/")
    browser.find_element(By.ID, "settings-button").click()
    browser.find_element(By.ID, "temperature").send_keys("0")
    browser.find_element(By.ID, "max-tokens").send_keys(str(MAX_TOKENS))
    return browser


@pytest.fixture(scope="module")
def loaded(checkpoint):
    from mlx_gemma4 import load

    return load(checkpoint)


def greedy_answer(loaded, messages: list[dict], **options) -> str:
    from mlx_gemma4 import stream_generate

    model, processor = loaded
    responses = stream_generate(
        model, processor, messages, max_tokens=MAX_TOKENS, temperature=0, **options
    )
    return "".join(r.text for r in responses)


def say(page, text: str) -> None:
    box = page.find_element(By.ID, "prompt")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def wait_for_answer(page, number: int, state: str = "done", timeout: float = 30) -> str:
    """The `number`-th answer (from 1) once its state is `state`, as the conversation keeps it
    (what the next turn sends back); its bubble must show that text rendered as Markdown."""
    selector = ".message.assistant[data-state]"

    def settled(driver):
        answers = driver.find_elements(By.CSS_SELECTOR, selector)
        return len(answers) >= number and answers[number - 1].get_attribute("data-state") != (
            "streaming"
        )

    WebDriverWait(page, timeout).until(settled)
    answer = page.find_elements(By.CSS_SELECTOR, selector)[number - 1]
    errors = answer.find_elements(By.CSS_SELECTOR, ".error")
    assert answer.get_attribute("data-state") == state, [e.text for e in errors]
    if state == "error":
        return ""
    kept = page.execute_script("return state.messages.at(-1)")
    assert kept["role"] == "assistant"
    bubbles = answer.find_elements(By.CSS_SELECTOR, ".bubble")  # none for an empty answer
    shown = bubbles[0].get_attribute("textContent") if bubbles else ""
    rendered = page.execute_script(
        "return renderMarkdown(arguments[0]).textContent", kept["content"]
    )
    assert shown == rendered
    return kept["content"]


def test_typed_messages_stream_the_greedy_answer_and_keep_the_conversation(page, loaded):
    model = page.find_element(By.ID, "model")  # the name /v1/models gives, shown in the bar
    WebDriverWait(page, 10).until(lambda _: model.get_attribute("textContent"))
    say(page, "Hello there, how are you?")
    first = wait_for_answer(page, 1)
    conversation = [{"role": "user", "content": "Hello there, how are you?"}]
    assert first == greedy_answer(loaded, conversation)
    assert first  # the random model says something within MAX_TOKENS

    # Shift+Enter is a new line, not a send; the second turn carries the first
    box = page.find_element(By.ID, "prompt")
    box.send_keys("Tell me more")
    box.send_keys(Keys.SHIFT, Keys.ENTER)
    box.send_keys("please.")
    assert len(page.find_elements(By.CSS_SELECTOR, ".message.user")) == 1
    box.send_keys(Keys.ENTER)
    second = wait_for_answer(page, 2)
    conversation += [
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Tell me more\nplease."},
    ]
    assert second == greedy_answer(loaded, conversation)
    meta = page.find_elements(By.CSS_SELECTOR, ".message.assistant .meta")[-1].text
    assert "prompt tokens" in meta  # usage came with the stream


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    random_image(96, 64, seed=seed).save(buffer, "PNG")
    return buffer.getvalue()


DROP = """
const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
const transfer = new DataTransfer();
transfer.items.add(new File([bytes], "photo.png", {type: "image/png"}));
document.querySelector("#log").dispatchEvent(
  new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
"""


def test_a_dropped_image_is_shown_and_answered_about(page, loaded):
    from PIL import Image

    image = png_bytes(seed=3)
    page.execute_script(DROP, base64.b64encode(image).decode())
    WebDriverWait(page, 10).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#attachments img")
    )  # a thumbnail waits beside the box
    say(page, "What is in this picture?")
    answer = wait_for_answer(page, 1)
    thumbnail = page.find_element(By.CSS_SELECTOR, ".message.user .images img")
    assert thumbnail.get_attribute("src") == "data:image/png;base64," + base64.b64encode(
        image
    ).decode("ascii")
    assert not page.find_elements(By.CSS_SELECTOR, "#attachments img")  # sent, so cleared
    question = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.open(io.BytesIO(image))},
                {"type": "text", "text": "What is in this picture?"},
            ],
        }
    ]
    assert answer == greedy_answer(loaded, question)
    # the same words without the image get another answer: the image reached the model
    words_only = [{"role": "user", "content": "What is in this picture?"}]
    assert answer != greedy_answer(loaded, words_only)


def test_a_refused_request_shows_the_servers_error_and_the_chat_goes_on(page, loaded):
    temperature = page.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("5")  # over OpenAI's limit of 2: the server answers 400
    say(page, "Hello")
    wait_for_answer(page, 1, state="error")
    alert = page.find_element(By.CSS_SELECTOR, "[role=alert]").text
    assert alert.startswith("400") and "temperature" in alert
    assert page.find_element(By.ID, "prompt").get_attribute("value") == "Hello"  # kept to retry

    temperature.clear()
    temperature.send_keys("0")
    page.find_element(By.ID, "prompt").send_keys(Keys.ENTER)
    answer = wait_for_answer(page, 2)
    # the failed turn left the conversation: this is a first turn
    assert answer == greedy_answer(loaded, [{"role": "user", "content": "Hello"}])


def server_stats(server: str) -> dict:
    with urllib.request.urlopen(f"{server}/health", timeout=5) as response:
        return json.loads(response.read())


def test_stop_ends_the_answer_the_server_drops_the_request_and_new_chat_forgets(page, server):
    page.find_element(By.ID, "max-tokens").clear()
    page.find_element(By.ID, "max-tokens").send_keys("3000")
    say(page, "Write a very long story.")
    stop = page.find_element(By.ID, "stop")
    WebDriverWait(page, 30).until(
        lambda d: d.find_element(By.CSS_SELECTOR, ".message.assistant .bubble").get_attribute(
            "textContent"
        )
    )
    stop.click()
    answer = wait_for_answer(page, 1, state="stopped")
    assert answer
    assert page.find_element(By.ID, "send").is_displayed() and not stop.is_displayed()
    deadline = time.monotonic() + 10
    while server_stats(server)["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server_stats(server)["running"] == 0
    assert page.execute_script("return state.messages.length") == 2  # the partial answer stays

    page.find_element(By.ID, "new-chat").click()
    assert page.execute_script("return state.messages.length") == 0
    assert not page.find_elements(By.CSS_SELECTOR, ".message")
    assert page.find_element(By.ID, "empty").is_displayed()


MARKDOWN = """## Title
Some **bold**, *italic* and `code`, a [link](https://example.org/a) and
[another](javascript:alert(1)).

- one
- two

3. three

```html
<script>alert(1)</script>
```"""


def test_answers_render_markdown_as_text_never_as_html(page):
    html = page.execute_script(
        "const box = document.createElement('div');"
        "box.append(renderMarkdown(arguments[0]));"
        "return box.innerHTML;",
        MARKDOWN,
    )
    assert html.startswith("<h4>Title</h4><p>Some <strong>bold</strong>, <em>italic</em> and ")
    assert '<code>code</code>, a <a href="https://example.org/a" target="_blank"' in html
    assert "<br>[another](javascript:alert(1)).</p>" in html  # only http(s) links become links
    assert "<ul><li>one</li><li>two</li></ul>" in html
    assert '<ol start="3"><li>three</li></ol>' in html
    assert (
        '<pre><code data-language="html">&lt;script&gt;alert(1)&lt;/script&gt;</code></pre>' in html
    )


def test_the_thinking_switch_turns_thinking_on_for_the_next_turns(page, loaded):
    page.find_element(By.ID, "thinking").click()
    say(page, "Hello")
    answer = wait_for_answer(page, 1)
    question = [{"role": "user", "content": "Hello"}]
    assert answer == greedy_answer(loaded, question, enable_thinking=True)
    assert answer != greedy_answer(loaded, question)
    page.refresh()  # the switch is remembered
    assert page.find_element(By.ID, "thinking").is_selected()


ANSWER_VIEW = """
const view = new AnswerView();
view.addThought("Let me see. ");
view.addThought("Two and two.");
view.addText("It is **4**.");
view.finish("done", "2 generated");
return [view.message.outerHTML, view.thoughts.open];
"""


def test_thoughts_stream_into_a_collapsed_details_above_the_answer(page):
    # the tiny random model never thinks aloud, so the view is driven directly
    html, opened = page.execute_script(ANSWER_VIEW)
    assert not opened
    assert (
        '<details class="thoughts"><summary>Thoughts</summary>'
        '<div class="thoughts-text">Let me see. Two and two.</div></details>'
        '<div class="bubble"><p>It is <strong>4</strong>.</p></div>'
        '<div class="meta">2 generated</div>'
    ) in html


SSE = """
const done = arguments[arguments.length - 1];
const chunks = arguments[0];
const body = new ReadableStream({
  start(controller) {
    const encoder = new TextEncoder();
    for (const chunk of chunks) controller.enqueue(encoder.encode(chunk));
    controller.close();
  },
});
(async () => {
  const events = [];
  for await (const event of serverSentEvents(body)) events.push(event);
  done(events);
})();
"""


def test_the_event_stream_reader_takes_events_split_anywhere(page):
    stream = ': ping\r\n\r\ndata: {"a": 1}\r\n\r\nevent: error\ndata: x\ndata: y\n\ndata: [DONE]'
    for cut in range(len(stream) + 1):  # "\r\n" split between reads included
        chunks = [stream[:cut], stream[cut:]]
        events = page.execute_async_script(SSE, chunks)
        assert events == [
            {"event": "message", "data": '{"a": 1}'},
            {"event": "error", "data": "x\ny"},
            {"event": "message", "data": "[DONE]"},
        ], cut

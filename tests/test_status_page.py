"""The status page at ``/``: its routes over real HTTP, then the page itself in a real
headless browser (Debian's chromium driven by selenium) against a running
three-node swarm: every peer drawn and listed, a job shown with where it ran,
and a screenshot taken.

The nodes serve on real loopback sockets on the test's trio loop; the browser is
another process, driven from a worker thread so that the loop keeps serving it.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio
from conftest import NodeFactory

from bootstrap.table import live_peers
from node.daemon import Node
from node.gateway import GatewayConfig
from node.membership.config import MembershipConfig
from protocols import Param, Tensor, Value
from runners.base import TEXT, ModelInfo, Outputs, OutputSpec, Runner, TensorSpec, check_inputs
from runners.errors import BadInput
from runners.fake import FakeRunner

TOKEN = "page-s3cret"
BEARER = {"authorization": f"Bearer {TOKEN}"}
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PLOTS = Path(__file__).resolve().parent.parent / "docs" / "plots"
SCREENSHOT = PLOTS / "status_page.png"
PLAYGROUND_SHOT = PLOTS / "playground.png"
# Set to write the screenshot into docs/plots as well (it changes with every run).
SAVE_ENV = "SWARM_SAVE_SCREENSHOT"
# Without the background-networking flags Chromium dials out at start, and is refused here.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,960",
)


# What a peer might put in its record to run script in the page: it must show as text.
MARKUP = '<img src=x onerror="document.title=1">'


def markup_echo() -> FakeRunner:
    """echo, announced as running on a device named with markup: peers verify a record's
    signature, not that its contents are harmless."""
    runner = FakeRunner("echo")
    runner.info = replace(runner.info, device=MARKUP)
    return runner


GENERATOR = "fake:gen:600"


class PixelReader(Runner):
    """An image classifier that names what it was given: the image's size and its mean
    colour, as its top label (so the test knows the page sent the upload's pixels)."""

    def __init__(self) -> None:
        self.info = ModelInfo(
            name="pixels",
            task="image-classification",
            runner="fake",
            device="none",
            precision="fp32",
            max_batch=1,
            inputs=(TensorSpec("image", frozenset({"uint8"}), (1, None, None, 3)),),
            outputs=(OutputSpec("labels", TEXT, (None,)), OutputSpec("scores", "float32", (1, 2))),
        )

    def check(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> None:
        check_inputs(self.info, inputs)
        if set(params) - {"top_k"}:
            raise BadInput(f"pixels: unknown params {sorted(params)}")

    async def infer(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> Outputs:
        self.check(inputs, params)
        image = inputs["image"]
        assert isinstance(image, Tensor)
        pixels = image.numpy()[0]
        red, green, blue = (round(float(c)) for c in pixels.reshape(-1, 3).mean(axis=0))
        size = f"{pixels.shape[1]}x{pixels.shape[0]}"
        labels = [f"{size} rgb({red}, {green}, {blue})", "<b>not markup</b>"]
        return {"labels": labels, "scores": Tensor.from_numpy(np.array([[0.9, 0.1]], np.float32))}


@asynccontextmanager
async def three_nodes(node_factory: NodeFactory) -> AsyncIterator[tuple[Node, Node, Node, str]]:
    """(gateway node, a, b, gateway URL): a and b serve echo, the gateway node nothing,
    so every job it takes runs elsewhere. It is linked to both before this yields.
    b also serves a slow model and a streaming one (gen: three chunks over 0.6 s),
    and sends heartbeats (with its load) twice a second; a's record carries markup
    and a's classifier reports what it was given."""
    fast = {"membership": MembershipConfig(heartbeat_s=0.5)}
    async with (
        node_factory("a", models=(), runners=[markup_echo(), PixelReader()]) as a,
        node_factory(
            "b", models=("fake:echo", "fake:slow:1200", GENERATOR), peers=(a.addrs[0],), **fast
        ) as b,
        node_factory(
            "gw", models=(), peers=(a.addrs[0], b.addrs[0]), http=GatewayConfig(token=TOKEN)
        ) as gw,
    ):
        assert gw.gateway is not None
        with trio.fail_after(20):
            while {p.peer_id for p in live_peers(gw.services.membership.table)} != {
                a.peer_id,
                b.peer_id,
            }:
                await gw.services.membership.wait_changed()
        yield gw, a, b, gw.gateway.url


async def test_view_route_guarded_and_page_served_with_a_strict_policy(
    node_factory: NodeFactory,
) -> None:
    async with (
        three_nodes(node_factory) as (gw, a, b, url),
        httpx.AsyncClient(base_url=url) as http,
    ):
        refused = await http.get("/swarm/view")
        view = (await http.get("/swarm/view", headers=BEARER)).json()
        embedded = await http.post(
            "/v1/embeddings", json={"model": "echo", "input": "hi"}, headers=BEARER
        )
        after = (await http.get("/swarm/view", headers=BEARER)).json()
        page = await http.get("/")  # the page holds no data: no token needed
        script = await http.get("/playground.js")  # nor does its playground's script
    assert refused.status_code == 401
    nodes = {n["id"]: n for n in view["nodes"]}
    assert nodes.keys() == {gw.peer_id, a.peer_id, b.peer_id}
    assert nodes[gw.peer_id]["is_self"] and view["self"] == gw.peer_id
    assert {n["health"] for n in nodes.values()} == {"live"}
    assert [m["name"] for m in nodes[a.peer_id]["models"]] == ["echo", "pixels"]
    assert nodes[a.peer_id]["hardware"]["cpu_cores"] >= 1
    assert [gw.peer_id, a.peer_id] in view["edges"] or [a.peer_id, gw.peer_id] in view["edges"]
    assert view["gateway"] == url
    assert embedded.status_code == 200
    job = after["jobs"][0]
    assert job["model"] == "echo" and job["outcome"] == "ok"
    assert job["served_by"] in {a.peer_id, b.peer_id}
    # The gateway's jobs are the node's own clients' share, shown for this node.
    assert after["shares"]["enabled"] and after["shares"]["refused"] == 0
    [mine] = [r for r in after["shares"]["peers"] if r["peer"] == "gateway"]
    assert mine["own"] and mine["served"] == 1 and mine["weight"] == 4.0
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "script-src 'sha256-" in policy and "unsafe-inline" not in policy
    assert "'self'; style-src" in policy  # scripts of this origin: the playground's
    assert "innerHTML" not in page.text  # peer data goes in as text nodes only
    assert '<script src="/playground.js" defer></script>' in page.text
    assert script.status_code == 200 and script.headers["content-type"].startswith(
        "text/javascript"
    )
    assert script.headers["x-content-type-options"] == "nosniff"
    assert "innerHTML" not in script.text and "insertAdjacentHTML" not in script.text


def browser_or_skip() -> Any:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.skip(f"{', '.join(missing)} missing: scripts/setup installs chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the test extra)")
    return webdriver


def start_browser(webdriver: Any, profile: Path) -> Any:
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def wait_for(driver: Any, what: str, check: Callable[[], Any], timeout_s: float = 30) -> Any:
    """``check()`` once it is truthy; fails saying ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if found := check():
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"the page never showed {what}; it shows:\n{driver.page_source}")
        time.sleep(0.2)


def embed(url: str, model: str, text: str) -> int:
    """One embedding through the gateway (from the browser's thread): its status code."""
    with httpx.Client(base_url=url, headers=BEARER, timeout=30) as http:
        return http.post("/v1/embeddings", json={"model": model, "input": text}).status_code


# The page redraws on every event, so elements found one call ago may be gone: read
# what is needed in one script, at one moment.
READ = """return [...document.querySelectorAll(arguments[0])].map(
    (e) => Object.assign({text: e.textContent}, e.dataset));"""


def read(driver: Any, css: str) -> list[dict[str, str]]:
    """Each element's text and data- attributes (camelCased: servedBy)."""
    return list(driver.execute_script(READ, css))


def attrs(driver: Any, css: str, name: str) -> set[str]:
    return {e[name] for e in read(driver, css) if name in e}


def job_rows(driver: Any) -> list[dict[str, str]]:
    return read(driver, "#jobs tbody tr[data-job]")


def mode(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.ID, "mode").text)


def wait_for_nodes(driver: Any, ids: set[str]) -> None:
    def shown(css: str) -> Callable[[], bool]:
        return lambda: ids <= attrs(driver, css, "peer")

    wait_for(driver, "every node in the graph", shown("#nodes [data-peer]"))
    wait_for(driver, "every node in the table", shown("#peers tbody tr[data-peer]"))


async def test_page_in_a_real_browser_shows_the_swarm_and_where_jobs_ran(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    webdriver = browser_or_skip()
    shot = tmp_path / "status_page.png"
    async with three_nodes(node_factory) as (gw, a, b, url):
        ids = {gw.peer_id, a.peer_id, b.peer_id}
        servers = {a.peer_id, b.peer_id}

        def drive() -> dict[str, Any]:
            from selenium.webdriver.common.by import By

            seen: dict[str, Any] = {}
            driver = start_browser(webdriver, tmp_path / "chromium-profile")
            try:
                # Live over the WebSocket, the token given in the URL.
                driver.get(f"{url}/?token={TOKEN}")
                wait_for_nodes(driver, ids)
                wait_for(driver, "the WebSocket up", lambda: mode(driver) == "live · WebSocket")
                for text in ("hello", "swarm"):
                    assert embed(url, "echo", text) == 200

                def served() -> list[dict[str, str]]:
                    rows = job_rows(driver)
                    return rows if sum(r["servedBy"] in servers for r in rows) >= 2 else []

                rows = wait_for(driver, "both jobs with where they ran", served)
                seen["url"] = driver.current_url
                seen["health"] = attrs(driver, "#nodes [data-peer]", "health")
                seen["edges"] = len(driver.find_elements(By.CSS_SELECTOR, "#edges line"))
                seen["rows"] = [r["text"] for r in rows]
                seen["served_by"] = [r["servedBy"] for r in rows]
                seen["self"] = driver.find_element(By.ID, "self-id").get_attribute("title")
                seen["table"] = [e["text"] for e in read(driver, "#peers tbody tr")]
                seen["markup"] = [*read(driver, "img"), {"title": driver.title}]
                seen["shares"] = wait_for(
                    driver,
                    "the gateway's share of this node",
                    lambda: [r["text"] for r in read(driver, '#shares tr[data-peer="gateway"]')],
                )
                # Slow jobs on b: its load in the graph, and the jobs running (started
                # events) before they finish.
                busy = f'#nodes [data-peer="{b.peer_id}"] text.busy'
                with ThreadPoolExecutor(4) as pool:
                    slow = [pool.submit(embed, url, "slow", f"job {i}") for i in range(4)]
                    seen["busy"] = wait_for(
                        driver,
                        "b's load",
                        lambda: sum(int(e["text"]) for e in read(driver, busy)),
                    )
                    seen["running"] = wait_for(
                        driver,
                        "jobs running",
                        lambda: "running" in attrs(driver, "#jobs tr", "outcome"),
                    )
                    driver.save_screenshot(str(shot))
                    seen["slow"] = [job.result() for job in slow]
                seen["log"] = driver.get_log("browser")

                # Without the token, the page says how to give it.
                driver.execute_script("sessionStorage.clear()")
                driver.get(f"{url}/")
                seen["no_token"] = wait_for(
                    driver,
                    "the token asked for",
                    lambda: driver.find_element(By.ID, "problem").text,
                )
                # The browser logs the refusals (401, and 403 for the socket): expected.
                seen["refusals"] = driver.get_log("browser")
                driver.get(f"{url}/?token={TOKEN}")
                wait_for_nodes(driver, ids)

                # Without WebSocket, the page polls; the token is kept for the tab.
                driver.execute_cdp_cmd(
                    "Page.addScriptToEvaluateOnNewDocument", {"source": "delete window.WebSocket;"}
                )
                driver.get(f"{url}/")
                wait_for_nodes(driver, ids)
                before = attrs(driver, "#jobs tr[data-job]", "job")
                assert embed(url, "echo", "polled") == 200
                seen["polled"] = wait_for(
                    driver,
                    "the job by polling",
                    lambda: [r["servedBy"] for r in job_rows(driver) if r["job"] not in before],
                )
                seen["polling"] = mode(driver)
                seen["log"] += driver.get_log("browser")
                return seen
            finally:
                driver.quit()

        seen = await trio.to_thread.run_sync(drive)
    assert "token" not in seen["url"]  # taken out of the address bar
    assert seen["self"] == gw.peer_id and seen["health"] == {"live"}
    assert seen["edges"] >= 2  # at least the gateway node's link to each server
    assert len(seen["rows"]) == 2 and set(seen["served_by"]) <= servers
    for row, by in zip(seen["rows"], seen["served_by"], strict=True):
        assert "echo" in row and "ok" in row and by[-6:] in row  # model, outcome, where
    # a's record's markup is shown as the text it is, and nothing of it ran.
    assert sum(MARKUP in row for row in seen["table"]) == 1
    assert seen["markup"] == [{"title": "swarm"}]
    [share] = seen["shares"]
    assert share.startswith("gateway") and "own" in share  # the node's own clients
    assert "open this page as /?token=" in seen["no_token"]
    refused = ("status of 401", "response code: 403")
    assert all(any(r in e["message"] for r in refused) for e in seen["refusals"])
    assert seen["busy"] >= 1 and seen["slow"] == [200] * 4
    assert len(seen["polled"]) == 1 and seen["polled"][0] in servers
    assert seen["polling"] == "polling every 2 s"
    # No script error and no Content-Security-Policy refusal in the page's console.
    assert [e["message"] for e in seen["log"] if e["level"] == "SEVERE"] == []
    assert shot.stat().st_size > 10_000
    if os.environ.get(SAVE_ENV):
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)


def choose(driver: Any, model: str, mode: str | None = None) -> None:
    """Pick ``model`` in the playground (as a person would, by the select) and ``mode``."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    wait_for(
        driver,
        f"{model} offered",
        lambda: model in [e["text"].split(" · ")[0] for e in read(driver, "#play-model option")],
    )
    Select(driver.find_element(By.ID, "play-model")).select_by_value(model)
    if mode is not None:
        driver.find_element(By.CSS_SELECTOR, f'#playground .modes [data-mode="{mode}"]').click()


def route(driver: Any) -> dict[str, str]:
    return read(driver, "#play-route")[0]


def two_halves(path: Path) -> None:
    """A 120x80 PNG: red on the left half, blue on the right."""
    from PIL import Image

    pixels = np.zeros((80, 120, 3), dtype=np.uint8)
    pixels[:, :60] = (200, 0, 0)
    pixels[:, 60:] = (0, 0, 200)
    Image.fromarray(pixels).save(path)


async def test_playground_chats_compares_and_classifies_in_a_real_browser(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    """A chat typed in the page is answered, streamed, by the one peer that serves the
    generator, through the gateway node (forwarded); sentences compared by a peer's
    embeddings; an uploaded image classified; where each ran shown, all as text."""
    webdriver = browser_or_skip()
    shot = tmp_path / "playground.png"
    image = tmp_path / "two-halves.png"
    two_halves(image)
    async with three_nodes(node_factory) as (gw, a, b, url):

        def drive() -> dict[str, Any]:
            from selenium.webdriver.common.by import By

            seen: dict[str, Any] = {}
            driver = start_browser(webdriver, tmp_path / "chromium-profile")
            try:
                driver.get(f"{url}/?token={TOKEN}")
                wait_for(
                    driver, "the playground", lambda: driver.find_element(By.ID, "playground")
                ).is_displayed()
                # Chat with the streaming generator, which only b serves.
                choose(driver, "gen")
                seen["mode"] = attrs(driver, "#playground .modes button.on", "mode")
                box = driver.find_element(By.ID, "chat-input")
                box.send_keys("hello, swarm")
                driver.find_element(By.ID, "chat-send").click()
                seen["streaming"] = wait_for(
                    driver,
                    "a chunk streamed in",
                    lambda: [
                        m for m in read(driver, "#chat-log .msg.assistant") if m.get("chunks")
                    ],
                )
                seen["chat"] = wait_for(
                    driver,
                    "the answer and where it ran",
                    lambda: route(driver).get("servedBy") and read(driver, "#chat-log .msg"),
                )
                seen["chat_route"] = route(driver)
                seen["classes"] = driver.execute_script(
                    "return [...document.querySelectorAll('#chat-log .msg')].map(e => e.className)"
                )
                section = driver.find_element(By.ID, "playground")
                driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", section)
                section.screenshot(str(shot))

                # Compare three sentences with echo's embeddings (a and b serve it).
                choose(driver, "echo", "compare")
                driver.find_element(By.ID, "compare-run").click()
                seen["cells"] = wait_for(
                    driver, "the cosine table", lambda: read(driver, "#cosine td.cell")
                )
                seen["compare_route"] = wait_for(
                    driver, "where it ran", lambda: route(driver).get("servedBy") and route(driver)
                )

                # Classify an uploaded image with a's classifier.
                choose(driver, "pixels")
                seen["classify_mode"] = attrs(driver, "#playground .modes button.on", "mode")
                driver.find_element(By.ID, "classify-file").send_keys(str(image))
                wait_for(
                    driver,
                    "the image read",
                    lambda: driver.find_element(By.ID, "classify-run").is_enabled(),
                )
                driver.find_element(By.ID, "classify-run").click()
                seen["labels"] = wait_for(
                    driver, "the labels", lambda: read(driver, "#classify-labels li")
                )
                seen["classify_route"] = route(driver)
                seen["bold"] = driver.find_elements(By.CSS_SELECTOR, "#classify-labels b")
                seen["log"] = driver.get_log("browser")

                # Without its script the playground stays hidden and the page works as before.
                driver.execute_cdp_cmd("Network.enable", {})
                driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/playground.js"]})
                driver.get(f"{url}/")
                wait_for_nodes(driver, {gw.peer_id, a.peer_id, b.peer_id})
                seen["without"] = driver.find_element(By.ID, "playground").is_displayed()
                return seen
            finally:
                driver.quit()

        seen = await trio.to_thread.run_sync(drive)
    assert seen["mode"] == {"chat"}  # a streaming fake: the chat is its default
    user, answer = seen["chat"]
    assert user["text"] == "hello, swarm"
    assert len(answer["text"].split()) == 3 and answer["servedBy"] == b.peer_id
    assert int(seen["streaming"][0]["chunks"]) >= 1
    assert all("streaming" not in c for c in seen["classes"])  # the stream ended
    chat_route = seen["chat_route"]
    assert (chat_route["servedBy"], chat_route["forwardedBy"]) == (b.peer_id, gw.peer_id)
    assert chat_route["attempts"] == "1"
    assert f"answered by …{b.peer_id[-6:]}" in chat_route["text"]
    assert "forwarded by this node" in chat_route["text"]

    cells = [float(c["cosine"]) for c in seen["cells"]]
    assert len(cells) == 9 and [cells[0], cells[4], cells[8]] == [1.0, 1.0, 1.0]
    assert cells[1] == cells[3] and cells[1] < 1.0  # symmetric, and not the same sentence
    assert seen["compare_route"]["servedBy"] in {a.peer_id, b.peer_id}

    assert seen["classify_mode"] == {"classify"}
    labels = [item["label"] for item in seen["labels"]]
    # The upload reached the model as RGB pixels at the size the page scaled it to.
    assert labels == ["120x80 rgb(100, 0, 100)", "<b>not markup</b>"]
    assert seen["bold"] == []  # a label's markup is shown as text
    assert "90.0 %" in seen["labels"][0]["text"]
    assert seen["classify_route"]["servedBy"] == a.peer_id

    assert [e["message"] for e in seen["log"] if e["level"] == "SEVERE"] == []
    assert seen["without"] is False
    assert shot.stat().st_size > 10_000
    if os.environ.get(SAVE_ENV):
        PLAYGROUND_SHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, PLAYGROUND_SHOT)


@pytest.mark.slow
async def test_playground_chats_with_a_real_smollm2_peer(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    """SmolLM2-135M-Instruct (OpenVINO GenAI) on a peer: the chat goes as messages
    (the model's template renders them), streamed token by token into the page."""
    from runners.openvino_genai import MODEL_NAME as SMOLLM2
    from runners.openvino_genai import OpenVINOGenAIRunner

    webdriver = browser_or_skip()
    models = tmp_path / "smollm2-models"
    converting = OpenVINOGenAIRunner(models)  # the GGUF to IR, once (~25 s on 2 cores)
    await converting.load()
    await converting.close()
    async with (
        node_factory("llm", models=(), runners=[OpenVINOGenAIRunner(models)]) as llm,
        node_factory("gw", models=(), peers=(llm.addrs[0],), http=GatewayConfig(token=TOKEN)) as gw,
    ):
        assert gw.gateway is not None
        url = gw.gateway.url

        def drive() -> dict[str, Any]:
            from selenium.webdriver.common.by import By

            driver = start_browser(webdriver, tmp_path / "chromium-profile")
            try:
                driver.get(f"{url}/?token={TOKEN}")
                choose(driver, SMOLLM2)
                driver.find_element(By.ID, "chat-input").send_keys("What is the capital of France?")
                driver.find_element(By.ID, "chat-send").click()
                wait_for(driver, "the answer", lambda: route(driver).get("servedBy"), 120)
                return {
                    "answer": read(driver, "#chat-log .msg.assistant")[0],
                    "route": route(driver),
                    "log": driver.get_log("browser"),
                }
            finally:
                driver.quit()

        seen = await trio.to_thread.run_sync(drive)
    answer = seen["answer"]
    assert "Paris" in answer["text"] and int(answer["chunks"]) >= 2  # streamed
    assert (seen["route"]["servedBy"], seen["route"]["forwardedBy"]) == (llm.peer_id, gw.peer_id)
    assert [e["message"] for e in seen["log"] if e["level"] == "SEVERE"] == []

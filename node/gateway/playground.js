"use strict";
// The status page's playground: try any model the swarm serves, and see which peer
// answered and by which route. A script of its own (served by page.py, allowed by the
// page's Content-Security-Policy as 'self'): the page works without it.
//
// Jobs go over a WebSocket of its own (/ws/{id}, node/gateway/ws.py), streamed where the
// model streams; models come from /swarm/view, the page's snapshot. Model names, peer ids
// and answers are remote input: they are only ever set as text (textContent, attributes),
// never parsed as markup.
(() => {
  const VIEW_EVERY_MS = 10000;
  const MAX_SIDE = 256;        // an image is scaled to this longest side before it is sent
  const MIN_SIDE = 32;         // the classifiers' smallest side
  const TOP_K = 5;
  const MAX_NEW_TOKENS = 128;
  const MAX_SENTENCES = 16;
  const MODES = ["chat", "compare", "classify"];

  const play = {
    models: new Map(), self: null, mode: null, socket: null, opening: null,
    pending: new Map(), history: [], busy: false, pixels: null, counter: 0,
  };

  function token() {
    try { return sessionStorage.getItem("swarm-token") || ""; } catch (err) { return ""; }
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined && value !== false) node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(typeof child === "string" || typeof child === "number"
        ? document.createTextNode(String(child)) : child);
    }
    return node;
  }

  const $ = (id) => document.getElementById(id);
  const shortId = (id) => (typeof id === "string" && id.length > 10 ? "…" + id.slice(-6) : String(id || "?"));

  // -- the models the swarm serves ------------------------------------------------

  async function loadModels() {
    const headers = token() ? { Authorization: "Bearer " + token() } : {};
    let view;
    try {
      const response = await fetch("/swarm/view", { headers, cache: "no-store" });
      if (!response.ok) return;
      view = await response.json();
    } catch (err) {
      return;  // the page says what is wrong with the gateway; try again later
    }
    const found = new Map();
    for (const node of Array.isArray(view.nodes) ? view.nodes : []) {
      if (node.health !== "live") continue;
      for (const m of Array.isArray(node.models) ? node.models : []) {
        if (!m || typeof m.name !== "string" || !m.name) continue;
        const entry = found.get(m.name) || { name: m.name, task: String(m.task || ""),
          streams: m.streams === true, inputs: Array.isArray(m.inputs) ? m.inputs.map(String) : [],
          peers: [] };
        entry.peers.push(node.id);
        found.set(m.name, entry);
      }
    }
    play.self = typeof view.self === "string" ? view.self : null;
    play.models = found;
    renderModels();
  }

  function renderModels() {
    const select = $("play-model");
    const chosen = select.value;
    const names = [...play.models.keys()].sort();
    select.replaceChildren(...names.map((name) => {
      const m = play.models.get(name);
      return el("option", { value: name }, m.task ? name + " · " + m.task : name);
    }));
    if (!names.length) {
      select.append(el("option", { value: "" }, "no model served yet"));
      $("play-about").textContent = "";
      return;
    }
    const keep = names.includes(chosen);
    select.value = keep ? chosen : names[0];
    if (!keep) setMode(defaultMode(play.models.get(select.value)));
    about();
  }

  function defaultMode(model) {
    if (!model) return "chat";
    if (model.task === "image-classification" || model.inputs.includes("image")) return "classify";
    if (model.task === "embeddings" || model.task === "embed") return "compare";
    return "chat";
  }

  function about() {
    const model = play.models.get($("play-model").value);
    if (!model) return;
    const n = model.peers.length;
    $("play-about").textContent = "served by " + n + (n === 1 ? " node" : " nodes")
      + (model.streams ? " · streams" : "");
  }

  function setMode(mode) {
    play.mode = MODES.includes(mode) ? mode : "chat";
    for (const button of document.querySelectorAll("#playground .modes button")) {
      button.classList.toggle("on", button.dataset.mode === play.mode);
    }
    for (const panel of document.querySelectorAll("#playground .play-panel")) {
      panel.hidden = panel.dataset.panel !== play.mode;
    }
  }

  // -- jobs over the WebSocket ----------------------------------------------------------

  function clientId() {
    const bytes = new Uint8Array(8);
    crypto.getRandomValues(bytes);
    return "play-" + [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
  }

  function connect() {
    if (play.socket && play.socket.readyState === WebSocket.OPEN) return Promise.resolve(play.socket);
    if (play.opening) return play.opening;
    play.opening = new Promise((resolve, reject) => {
      const scheme = location.protocol === "https:" ? "wss:" : "ws:";
      const query = token() ? "?token=" + encodeURIComponent(token()) : "";
      const socket = new WebSocket(scheme + "//" + location.host + "/ws/" + clientId() + query);
      socket.onopen = () => { play.socket = socket; play.opening = null; resolve(socket); };
      socket.onerror = () => { play.opening = null; reject(new Error("the WebSocket did not open")); };
      socket.onclose = () => {
        if (play.socket === socket) play.socket = null;
        for (const job of play.pending.values()) job.reject(new Error("the connection closed"));
        play.pending.clear();
      };
      socket.onmessage = (message) => {
        let frame;
        try { frame = JSON.parse(message.data); } catch (err) { return; }
        const job = frame && play.pending.get(frame.id);
        if (!job) return;
        if (frame.type === "chunk") job.chunk(frame.outputs || {});
        else if (frame.type === "result") { play.pending.delete(frame.id); job.resolve(frame); }
        else if (frame.type === "error") {
          play.pending.delete(frame.id);
          job.reject(new Error(String(frame.code || "ERROR") + ": " + String(frame.message || "")));
        }
      };
    });
    return play.opening;
  }

  async function infer(model, inputs, params, stream, chunk) {
    const socket = await connect();
    const id = "p" + ++play.counter;
    const started = performance.now();
    const answer = new Promise((resolve, reject) => {
      play.pending.set(id, { resolve, reject, chunk: chunk || (() => {}) });
    });
    socket.send(JSON.stringify({ type: "inference", id, model: model.name, inputs, params, stream }));
    const frame = await answer;
    return { outputs: frame.outputs || {}, meta: frame.meta || {}, ms: performance.now() - started };
  }

  // -- where it ran -----------------------------------------------------------------

  function showRoute(meta, ms) {
    const line = $("play-route");
    const by = typeof meta.served_by === "string" ? meta.served_by : "";
    const via = typeof meta.forwarded_by === "string" ? meta.forwarded_by : "";
    const attempts = Number.isFinite(meta.attempts) ? meta.attempts : 1;
    line.dataset.servedBy = by;
    line.dataset.forwardedBy = via;
    line.dataset.attempts = String(attempts);
    const who = (id) => el("span", { class: "id", title: id }, id === play.self ? "this node" : shortId(id));
    const parts = ["answered by ", by ? who(by) : "?"];
    if (via) parts.push(" · forwarded by ", who(via));
    else parts.push(by === play.self ? " · run here" : "");
    parts.push(" · " + attempts + (attempts === 1 ? " attempt" : " attempts"));
    if (Number.isFinite(meta.chunks)) parts.push(" · " + meta.chunks + " chunks");
    parts.push(" · " + ms.toFixed(0) + " ms");
    line.replaceChildren(...parts);
  }

  function showFailure(err) {
    const line = $("play-route");
    line.dataset.servedBy = "";
    line.replaceChildren(el("span", { class: "play-error" }, String(err.message || err)));
  }

  async function guarded(button, work) {
    if (play.busy) return;
    const model = play.models.get($("play-model").value);
    if (!model) return showFailure(new Error("no model to ask yet"));
    play.busy = true;
    button.disabled = true;
    try {
      await work(model);
    } catch (err) {
      showFailure(err);
    } finally {
      play.busy = false;
      button.disabled = false;
    }
  }

  // -- chat -------------------------------------------------------------------------

  function chat() {
    const input = $("chat-input");
    const text = input.value.trim();
    if (!text) return;
    guarded($("chat-send"), async (model) => {
      input.value = "";
      const log = $("chat-log");
      play.history.push({ role: "user", content: text });
      log.append(el("div", { class: "msg user" }, text));
      const bubble = el("div", { class: "msg assistant streaming", "data-model": model.name });
      log.append(bubble);
      log.scrollTop = log.scrollHeight;
      // A chat model takes the whole conversation (its template renders it); any other
      // model is given the last message as its text.
      const inputs = model.inputs.includes("messages")
        ? { messages: JSON.stringify(play.history) } : text;
      const params = model.task === "text-generation" ? { max_new_tokens: MAX_NEW_TOKENS } : {};
      let streamed = "";
      try {
        const answer = await infer(model, inputs, params, model.streams, (outputs) => {
          if (typeof outputs.text === "string") {
            streamed += outputs.text;
            bubble.textContent = streamed;
            bubble.dataset.chunks = String(Number(bubble.dataset.chunks || 0) + 1);
            log.scrollTop = log.scrollHeight;
          }
        });
        const text = typeof answer.outputs.text === "string" && answer.outputs.text
          ? answer.outputs.text : streamed;
        bubble.textContent = text;
        bubble.dataset.servedBy = String(answer.meta.served_by || "");
        play.history.push({ role: "assistant", content: text });
        showRoute(answer.meta, answer.ms);
      } catch (err) {
        play.history.pop();
        bubble.classList.add("failed");
        bubble.textContent = String(err.message || err);
        throw err;
      } finally {
        bubble.classList.remove("streaming");
      }
    });
  }

  // -- comparing embeddings -----------------------------------------------------------

  function rows(tensor) {
    // A tensor as the WebSocket gives it: {dtype, shape, data} with data nested.
    if (!tensor || !Array.isArray(tensor.data)) throw new Error("the model gave no 'embedding'");
    return tensor.data.map((row) => (Array.isArray(row) ? row.map(Number) : [Number(row)]));
  }

  function cosine(a, b) {
    let dot = 0, na = 0, nb = 0;
    for (let i = 0; i < a.length; i++) { dot += a[i] * b[i]; na += a[i] * a[i]; nb += b[i] * b[i]; }
    return na && nb ? dot / Math.sqrt(na * nb) : 0;
  }

  function shade(value) {
    const share = Math.max(0, Math.min(1, value));
    return `hsl(225, 60%, ${Math.round(97 - 40 * share)}%)`;
  }

  function compare() {
    guarded($("compare-run"), async (model) => {
      const sentences = $("compare-input").value.split("\n").map((s) => s.trim()).filter(Boolean)
        .slice(0, MAX_SENTENCES);
      if (sentences.length < 2) throw new Error("give at least two sentences, one a line");
      const answer = await infer(model, sentences, {}, false);
      const vectors = rows(answer.outputs.embedding);
      if (vectors.length !== sentences.length) throw new Error("one embedding per sentence was expected");
      const head = el("tr", {}, el("th", {}, "sentence"),
        ...sentences.map((_, j) => el("th", { class: "num" }, "#" + (j + 1))));
      $("cosine").tHead.replaceChildren(head);
      $("cosine").tBodies[0].replaceChildren(...sentences.map((sentence, i) => el("tr", {},
        el("td", {}, "#" + (i + 1) + " " + sentence),
        ...sentences.map((_, j) => {
          const value = cosine(vectors[i], vectors[j]);
          const cell = el("td", { class: "cell", "data-cosine": value.toFixed(4) }, value.toFixed(3));
          cell.style.background = shade(value);
          return cell;
        }))));
      showRoute(answer.meta, answer.ms);
    });
  }

  // -- classifying an image --------------------------------------------------------------

  async function pickImage() {
    const file = $("classify-file").files[0];
    play.pixels = null;
    $("classify-run").disabled = true;
    $("classify-labels").replaceChildren();
    if (!file) return;
    let bitmap;
    try {
      bitmap = await createImageBitmap(file);
    } catch (err) {
      return showFailure(new Error("that file is not an image this browser can read"));
    }
    const scale = Math.min(1, MAX_SIDE / Math.max(bitmap.width, bitmap.height));
    const w = Math.max(MIN_SIDE, Math.round(bitmap.width * scale));
    const h = Math.max(MIN_SIDE, Math.round(bitmap.height * scale));
    const canvas = $("classify-preview");
    canvas.width = w;
    canvas.height = h;
    const context = canvas.getContext("2d");
    context.drawImage(bitmap, 0, 0, w, h);
    canvas.hidden = false;
    const rgba = context.getImageData(0, 0, w, h).data;
    const rgb = new Array(w * h * 3);
    for (let p = 0, q = 0; p < rgba.length; p += 4) {
      rgb[q++] = rgba[p]; rgb[q++] = rgba[p + 1]; rgb[q++] = rgba[p + 2];
    }
    play.pixels = { w, h, rgb };
    $("classify-run").disabled = false;
  }

  function classify() {
    guarded($("classify-run"), async (model) => {
      const image = play.pixels;
      if (!image) throw new Error("pick an image first");
      // The classifiers' input: uint8 RGB, [N, H, W, 3] (runners/imagenet.py).
      const inputs = { image: { dtype: "uint8", shape: [1, image.h, image.w, 3], data: image.rgb } };
      const answer = await infer(model, inputs, { top_k: TOP_K }, false);
      const labels = Array.isArray(answer.outputs.labels) ? answer.outputs.labels.map(String) : [];
      const scores = answer.outputs.scores && Array.isArray(answer.outputs.scores.data)
        ? answer.outputs.scores.data.flat().map(Number) : [];
      if (!labels.length) throw new Error("the model gave no 'labels'");
      $("classify-labels").replaceChildren(...labels.map((label, i) => {
        const score = Number.isFinite(scores[i]) ? scores[i] : null;
        const bar = el("span", { class: "bar" });
        bar.style.width = Math.round(120 * (score || 0)) + "px";
        return el("li", { "data-label": label }, label,
          score === null ? null : " — " + (100 * score).toFixed(1) + " %", bar);
      }));
      showRoute(answer.meta, answer.ms);
    });
  }

  // -- wiring -----------------------------------------------------------------------

  function start() {
    const section = $("playground");
    if (!section || !("WebSocket" in window)) return;  // the page without the playground
    section.hidden = false;
    for (const button of section.querySelectorAll(".modes button")) {
      button.addEventListener("click", () => setMode(button.dataset.mode));
    }
    $("play-model").addEventListener("change", () => {
      setMode(defaultMode(play.models.get($("play-model").value)));
      about();
    });
    $("chat-send").addEventListener("click", chat);
    $("chat-input").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); chat(); }
    });
    $("chat-clear").addEventListener("click", () => {
      play.history = [];
      $("chat-log").replaceChildren();
    });
    $("compare-run").addEventListener("click", compare);
    $("classify-file").addEventListener("change", pickImage);
    $("classify-run").addEventListener("click", classify);
    setMode("chat");
    loadModels();
    setInterval(loadModels, VIEW_EVERY_MS);
  }

  start();
})();

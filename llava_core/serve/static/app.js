// The image-chat page: one image per chat, answers streamed from /v1/chat/completions, and each
// answer's words clickable to show their attention over the image (/v1/attention).
// The whole conversation is sent on every turn (as the OpenAI API expects); the server reuses the
// keys/values of the prefix it has already seen, so a later turn prefills only its new tokens.
"use strict";

const $ = (id) => document.getElementById(id);
const chat = { image: null, picture: null, messages: [], model: "llava-core", busy: false };
const RAMP = [[0.0, [20, 20, 110]], [0.3, [30, 110, 230]], [0.55, [60, 210, 200]], [0.8, [250, 220, 50]],
              [1.0, [215, 30, 30]]];  // as research/drawing.py's heat maps

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorText(res) {
  try { return (await res.json()).error.message; } catch (e) { return res.status + " " + res.statusText; }
}

// --- the picture -----------------------------------------------------------------------------

function setImage(file) {
  if (!file || !/^image\/(png|jpeg|webp)$/.test(file.type)) {
    $("status").textContent = "Pick a PNG, JPEG or WebP image.";
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    const img = new Image();
    img.onload = () => { chat.image = reader.result; chat.picture = img; resetChat(); draw(null); };
    img.src = reader.result;
  };
  reader.readAsDataURL(file);
}

function draw(heat) {
  const canvas = $("view"), img = chat.picture, ctx = canvas.getContext("2d");
  if (!img) return;
  const scale = Math.min(480 / img.naturalWidth, 480 / img.naturalHeight);
  canvas.width = Math.round(img.naturalWidth * scale);
  canvas.height = Math.round(img.naturalHeight * scale);
  ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  delete canvas.dataset.heat;
  if (!heat) return;
  const [gh, gw] = [heat.map.length, heat.map[0].length];
  const flat = heat.map.flat(), lo = Math.min(...flat), hi = Math.max(...flat);
  const cells = document.createElement("canvas");
  cells.width = gw; cells.height = gh;
  const data = cells.getContext("2d").createImageData(gw, gh);
  flat.forEach((v, i) => {
    const rgb = ramp(hi > lo ? (v - lo) / (hi - lo) : 0);
    data.data.set([...rgb, 255], 4 * i);
  });
  cells.getContext("2d").putImageData(data, 0, 0);
  const [left, top, right, bottom] = heat.box.map((v) => v * scale);
  ctx.globalAlpha = 0.5;
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(cells, left, top, right - left, bottom - top);
  ctx.globalAlpha = 1;
  canvas.dataset.heat = heat.word;
}

function ramp(v) {
  for (let i = 1; i < RAMP.length; i++) {
    const [p1, c1] = RAMP[i], [p0, c0] = RAMP[i - 1];
    if (v <= p1) {
      const t = (v - p0) / (p1 - p0);
      return c0.map((c, j) => Math.round(c + t * (c1[j] - c)));
    }
  }
  return RAMP[RAMP.length - 1][1];
}

// --- the chat --------------------------------------------------------------------------------

function resetChat() {
  chat.messages = [];
  $("log").innerHTML = "";
  $("status").textContent = "";
  $("heat-label").textContent = "Click a word of an answer to see where it looked.";
}

function bubble(cls, text) {
  const div = document.createElement("div");
  div.className = "turn " + cls;
  div.textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

async function send(question) {
  const content = [{ type: "text", text: question }];
  if (chat.image && chat.messages.length === 0) content.push({ type: "image_url", image_url: { url: chat.image } });
  chat.messages.push({ role: "user", content });
  bubble("user", question);
  const out = bubble("answer", "");
  out.dataset.state = "waiting";
  out.dataset.chunks = "0";
  const res = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(),
    body: JSON.stringify({ model: chat.model, messages: chat.messages, stream: true, max_tokens: 128,
                           stream_options: { include_usage: true } }),
  });
  if (!res.ok) {
    chat.messages.pop();
    out.classList.add("error");
    out.textContent = await errorText(res);
    out.dataset.state = "error";
    return;
  }
  out.dataset.state = "streaming";
  let text = "", usage = null, buffer = "";
  const reader = res.body.getReader(), decoder = new TextDecoder();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut).trim();
      buffer = buffer.slice(cut + 2);
      if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
      const event = JSON.parse(line.slice(6));
      if (event.error) { out.classList.add("error"); text += " [" + event.error.message + "]"; continue; }
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        if (choice.delta && choice.delta.content) {
          text += choice.delta.content;
          out.textContent = text;
          out.dataset.chunks = String(Number(out.dataset.chunks) + 1);
        }
      }
    }
  }
  chat.messages.push({ role: "assistant", content: text.trim() });
  out.dataset.state = "done";
  if (usage) {
    const reused = usage.prompt_tokens_details ? usage.prompt_tokens_details.cached_tokens : 0;
    $("status").textContent = `${usage.completion_tokens} tokens; prompt ${usage.prompt_tokens} tokens, ` +
                              `${reused} reused from the server's cache`;
    $("status").dataset.reused = String(reused);
  }
  if (chat.image && text.trim()) await attention(out, chat.messages.slice(0, -1), text.trim());
}

async function attention(out, messages, answer) {
  const res = await fetch("/v1/attention", { method: "POST", headers: headers(),
                                             body: JSON.stringify({ messages, answer }) });
  if (!res.ok) { $("heat-label").textContent = "No heat map: " + (await errorText(res)); return; }
  const got = await res.json();
  // tokens -> words: a token that starts with a space (or is the first) starts a word
  const words = [];
  got.tokens.forEach((piece, i) => {
    if (!words.length || /^\s/.test(piece)) words.push({ text: "", tokens: [] });
    const w = words[words.length - 1];
    w.text += piece;
    w.tokens.push(i);
  });
  out.textContent = "";
  for (const w of words) {
    const lead = w.text.match(/^\s*/)[0];
    if (lead) out.appendChild(document.createTextNode(lead));
    const span = document.createElement("span");
    span.className = "word";
    span.textContent = w.text.slice(lead.length);
    span.addEventListener("click", () => {
      document.querySelectorAll(".word.selected").forEach((s) => s.classList.remove("selected"));
      span.classList.add("selected");
      const map = got.maps[w.tokens[0]].map((row, y) => row.map((_, x) =>
        w.tokens.reduce((sum, t) => sum + got.maps[t][y][x], 0) / w.tokens.length));
      const scale = chat.picture.naturalWidth / got.image_size[0];
      draw({ map, box: got.box.map((v) => v * scale), word: span.textContent });
      $("heat-label").textContent = `Where “${span.textContent}” looked (mean over layers and heads).`;
    });
    out.appendChild(span);
  }
  out.dataset.words = String(words.length);
}

// --- wiring ----------------------------------------------------------------------------------

$("file").addEventListener("change", (e) => setImage(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); setImage(e.dataTransfer.files[0]); });
$("reset").addEventListener("click", resetChat);
$("ask").addEventListener("submit", async (e) => {
  e.preventDefault();
  const q = $("question").value.trim();
  if (!q || chat.busy) return;
  chat.busy = true;
  $("send").disabled = true;
  $("question").value = "";
  try { await send(q); } catch (err) { bubble("answer error", String(err)); } finally {
    chat.busy = false;
    $("send").disabled = false;
  }
});
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").requestSubmit(); }
});
fetch("/health").then((r) => r.json()).then((h) => {
  chat.model = h.model;
  $("model").textContent = `${h.model} · batch ${h.max_batch} · context ${h.context}`;
  $("key-box").hidden = !h.auth;
});

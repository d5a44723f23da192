// The gateway's live web view: the swarm from /mbt/swarm every POLL_MS, and a generation
// streamed from /v1/completions, each token coloured by the share of the layer weight that
// answered it. Plain DOM, no libraries: what nodes report is written as text, never as markup.
"use strict";

const POLL_MS = 500;
const seen = new Map(); // node id -> the node as last reported (kept once it leaves)
let token = null; // the bearer token under --api-auth token
let modelId = null;
let running = null; // the AbortController of the generation under way

const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function readToken() {
  const found = location.hash.match(/token=([^&]+)/);
  if (found) {
    sessionStorage.setItem("mbt-token", decodeURIComponent(found[1]));
    history.replaceState(null, "", location.pathname); // out of the address bar
  }
  token = sessionStorage.getItem("mbt-token");
}

function headers(extra) {
  const out = Object.assign({}, extra || {});
  if (token) out.Authorization = "Bearer " + token;
  return out;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || response.statusText;
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

function setLink(up, text) {
  const link = $("link");
  link.className = "link " + (up ? "up" : "down");
  link.textContent = text;
}

// Green when all the weight answered, through yellow, to red when none did (the hue falls
// with the square of the share: a quarter of the weight missing already reads as yellow).
function colour(answered) {
  const a = Math.max(0, Math.min(1, answered));
  return `hsl(${Math.round(120 * a * a)}, 80%, ${a === 1 ? 86 : 74}%)`;
}

// -- the swarm -----------------------------------------------------------------------------

async function poll() {
  try {
    const response = await fetch("/mbt/swarm", { headers: headers(), cache: "no-store" });
    if (response.status === 401 || response.status === 403) {
      const why = await errorText(response);
      $("auth").hidden = false;
      $("auth-error").textContent = why;
      setLink(false, "not authorized");
    } else if (!response.ok) {
      setLink(false, await errorText(response));
    } else {
      render(await response.json());
      $("auth").hidden = true;
      setLink(true, "live");
    }
  } catch (e) {
    setLink(false, "gateway unreachable");
    markAllDown();
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

function markAllDown() {
  for (const node of seen.values()) node.state = "unknown";
  renderNodes();
}

// The last live expansion, when there was one: its state, beta and drift (or why it stopped).
function expansionText(e) {
  if (!e || e.state === "none") return "";
  let text = ` · expansion v${e.from_version} → v${e.to_version} ${e.state}`;
  if (["ramping", "complete", "frozen"].includes(e.state)) text += ` β ${e.beta.toFixed(3)}`;
  if (e.drift_kl !== null) text += ` drift ${e.drift_kl.toFixed(4)}`;
  if (e.reason) text += ` (${e.reason})`;
  return text;
}

function render(data) {
  modelId = data.model.id;
  // The mode in the header, every parameter in its tooltip (an older gateway: the summary).
  const policy = data.policy;
  $("model").textContent =
    `model ${data.model.id} v${data.model.version} · policy ${policy.mode || policy.summary} · ` +
    `${data.nodes.length} nodes · ${data.layers.length} layers`;
  $("model").title = `fan-out: ${policy.summary}`;
  $("model").textContent += expansionText(data.expansion);
  const now = new Set();
  for (const node of data.nodes) {
    now.add(node.node_id);
    seen.set(node.node_id, Object.assign({}, node, { state: node.healthy ? "up" : "down" }));
  }
  for (const [id, node] of seen) {
    if (!now.has(id)) node.state = "gone";
  }
  renderNodes();
  renderLayers(data.layers);
}

const HEALTH = { up: "up", down: "down", gone: "down (left the swarm)", unknown: "unknown" };

// What each part was drawn from: a part is drawn again only when it changed (a hovered
// tooltip stays put between polls).
const drawn = { nodes: "", layers: "" };

function changed(part, data) {
  const key = JSON.stringify(data);
  if (drawn[part] === key) return false;
  drawn[part] = key;
  return true;
}

function renderNodes() {
  const rows = [...seen.values()].sort((a, b) => a.address.localeCompare(b.address));
  if (!changed("nodes", rows)) return;
  const body = $("nodes").tBodies[0];
  body.replaceChildren(
    ...rows.map((node) => {
      const row = el("tr", node.state === "up" ? "up" : "down");
      row.dataset.nodeId = node.node_id;
      row.dataset.address = node.address;
      row.dataset.state = node.state;
      row.append(
        el("td", "mono", node.node_id.slice(0, 16)),
        el("td", "mono", node.address),
        el("td", "health", HEALTH[node.state]),
        el("td", "", node.state === "gone" ? "-" : `${node.latency_ms.toFixed(1)} ms`),
        el("td", "mono", node.branches.join(" ")),
      );
      row.title = node.node_id;
      return row;
    }),
  );
}

function renderLayers(layers) {
  if (!changed("layers", layers)) return;
  $("layers").replaceChildren(
    ...layers.map((layer) => {
      const line = el("div", "layer");
      line.append(el("span", "layer-name", `layer ${layer.layer}`));
      for (const b of layer.branches) {
        const r = b.recent;
        const cell = el("div", `branch last-${r.last === "-" ? "none" : r.last}`);
        if (b.live_replicas === 0) cell.classList.add("dead");
        cell.dataset.layer = layer.layer;
        cell.dataset.branch = b.branch;
        cell.append(
          el("div", "title", `branch ${b.branch} · α ${b.weight.toFixed(3)}`),
          el("div", "", `${b.live_replicas} live: ${b.nodes.map((n) => n.slice(0, 8)).join(" ") || "none"}`),
          el("div", "", `recent ${r.ok} / ${r.masked} / ${r.rejected}, last ${r.last}`),
        );
        line.append(cell);
      }
      return line;
    }),
  );
}

// -- a generation ----------------------------------------------------------------------------

function answeredShare(report) {
  if (!report.layers.length) return 1;
  const used = report.layers.reduce((sum, l) => sum + (1 - l.lost_weight), 0);
  return used / report.layers.length;
}

function describe(report, share) {
  const missing = report.layers.flatMap((l) =>
    l.branches.filter((b) => b.outcome !== "ok").map((b) => `L${l.layer} b${b.branch} ${b.outcome}`),
  );
  return (
    `token ${report.index}: ${(100 * share).toFixed(1)}% of the weight answered, ` +
    `${report.latency_ms.toFixed(1)} ms` + (missing.length ? `; ${missing.join(", ")}` : "")
  );
}

const tally = { tokens: 0, partial: 0, started: 0 };

function addToken(text, report) {
  const share = answeredShare(report);
  const span = el("span", "token", text);
  span.style.backgroundColor = colour(share);
  span.dataset.answered = share.toFixed(4);
  span.title = describe(report, share);
  const output = $("output");
  const following = output.scrollTop + output.clientHeight >= output.scrollHeight - 4;
  output.append(span);
  if (following) output.scrollTop = output.scrollHeight; // keep the newest token in view
  tally.tokens += 1;
  if (share < 1) tally.partial += 1;
  const rate = tally.tokens / Math.max(1e-3, (performance.now() - tally.started) / 1000);
  $("gen-status").textContent =
    `${tally.tokens} tokens, ${tally.partial} with part of the weight missing, ${rate.toFixed(1)} tokens/s`;
}

function onChunk(chunk) {
  if (chunk.error) throw new Error(chunk.error.message);
  const choice = chunk.choices[0];
  if (!choice) return;
  if (chunk.mbt) addToken(choice.text, chunk.mbt);
  else if (choice.text) $("output").append(el("span", "", choice.text)); // held-back text
  if (choice.finish_reason) $("gen-status").textContent += ` · finished: ${choice.finish_reason}`;
}

async function generate(event) {
  event.preventDefault();
  if (running) return;
  const prompt = $("prompt").value;
  $("output").replaceChildren(el("span", "prompt", prompt));
  Object.assign(tally, { tokens: 0, partial: 0, started: performance.now() });
  $("gen-status").textContent = "waiting for the first token ...";
  running = new AbortController();
  $("go").disabled = true;
  $("stop").disabled = false;
  const body = {
    prompt,
    max_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value),
    stream: true,
  };
  if (modelId) body.model = modelId;
  try {
    const response = await fetch("/v1/completions", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(body),
      signal: running.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (!frame.startsWith("data: ")) continue;
        const data = frame.slice(6);
        if (data !== "[DONE]") onChunk(JSON.parse(data));
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") $("gen-status").textContent = `error: ${e.message}`;
  } finally {
    running = null;
    $("go").disabled = false;
    $("stop").disabled = true;
  }
}

function legend() {
  $("legend").replaceChildren(
    ...[1, 0.875, 0.75, 0.5, 0.25, 0].map((share) => {
      const span = el("span", "", `${Math.round(100 * share)}%`);
      span.style.backgroundColor = colour(share);
      return span;
    }),
  );
}

document.addEventListener("DOMContentLoaded", () => {
  readToken();
  legend();
  $("generate").addEventListener("submit", generate);
  $("stop").addEventListener("click", () => running && running.abort());
  $("auth").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token").value.trim();
    sessionStorage.setItem("mbt-token", token);
    $("auth-error").textContent = "";
  });
  poll();
});

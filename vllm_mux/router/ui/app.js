"use strict";
// The status page: reads /mux/status once a second and draws the pool, the
// host copies and the models. The key lives in sessionStorage; see page.py.

const POLL_MS = 1000;
const KEY = "vllm-mux-key";
// Distinct colours for the first dozen models; more get hues a golden angle apart.
const PALETTE = [
  "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948",
  "#b07aa1", "#ff9da7", "#9c755f", "#17becf", "#8c6d31", "#393b79",
];

const $ = (id) => document.getElementById(id);
let generation = 0; // a new key or a forgotten one ends the loop before it
let timer = null;

function colour(i) {
  return i < PALETTE.length ? PALETTE[i] : `hsl(${(i * 137.5) % 360} 55% 50%)`;
}

function bytes(n) {
  const gib = 2 ** 30;
  if (n >= gib) return `${(n / gib).toFixed(2)} GiB`;
  return `${(n / 2 ** 20).toFixed(n % 2 ** 20 ? 1 : 0)} MiB`;
}

function element(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function start() {
  // A key in the fragment (#key=...) is for automation; it never reaches the
  // server, and leaves the address bar at once.
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.has("key")) {
    sessionStorage.setItem(KEY, fragment.get("key"));
    history.replaceState(null, "", location.pathname + location.search);
  }
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("key").value);
    $("key").value = "";
    restart();
  });
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    generation++;
    clearTimeout(timer);
    login("");
  });
  restart();
}

function restart() {
  generation++;
  clearTimeout(timer);
  poll(generation);
}

async function poll(mine) {
  const key = sessionStorage.getItem(KEY);
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  let response, view;
  try {
    response = await fetch("mux/status", { headers, cache: "no-store" });
    if (response.ok) view = await response.json();
  } catch (e) {
    response = null;
  }
  if (mine !== generation) return;
  if (response && response.status === 401) {
    // No data without the key: back to the form, no more polling until one is given.
    sessionStorage.removeItem(KEY);
    login(key ? "That key is not accepted." : "");
    return;
  }
  if (view) draw(view);
  else problem(response ? `/mux/status answered ${response.status}.` : "The router does not answer.");
  timer = setTimeout(() => poll(mine), POLL_MS);
}

function login(message) {
  problem("");
  $("status").hidden = true;
  $("forget").hidden = true;
  $("summary").textContent = "";
  $("updated").textContent = "";
  $("login").hidden = false;
  $("login-error").textContent = message;
  $("key").focus();
}

function problem(message) {
  $("problem").textContent = message;
  $("problem").hidden = !message;
}

function draw(view) {
  $("login").hidden = true;
  $("status").hidden = false;
  $("forget").hidden = !sessionStorage.getItem(KEY);
  $("updated").textContent = `updated ${new Date(view.time * 1000).toLocaleTimeString()}`;
  problem(view.daemon ? "" : "The daemon does not answer: states are unknown.");
  const colours = new Map(view.models.map((m, i) => [m.name, colour(i)]));
  const instances = new Map((view.instances || []).map((i) => [i.id, i]));
  drawPool(view.pool, instances, colours);
  drawHost(view.pool, instances, colours);
  drawModels(view.models, colours);
}

function drawPool(pool, instances, colours) {
  const map = $("map");
  if (!pool) {
    map.replaceChildren();
    $("summary").textContent = "";
    $("pool-size").textContent = "";
    return;
  }
  const size = pool.chunk_size, total = pool.total_chunks;
  $("summary").textContent = `${pool.device}: ${bytes(total * size)}, ${bytes(pool.free_chunks * size)} free`;
  $("pool-size").textContent =
    `${total} chunks of ${bytes(size)}: ${total - pool.free_chunks} leased, ${pool.free_chunks} free`;
  if (map.children.length !== pool.chunk_map.length) {
    // Cells small enough that a big pool (a 140 GiB GPU in 128 MiB chunks:
    // 1120) stays a block of a dozen rows, large enough to point at.
    const cell = total <= 64 ? 28 : total <= 256 ? 18 : total <= 1024 ? 13 : 10;
    map.style.setProperty("--cell", `${cell}px`);
    map.replaceChildren(
      ...pool.chunk_map.map((_, i) => {
        const c = element("div", "chunk");
        c.dataset.chunk = i;
        return c;
      }),
    );
  }
  pool.chunk_map.forEach((holder, i) => {
    const kind = holder > 0 ? "leased" : holder < 0 ? "kept" : "free";
    const inst = instances.get(Math.abs(holder));
    const model = inst ? inst.model : "";
    const state = inst ? inst.state : "";
    const c = map.children[i];
    const drawn = `${kind} ${model} ${state}`;
    if (c.drawn === drawn) return;
    c.drawn = drawn;
    c.dataset.kind = kind;
    c.dataset.model = model;
    c.dataset.state = state;
    c.style.setProperty("--c", colours.get(model) || "#888");
    c.title =
      kind === "free" ? `chunk ${i}: free`
      : kind === "kept" ? `chunk ${i}: free, still holding the bytes of ${model} (asleep): taken last`
      : `chunk ${i}: ${model} (${state})`;
  });
}

function drawHost(pool, instances, colours) {
  const host = $("host"), copies = $("copies");
  if (!pool) {
    host.replaceChildren();
    copies.replaceChildren();
    $("host-size").textContent = "";
    return;
  }
  const budget = pool.host_budget || 1;
  const n = pool.host_copies.length;
  $("host-size").textContent =
    `${bytes(pool.host_used)} of ${bytes(pool.host_budget)} in ${n} ${n === 1 ? "copy" : "copies"} of weights`;
  const segments = [], items = [];
  for (const copy of pool.host_copies) {
    const users = copy.users.map((id) => (instances.get(id) || { model: `#${id}` }).model);
    const who = users.join(", ") || "nobody";
    const facts =
      `${bytes(copy.size)} for ${who}` +
      (copy.sealed ? "" : ", being filled") +
      (copy.coldable ? ", may be dropped (its users would reload from their files)" : "");
    // A copy shared by several models: a band of each one's colour.
    const bands = users.map((u, k) => {
      const c = colours.get(u) || "#888";
      return `${c} ${(100 * k) / users.length}% ${(100 * (k + 1)) / users.length}%`;
    });
    const segment = element("div", "copy");
    segment.dataset.digest = copy.digest;
    segment.style.setProperty("--share", `${(100 * copy.size) / budget}%`);
    segment.style.setProperty("background", `linear-gradient(${bands.join(", ") || "#888, #888"})`);
    segment.title = `${copy.digest.slice(0, 12)}: ${facts}`;
    segments.push(segment);
    const swatch = element("span", "swatch");
    swatch.style.setProperty("background", segment.style.background);
    const item = element("li");
    item.append(swatch, element("span", "", facts));
    items.push(item);
  }
  host.replaceChildren(...segments, element("div", "copy free"));
  copies.replaceChildren(...items);
}

const COLUMNS = ["model", "state", "memory", "running", "waiting", "queue", "wakes", "wake", "host", "restarts"];

function drawModels(models, colours) {
  const body = $("models").tBodies[0];
  const names = models.map((m) => m.name).join("\n");
  if (body.drawn !== names) {
    body.drawn = names;
    body.replaceChildren(
      ...models.map((m) => {
        const row = element("tr");
        row.dataset.model = m.name;
        for (const column of COLUMNS) {
          const cell = element("td");
          cell.dataset.column = column;
          row.append(cell);
        }
        const swatch = element("span", "swatch");
        swatch.style.setProperty("--c", colours.get(m.name));
        row.cells[0].append(swatch, element("span", "", m.name));
        return row;
      }),
    );
  }
  models.forEach((m, i) => {
    const row = body.rows[i];
    row.dataset.state = m.state;
    row.title = m.error || "";
    const cell = (column) => row.cells[COLUMNS.indexOf(column)];
    const state = cell("state");
    state.replaceChildren(element("span", `state ${m.state}`, m.state));
    if (m.pinned) state.append(element("span", "badge", "pinned"));
    if (m.cold) state.append(element("span", "badge", "cold"));
    cell("memory").textContent =
      bytes(m.bytes) + (m.kept_chunks ? ` (${m.kept_chunks} chunks warm)` : "");
    cell("running").textContent = m.in_flight;
    cell("waiting").textContent = m.waiting;
    cell("queue").textContent = m.queued;
    cell("wakes").textContent = m.wakes;
    const wake = m.last_wake;
    cell("wake").textContent = wake
      ? `${(wake.seconds * 1000).toFixed(0)} ms${wake.tier ? ` from ${wake.tier}` : ""}` : "–";
    cell("host").textContent = m.host_copy ? "yes" : "–";
    cell("restarts").textContent = m.restarts;
  });
}

start();

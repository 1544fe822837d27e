// difflab web page: generation with live progress, gallery, A/B votes, sweep results.
// Plain browser JavaScript, no libraries; every server error is shown inline.
"use strict";
const INFO = JSON.parse(document.body.dataset.info);
const $ = (id) => document.getElementById(id);

async function api(method, url, body) {
  const opts = {method, headers: {}};
  if (body !== undefined) {
    opts.body = JSON.stringify(body);
    opts.headers["Content-Type"] = "application/json";
  }
  const r = await fetch(url, opts);
  const kind = r.headers.get("Content-Type") || "";
  const data = kind.includes("json") ? await r.json() : await r.text();
  if (!r.ok) throw new Error((data && data.error) || `${r.status} ${r.statusText}`);
  return data;
}

function showError(el, err) {
  el.textContent = err ? String(err.message || err) : "";
  el.hidden = !err;
}

// ------------------------------------------------------------------ tabs
function openTab(name) {
  for (const b of document.querySelectorAll("nav button")) b.classList.toggle("on", b.dataset.tab === name);
  for (const s of document.querySelectorAll("section.tab")) s.classList.toggle("on", s.id === name);
  if (name === "gallery") loadGallery();
  if (name === "ab") loadExperiments();
  if (name === "sweeps") loadSweeps();
}
for (const b of document.querySelectorAll("nav button")) b.onclick = () => openTab(b.dataset.tab);

// ------------------------------------------------------------------ generate
const form = $("gen-form");
let current = null;  // {id, source}

function requestBody() {
  const f = new FormData(form), body = {};
  const num = (k) => (f.get(k) === null || f.get(k) === "" ? undefined : Number(f.get(k)));
  body.n = num("n");
  for (const k of ["steps", "guidance_scale", "guidance_rescale", "eta", "nrow"]) {
    if (num(k) !== undefined) body[k] = num(k);
  }
  for (const k of ["sampler", "spacing", "negative_prompt"]) if (f.get(k)) body[k] = f.get(k);
  if (f.get("prompt") !== null) body.prompt = f.get("prompt");
  const cls = f.get("class_labels");
  if (cls === "mixed") body.class_labels = Array.from({length: body.n || 1}, (_, i) => i % INFO.num_classes);
  else if (cls !== null && cls !== "") body.class_labels = Number(cls);
  if (f.get("negative_class")) body.negative_class = Number(f.get("negative_class"));
  const lo = f.get("interval_lo"), hi = f.get("interval_hi");
  if (lo || hi) body.guidance_interval = [Number(lo || 0), Number(hi || 1e30)];
  if (f.get("apg")) body.apg = {};
  const seed = (f.get("seed") || "random").trim();
  body.seed = seed === "random" ? "random" : (/^-?\d+$/.test(seed) ? Number(seed) : seed);
  const [, h, w] = INFO.pixel_shape;
  if (num("height") !== undefined && num("height") !== h) body.height = num("height");
  if (num("width") !== undefined && num("width") !== w) body.width = num("width");
  return body;
}

function setProgress(pct, text) {
  $("gen-bar").value = pct;
  $("gen-text").textContent = text;
}

function finishRun() {
  if (current && current.source) current.source.close();
  current = null;
  $("gen-go").disabled = false;
  $("gen-cancel").disabled = true;
}

form.onsubmit = async (e) => {
  e.preventDefault();
  showError($("gen-error"), null);
  $("gen-go").disabled = true;
  setProgress(0, "submitting…");
  let job;
  try {
    job = await api("POST", "/api/jobs", requestBody());
  } catch (err) {
    showError($("gen-error"), err);
    setProgress(0, "refused");
    $("gen-go").disabled = false;
    return;
  }
  const source = new EventSource(`/api/jobs/${job.id}/events`);
  current = {id: job.id, source};
  $("gen-cancel").disabled = false;
  const update = (ev) => {
    const s = JSON.parse(ev.data);
    const pct = Math.round((100 * s.step) / s.total);
    if (s.state === "queued") setProgress(0, `queued: ${s.position} job(s) ahead`);
    if (s.state === "running") setProgress(pct, `step ${s.step}/${s.total} (${pct}%)`);
    if (s.preview) $("gen-preview").src = s.preview;
    if (s.state === "done") {
      setProgress(100, `done: 100% · seed ${s.seed}`);
      $("gen-result").src = s.image;
      $("gen-caption").textContent = `seed ${s.seed}` + (s.gallery.length ? ` · saved ${s.gallery.length} to the gallery` : "");
      finishRun();
    }
    if (s.state === "error") { showError($("gen-error"), s.error); setProgress(0, "failed"); finishRun(); }
    if (s.state === "cancelled") { setProgress(0, "cancelled"); finishRun(); }
  };
  for (const kind of ["queued", "running", "done", "error", "cancelled"]) source.addEventListener(kind, update);
  source.onerror = () => { if (current && current.source === source && source.readyState === 2) finishRun(); };
};

$("gen-cancel").onclick = async () => {
  if (!current) return;
  try { await api("DELETE", `/api/jobs/${current.id}`); } catch (err) { showError($("gen-error"), err); }
};

function useSettings(p) {
  const set = (k, v) => { const el = form.elements[k]; if (el && v !== undefined && v !== null) el.value = v; };
  set("n", p.n); set("seed", p.seed); set("steps", p.steps); set("guidance_scale", p.guidance_scale);
  set("guidance_rescale", p.guidance_rescale); set("eta", p.eta); set("sampler", p.sampler);
  if (form.elements.class_labels && p.class_labels) set("class_labels", String(p.class_labels[0]));
  if (typeof p.prompt === "string") set("prompt", p.prompt);
  if (p.negative_prompt) set("negative_prompt", p.negative_prompt);
  if (p.guidance_interval) { set("interval_lo", p.guidance_interval[0]); set("interval_hi", p.guidance_interval[1]); }
  if (form.elements.apg) form.elements.apg.checked = !!p.apg;
  if (p.size) { set("height", p.size[0]); set("width", p.size[1]); }
  openTab("generate");
}

// ------------------------------------------------------------------ gallery
let selected = null;
async function loadGallery() {
  const f = new FormData($("gal-filter")), q = new URLSearchParams();
  if (f.get("q")) q.set("q", f.get("q"));
  if (f.get("class")) q.set("class", f.get("class"));
  try {
    const data = await api("GET", "/api/gallery?" + q);
    $("gal-count").textContent = `${data.total} image(s)`;
    const grid = $("gal-grid");
    grid.replaceChildren();
    for (const item of data.items) {
      const img = document.createElement("img");
      img.src = item.url; img.alt = item.name; img.title = item.params.prompt || `class ${item.params.class_labels}`;
      img.className = "thumb"; img.dataset.name = item.name;
      img.onclick = () => openImage(item);
      grid.append(img);
    }
  } catch (err) { $("gal-count").textContent = String(err.message); }
}
function openImage(item) {
  selected = item;
  $("gal-image").src = item.url;
  $("gal-params").textContent = JSON.stringify(item.params, null, 1);
  $("gal-detail").hidden = false;
}
$("gal-filter").onsubmit = (e) => { e.preventDefault(); loadGallery(); };
$("gal-close").onclick = () => { $("gal-detail").hidden = true; };
$("gal-use").onclick = () => selected && useSettings(selected.params);
$("gal-delete").onclick = async () => {
  if (!selected) return;
  await api("DELETE", `/api/gallery/${selected.name}`);
  $("gal-detail").hidden = true;
  loadGallery();
};

// ------------------------------------------------------------------ A/B
let pair = null;
async function loadExperiments(select) {
  const data = await api("GET", "/api/ab/experiments");
  const sel = $("ab-experiment"), keep = select || sel.value;
  sel.replaceChildren();
  for (const e of data.experiments) {
    const o = document.createElement("option");
    o.value = e.id; o.textContent = `#${e.id} ${e.name}: ${e.labels[0]} vs ${e.labels[1]} (${e.votes} votes)`;
    sel.append(o);
  }
  if (keep) sel.value = String(keep);
  await loadRanking();
  if (sel.value && !pair) nextPair();
}
async function nextPair() {
  const id = Number($("ab-experiment").value);
  if (!id) return;
  $("ab-status").textContent = "generating a pair…";
  for (const b of document.querySelectorAll("[data-vote]")) b.disabled = true;
  try {
    pair = await api("POST", "/api/ab/pairs", {experiment: id});
    $("ab-left").src = pair.left; $("ab-right").src = pair.right;
    $("ab-status").textContent = `seed ${pair.seed}`;
    for (const b of document.querySelectorAll("[data-vote]")) b.disabled = false;
    showError($("ab-error"), null);
  } catch (err) { showError($("ab-error"), err); $("ab-status").textContent = ""; }
}
async function vote(choice) {
  if (!pair) return;
  const p = pair; pair = null;
  try {
    await api("POST", "/api/ab/votes", {pair: p.pair, choice});
    $("ab-status").textContent = `voted ${choice}`;
    await loadRanking();
  } catch (err) { showError($("ab-error"), err); }
  nextPair();
}
async function loadRanking() {
  const r = await api("GET", "/api/ab/ranking");
  const rows = r.configs.map((c) => `<tr><td>${c.rank}</td><td>${esc(c.label)}</td><td>${c.score.toFixed(2)}</td>
    <td>[${c.ci95[0].toFixed(2)}, ${c.ci95[1].toFixed(2)}]</td><td>${c.elo.toFixed(0)}</td>
    <td>${c.wins}/${c.losses}/${c.ties}/${c.both_bad}</td><td>${c.votes}</td></tr>`);
  $("ab-ranking").innerHTML = `<tr><th>#</th><th>configuration</th><th>BT score</th><th>95% CI</th><th>Elo</th>
    <th>W/L/T/bad</th><th>votes</th></tr>` + rows.join("");
  $("ab-ranking").dataset.votes = r.votes;
}
function esc(s) { const d = document.createElement("div"); d.textContent = s; return d.innerHTML; }
for (const b of document.querySelectorAll("[data-vote]")) b.onclick = () => vote(b.dataset.vote);
document.addEventListener("keydown", (e) => {
  if (!$("ab").classList.contains("on") || e.target.tagName === "INPUT") return;
  const choice = {"1": "left", "2": "right", "3": "tie", "4": "both_bad"}[e.key];
  if (choice) vote(choice);
});
$("ab-experiment").onchange = () => { pair = null; nextPair(); };
$("ab-form").onsubmit = async (e) => {
  e.preventDefault();
  const f = new FormData(e.target);
  try {
    const body = {name: f.get("name"), a: JSON.parse(f.get("a") || "{}"), b: JSON.parse(f.get("b") || "{}")};
    if (INFO.text) body.condition = {prompts: INFO.prompts.length ? INFO.prompts : [""]};
    const exp = await api("POST", "/api/ab/experiments", body);
    pair = null;
    showError($("ab-error"), null);
    await loadExperiments(exp.id);
  } catch (err) { showError($("ab-error"), err); }
};

// ------------------------------------------------------------------ sweeps
async function loadSweeps() {
  const list = $("sweep-list");
  try {
    const data = await api("GET", "/api/sweeps");
    if (!data.sweeps.length) { list.innerHTML = `<p class="hint">no sweep yet: run <code>difflab sweep ${esc(INFO.run || "RUN")}</code></p>`; return; }
    list.replaceChildren();
    for (const s of data.sweeps) {
      const div = document.createElement("div");
      const head = s.columns.map((c) => `<th>${esc(c)}</th>`).join("");
      const body = s.rows.map((r) => "<tr>" + s.columns.map((c) => `<td>${esc(r[c])}</td>`).join("") + "</tr>").join("");
      div.innerHTML = `<h2>${esc(s.name)}</h2><table class="sweep"><tr>${head}</tr>${body}</table>` +
        s.plots.map((p) => `<img class="plot" src="${p}" alt="${esc(p)}">`).join("") +
        "<p>" + s.files.map((f) => `<a href="${f}">${esc(f.split("/").pop())}</a>`).join(" · ") + "</p>";
      list.append(div);
    }
  } catch (err) { list.textContent = String(err.message); }
}

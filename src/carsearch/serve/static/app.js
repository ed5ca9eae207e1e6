// carsearch page: upload a photo, show the vote and the most similar cars; click a car to search with it.
// Any control change searches the current photo again (text fields after a pause, or at once on Enter);
// only the answer to the latest request is ever shown, and each request first clears the previous answer.
"use strict";
const $ = (id) => document.getElementById(id);
// [field, input id, control id] of each filter the server rendered (datasets/attributes.FILTER_FIELDS).
const FILTERS = [...document.querySelectorAll("#filters input[data-filter]")].map(
  (input) => [input.dataset.filter, input.id, `${input.dataset.filter}-control`]);
const TYPING_PAUSE_MS = 400;
let current = null;   // {blob, name}: the photo the controls search again
let sent = 0;         // requests started; an answer is shown only if it answers the latest one
let sentParams = "";  // the parameters of the latest request
let inflight = null;  // its AbortController
let timer = null;     // a pending re-run after typing
let force = false;    // the pending re-run was asked for (Enter): it runs even if nothing changed
let searches = 0;     // answers shown (body[data-searches]); body[data-done] counts every finished request
let done = 0;

async function loadInfo() {
  try {
    const info = await (await fetch("/api/info")).json();
    const fields = info.fields || Object.fromEntries(FILTERS.map(([field]) => [field, true]));
    $("index-info").textContent =
      `${info.images} cars indexed · ${info.backbone} (${info.weights}) · ${info.factory}` +
      (info.labelled ? "" : " · no labels: similar photos only") +
      (info.openset ? "" : " · no unknown-model threshold");
    // Controls that cannot apply to this index are not offered: no labels, no vote; no makes, no make filter.
    $("level-control").hidden = !info.labelled;
    for (const [field, , control] of FILTERS) $(control).hidden = !fields[field];
    $("filters").hidden = !FILTERS.some(([field]) => fields[field]);
    for (const [field, values] of Object.entries(info.suggestions || {})) {
      const list = $(`${field}-values`);
      if (list) list.replaceChildren(...values.map((v) => {
        const option = document.createElement("option");
        option.value = v;
        return option;
      }));
    }
  } catch (e) {
    $("index-info").textContent = "index information unavailable";
  }
}

function pct(x) { return `${(100 * x).toFixed(0)}%`; }
function fixed(x) { return typeof x === "number" ? x.toFixed(3) : "?"; }
function sentence(text) { return text ? text[0].toUpperCase() + text.slice(1) : ""; }
function baseName(path) { return String(path || "").split(/[\\/]/).pop(); }

// The request's parameters from the controls on show (a hidden control cannot apply to this index).
function params() {
  const p = new URLSearchParams({ k: $("k").value });
  if (!$("level-control").hidden) p.set("level", $("level").value);
  for (const [field, id, control] of FILTERS) {
    const value = $(id).value.trim();
    if (value && !$(control).hidden && !$("filters").hidden) p.set(field, value);
  }
  return p.toString();
}

// "make BMW · year 2010-": the filters a request was sent with, as typed.
function filterText(query) {
  const p = new URLSearchParams(query);
  return FILTERS.filter(([field]) => p.has(field)).map(([field]) => `${field} ${p.get(field)}`).join(" · ");
}

function showQuery(blob, name) {
  const img = $("query-img");
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.hidden = false;
  img.onerror = () => { img.hidden = true; };  // not an image: the name stays, the server says why
  img.src = URL.createObjectURL(blob);
  $("query-name").textContent = name;
  $("query").hidden = false;
}

// Nothing of the previous answer may stay beside a new query.
function clearAnswer() {
  $("prediction").hidden = true;
  $("votes").replaceChildren();
  $("results").replaceChildren();
  for (const id of ["empty", "note"]) { $(id).hidden = true; $(id).textContent = ""; }
  $("status").textContent = "";
}

function showPrediction(r, query) {
  const label = $("label");
  const name = r.display || r.label;  // "Land Rover Range Rover 2012", not the raw class
  // An unknown class is a car model never indexed.
  label.textContent = r.unknown ? `unknown ${r.level === "class" || !r.level ? "model" : r.level}` : name;
  label.className = r.unknown ? "unknown" : "";
  const voters = `the ${r.neighbors.length} nearest cars`;
  $("confidence").textContent = r.unknown
    ? `closest: ${name} (${pct(r.confidence)} of the vote); ` +
      (r.reason || `similarity ${fixed(r.openset_score)} is below ${fixed(r.threshold)}`)
    : `${pct(r.confidence)} of the vote of ${voters}` + (r.reason ? `; ${r.reason}` : "");
  const filters = filterText(query);
  $("narrowed").textContent = filters ? `Filtered: only cars with ${filters} voted and are shown.` : "";
  $("narrowed").hidden = !filters;
  $("votes").replaceChildren(...r.top5.map((v) => {
    const li = document.createElement("li");
    li.className = "vote";
    li.innerHTML = `<div></div><div class="bar"><span></span></div>`;
    li.firstChild.textContent = `${v.display || v.label} · ${pct(v.share)}`;
    li.querySelector(".bar span").style.width = pct(v.share);
    return li;
  }));
  $("prediction").hidden = false;
}

function showResults(r) {
  $("results").replaceChildren(...r.neighbors.map((n) => {
    const card = document.createElement("button");
    card.className = "card";
    card.type = "button";
    card.dataset.id = n.id;
    card.title = n.path;
    card.innerHTML = `<img loading="lazy" alt=""><div class="label"></div><div class="score"></div>`;
    const thumb = new URL(n.image_url, location.href);  // image_url carries the content version (?v=)
    thumb.searchParams.set("size", "256");
    card.querySelector("img").src = thumb.pathname + thumb.search;
    const name = n.display || n.label || baseName(n.path);  // an unlabelled photo is named by its file
    card.querySelector(".label").textContent = name;
    card.querySelector(".score").textContent = `similarity ${n.score.toFixed(3)}`;
    card.addEventListener("click", () => searchById(n.image_url, name));
    return card;
  }));
}

function showAnswer(r, query) {
  if (r.neighbors.length === 0) {  // say why the list is empty instead of showing nothing
    $("empty").textContent = sentence(r.note) || "No indexed car is similar enough to show.";
    $("empty").hidden = false;
    return;
  }
  if (r.label !== null) showPrediction(r, query);
  showResults(r);
  if (r.note) { $("note").textContent = sentence(r.note); $("note").hidden = false; }
}

async function answerOf(resp) {
  try {
    return await resp.json();
  } catch (e) {
    return { error: `the server answered ${resp.status} without a readable body` };
  }
}

// Search the current photo with the controls as they are now.
async function run() {
  clearTimeout(timer);
  force = false;
  if (!current) return;
  const query = params();
  const mine = ++sent;
  sentParams = query;
  if (inflight) inflight.abort();
  inflight = new AbortController();
  clearAnswer();
  document.body.dataset.busy = "1";
  const form = new FormData();
  form.append("image", current.blob, current.name);
  try {
    const resp = await fetch(`/api/search?${query}`, { method: "POST", body: form, signal: inflight.signal });
    const body = await answerOf(resp);
    if (mine !== sent) return;  // a newer request was started: this answer is another query's
    const r = resp.ok ? body.results[0] : null;
    if (!r || r.error) {
      $("status").textContent = sentence((r || body).error || `the search failed (${resp.status})`);
    } else {
      searches += 1;
      document.body.dataset.searches = String(searches);
      showAnswer(r, query);
    }
  } catch (e) {
    if (mine !== sent) return;
    $("status").textContent = `The search failed: ${e.message || e}`;
  } finally {
    if (mine === sent) {
      delete document.body.dataset.busy;
      done += 1;
      document.body.dataset.done = String(done);
    }
  }
}

function search(blob, name) {
  current = { blob, name };
  showQuery(blob, name);
  return run();
}

// A control changed: search again after `wait` ms, unless nothing the request carries changed.
function rerun(wait, always = false) {
  clearTimeout(timer);
  if (!current) return;
  force = force || always;
  timer = setTimeout(() => { if (force || params() !== sentParams) run(); }, wait);
}

async function searchById(url, name) {
  const resp = await fetch(url);
  if (!resp.ok) { $("status").textContent = `Cannot load ${name}.`; return; }
  await search(await resp.blob(), name);
}

for (const id of ["k", "level"]) $(id).addEventListener("change", () => rerun(0));
for (const [, id] of FILTERS) {
  $(id).addEventListener("input", () => rerun(TYPING_PAUSE_MS));
  $(id).addEventListener("change", () => rerun(0));  // a datalist pick, or leaving the field
  $(id).addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); rerun(0, true); }
  });
}
$("file-input").addEventListener("change", (e) => {
  const f = e.target.files[0];
  e.target.value = "";  // so that picking the same file again is a change too, and searches again
  if (f) search(f, f.name);
});
const drop = $("drop");
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", (e) => {
  const f = e.dataTransfer.files[0];
  if (f) search(f, f.name);
});
loadInfo();

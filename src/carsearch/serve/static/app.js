// carsearch page: upload a photo, show the vote and the most similar cars; click a car to search with it.
"use strict";
const $ = (id) => document.getElementById(id);
let searches = 0;

async function loadInfo() {
  try {
    const info = await (await fetch("/api/info")).json();
    $("index-info").textContent =
      `${info.images} cars indexed · ${info.backbone} (${info.weights}) · ${info.factory}` +
      (info.openset ? "" : " · no unknown-model threshold");
    $("makes").replaceChildren(...(info.makes || []).map((m) => {
      const option = document.createElement("option");
      option.value = m;
      return option;
    }));
  } catch (e) {
    $("index-info").textContent = "index information unavailable";
  }
}

function pct(x) { return `${(100 * x).toFixed(0)}%`; }

function showQuery(blob, name) {
  $("query-img").src = URL.createObjectURL(blob);
  $("query-name").textContent = name;
  $("query").hidden = false;
}

function showPrediction(r) {
  const label = $("label");
  if (r.label === null) {
    label.textContent = "no labelled neighbours";
    label.className = "";
  } else if (r.unknown) {
    label.textContent = `unknown ${r.level || "model"}`;
    label.className = "unknown";
  } else {
    label.textContent = r.display || r.label;  // "Land Rover Range Rover 2012", not the raw class
    label.className = "";
  }
  $("confidence").textContent = r.unknown
    ? `closest: ${r.display || r.label} (${pct(r.confidence)} of the vote); similarity ${r.openset_score.toFixed(3)} is below ${r.threshold.toFixed(3)}`
    : r.label === null ? "" : `${pct(r.confidence)} of the ${r.neighbors.length} nearest cars' vote`;
  const votes = $("votes");
  votes.replaceChildren(...r.top5.map((v) => {
    const li = document.createElement("li");
    li.className = "vote";
    li.innerHTML = `<div></div><div class="bar"><span></span></div>`;
    li.firstChild.textContent = `${v.label} · ${pct(v.share)}`;
    li.querySelector(".bar span").style.width = pct(v.share);
    return li;
  }));
  $("prediction").hidden = false;
}

function showResults(r) {
  const grid = $("results");
  grid.replaceChildren(...r.neighbors.map((n) => {
    const card = document.createElement("button");
    card.className = "card";
    card.type = "button";
    card.dataset.id = n.id;
    card.title = n.path;
    card.innerHTML = `<img loading="lazy" alt=""><div class="label"></div><div class="score"></div>`;
    const thumb = new URL(n.image_url, location.href);  // image_url carries the content version (?v=)
    thumb.searchParams.set("size", "256");
    card.querySelector("img").src = thumb.pathname + thumb.search;
    card.querySelector(".label").textContent = n.label || "(unlabelled)";
    card.querySelector(".score").textContent = `similarity ${n.score.toFixed(3)}`;
    card.addEventListener("click", () => searchById(n.image_url, n.label || `image ${n.id}`));
    return card;
  }));
}

async function search(blob, name) {
  $("status").textContent = "";
  showQuery(blob, name);
  const form = new FormData();
  form.append("image", blob, name);
  const params = new URLSearchParams({ k: $("k").value, level: $("level").value });
  for (const [field, id] of [["make", "f-make"], ["model", "f-model"], ["year", "f-year"]]) {
    const value = $(id).value.trim();
    if (value) params.set(field, value);
  }
  document.body.dataset.busy = "1";
  try {
    const resp = await fetch(`/api/search?${params}`, { method: "POST", body: form });
    const body = await resp.json();
    if (!resp.ok) {
      $("status").textContent = body.error || "the search failed";
      return;
    }
    const r = body.results[0];  // API version 2: one answer per photo
    searches += 1;
    document.body.dataset.searches = String(searches);
    showPrediction(r);
    showResults(r);
  } catch (e) {
    $("status").textContent = `the search failed: ${e}`;
  } finally {
    delete document.body.dataset.busy;
  }
}

async function searchById(url, name) {
  const resp = await fetch(url);
  if (!resp.ok) { $("status").textContent = `cannot load ${name}`; return; }
  await search(await resp.blob(), name);
}

$("file-input").addEventListener("change", (e) => {
  const f = e.target.files[0];
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

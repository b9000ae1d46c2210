// handclip serve: the page. Plain JavaScript, no build step; it talks only to /api/ on this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { token: sessionStorage.getItem("handclip-token"), info: null, file: null, entry: null, queryUrl: null,
                current: -1, imageUrls: new Map(), explanations: new Map() };

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.token) headers.set("Authorization", `Bearer ${state.token}`);
  const response = await fetch(`/api/${path}`, { ...options, headers });
  if (response.status === 401) {
    $("token-form").hidden = false;
    $("token").focus();
    throw new Error("this server needs its access token");
  }
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
    throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return response;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function loadInfo() {
  try {
    state.info = await (await api("info")).json();
  } catch (error) {
    $("gallery-info").textContent = error.message;
    return;
  }
  $("token-form").hidden = true;
  const i = state.info;
  $("gallery-info").textContent = `${i.images.toLocaleString()} images · ${i.identities.toLocaleString()} identities · ` +
    `model ${i.checkpoint_sha256.slice(0, 12)} · ${i.calibrated ? "calibrated: likelihood ratios shown" : "scores uncalibrated"}`;
}

async function galleryImage(sha256) {
  if (!state.imageUrls.has(sha256)) {
    const blob = await (await api(`images/${sha256}`)).blob();
    state.imageUrls.set(sha256, URL.createObjectURL(blob));
  }
  return state.imageUrls.get(sha256);
}

async function search(file) {
  if (!file) return;
  state.file = file;
  if (state.info && file.size > state.info.max_upload_bytes) {
    setStatus(`${file.name} is larger than ${state.info.max_upload_bytes / 2 ** 20} MB`, true);
    return;
  }
  if (state.queryUrl) URL.revokeObjectURL(state.queryUrl);
  state.queryUrl = URL.createObjectURL(file);
  $("query-preview").src = state.queryUrl;
  $("query-preview").hidden = false;
  $("drop-text").hidden = true;
  $("drop").title = "Drop or click to search with another photo";
  setStatus(`Searching for ${file.name}…`);
  const form = new FormData();
  form.append("image", file, file.name);
  form.append("top", $("top").value);
  try {
    state.entry = await (await api("search", { method: "POST", body: form })).json();
  } catch (error) {
    setStatus(error.message, true);
    return;
  }
  $("query-name").textContent = state.entry.query;
  $("query-sha").textContent = state.entry.sha256;
  $("query-facts").hidden = false;
  setStatus(`${state.entry.results.length} candidates. Open one to compare side by side.`);
  renderResults();
}

function lrText(result) {
  if (result.log10_lr === undefined) return "";
  const lr = 10 ** result.log10_lr;
  const shown = lr >= 1 ? `LR ${Math.round(lr).toLocaleString()}` : `LR 1/${Math.round(1 / lr).toLocaleString()}`;
  return `${shown} (log10 ${result.log10_lr.toFixed(2)})` + (result.verbal ? ` · ${result.verbal}` : "");
}

function renderResults() {
  const container = $("results");
  container.replaceChildren();
  state.entry.results.forEach((result, index) => {
    const card = document.createElement("button");
    card.type = "button";
    card.className = "card";
    card.dataset.identity = result.identity ?? "";
    card.dataset.sha256 = result.sha256;
    const image = document.createElement("img");
    image.alt = `candidate ${result.rank}`;
    galleryImage(result.sha256).then((url) => { image.src = url; }).catch(() => { image.alt = "image unavailable"; });
    const body = document.createElement("div");
    body.className = "body";
    body.innerHTML = `<div class="line"><span class="rank">#${result.rank}</span><span class="score"></span></div>
      <div class="identity"></div><div class="bar"><div></div></div><div class="lr"></div>`;
    body.querySelector(".score").textContent = result.score.toFixed(4);
    body.querySelector(".identity").textContent = result.identity ?? "no identity";
    body.querySelector(".identity").title = result.identity ?? "";
    body.querySelector(".bar > div").style.width = `${Math.max(0, Math.min(1, result.score)) * 100}%`;
    body.querySelector(".lr").textContent = lrText(result);
    card.append(image, body);
    card.addEventListener("click", () => openCompare(index));
    container.append(card);
  });
}

function factRows(rows) {
  const table = $("compare-facts");
  table.replaceChildren();
  for (const [label, value, isCode] of rows) {
    if (value === undefined || value === null || value === "") continue;
    const tr = table.insertRow();
    const th = document.createElement("th");
    th.textContent = label;
    const td = tr.insertCell();
    if (isCode) {
      const code = document.createElement("code");
      code.textContent = value;
      td.append(code);
    } else {
      td.textContent = value;
    }
    tr.prepend(th);
  }
}

async function explanation(sha256) {
  const key = `${state.entry.sha256}/${sha256}`;
  if (!state.explanations.has(key)) {
    const form = new FormData();
    form.append("image", state.file, state.file.name);
    form.append("candidate", sha256);
    state.explanations.set(key, api("explain", { method: "POST", body: form }).then((r) => r.json()));
  }
  try {
    return await state.explanations.get(key);
  } catch (error) {
    state.explanations.delete(key);  // try again next time
    throw error;
  }
}

async function showImages(result, shown) {
  const withHeatmaps = $("heatmaps").checked;
  $("heatmap-note").hidden = !withHeatmaps;
  $("compare-query").src = state.queryUrl;
  const url = await galleryImage(result.sha256);
  if (state.current !== shown) return;
  $("compare-candidate").src = url;
  if (!withHeatmaps) return;
  setStatus("Computing the explanation…");
  const explained = await explanation(result.sha256);
  if (state.current !== shown || !$("heatmaps").checked) return;
  $("compare-query").src = explained.query_overlay;
  $("compare-candidate").src = explained.candidate_overlay;
  setStatus(`Explanation of candidate #${result.rank} shown.`);
}

async function openCompare(index) {
  const results = state.entry.results;
  const shown = (index + results.length) % results.length;
  state.current = shown;
  const result = results[shown];
  $("compare").hidden = false;
  $("compare-title").textContent = `Candidate #${result.rank} of ${results.length}`;
  $("compare-caption").textContent = `Candidate #${result.rank}: ${result.identity ?? "no identity"}`;
  $("compare-candidate").removeAttribute("src");
  const base = [["Score (cosine similarity)", result.score.toFixed(4)], ["Likelihood ratio", lrText(result)],
                ["Identity", result.identity ?? "none"]];
  factRows([...base, ["Candidate sha256", result.sha256, true], ["Query sha256", state.entry.sha256, true]]);
  try {
    const [, record] = await Promise.all([showImages(result, shown), api(`gallery/${result.sha256}`).then((r) => r.json())]);
    if (state.current !== shown) return;  // the examiner moved on meanwhile
    const metadata = Object.entries(record.metadata || {}).map(([key, value]) => [key, String(value)]);
    factRows([...base, ["Aspect", record.aspect], ...metadata, ["Enrolled", record.enrolled],
              ["Gallery file", record.path, true], ["Candidate sha256", result.sha256, true],
              ["Query sha256", state.entry.sha256, true]]);
  } catch (error) {
    setStatus(error.message, true);
  }
}

function closeCompare() {
  $("compare").hidden = true;
  state.current = -1;
}

function setUp() {
  const drop = $("drop");
  drop.addEventListener("click", () => $("file").click());
  drop.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") $("file").click(); });
  $("file").addEventListener("change", () => search($("file").files[0]));
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => { event.preventDefault(); search(event.dataTransfer.files[0]); });
  $("top").addEventListener("change", () => search(state.file));
  $("prev").addEventListener("click", () => openCompare(state.current - 1));
  $("next").addEventListener("click", () => openCompare(state.current + 1));
  $("close").addEventListener("click", closeCompare);
  $("heatmaps").addEventListener("change", () => {
    if (state.current >= 0) showImages(state.entry.results[state.current], state.current).catch((e) => setStatus(e.message, true));
  });
  $("compare").addEventListener("click", (event) => { if (event.target === $("compare")) closeCompare(); });
  document.addEventListener("keydown", (event) => {
    if ($("compare").hidden) return;
    if (event.key === "Escape") closeCompare();
    if (event.key === "ArrowLeft") openCompare(state.current - 1);
    if (event.key === "ArrowRight") openCompare(state.current + 1);
  });
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.token = $("token").value;
    sessionStorage.setItem("handclip-token", state.token);
    loadInfo();
  });
  loadInfo();
}

setUp();

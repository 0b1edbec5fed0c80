// The csae feature browser: a page per dictionary (its features, sortable and filterable) and per feature.
// Data comes from data/*.js, loaded with <script> tags (file:// pages may not fetch); nothing leaves the machine.
"use strict";

const CSAE = (window.CSAE = { common: null, dicts: {}, waiting: {} });

function decode(text, Type) {
  const bin = atob(text);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new Type(bytes.buffer);
}

CSAE.addDictionary = function (raw) {
  const d = { ...raw };
  for (const [k, T] of [["fires", Int32Array], ["max", Float32Array], ["topics", Int32Array], ["hist", Int32Array],
    ["top_rows", Int32Array], ["top_val", Float32Array], ["top_win", Uint8Array], ["sample_rows", Int32Array],
    ["sample_val", Float32Array], ["sample_win", Uint8Array], ["up_ids", Int32Array], ["up", Float32Array],
    ["down_ids", Int32Array], ["down", Float32Array], ["nb_ids", Int32Array], ["nb_cos", Float32Array]]) {
    d[k] = decode(raw[k], T);
  }
  d.matches = {};
  for (const [run, m] of Object.entries(raw.matches)) {
    d.matches[run] = { ids: decode(m.ids, Int32Array), cos: decode(m.cos, Float32Array) };
  }
  CSAE.dicts[d.key] = d;
  (CSAE.waiting[d.key] || []).forEach((f) => f(d));
  delete CSAE.waiting[d.key];
};

function withDictionary(key, then) {
  if (CSAE.dicts[key]) return then(CSAE.dicts[key]);
  const entry = CSAE.common.dictionaries.find((x) => x.key === key);
  if (!entry) return showError(`no dictionary ${key}`);
  const first = !CSAE.waiting[key];
  (CSAE.waiting[key] = CSAE.waiting[key] || []).push(then);
  if (first) {
    const s = document.createElement("script");
    s.src = entry.file;
    s.charset = "utf-8";
    document.head.appendChild(s);
  }
}

const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
const tokText = (id) => {
  const t = CSAE.common.vocab[id];
  return t === undefined ? `<${id}>` : t.replace(/\n/g, "\u21b5");
};
const fmt = (x) => (Math.abs(x) >= 100 ? x.toFixed(0) : Math.abs(x) >= 1 ? x.toFixed(2) : x.toPrecision(2));
const pct = (x) => (x === 0 ? "0" : x < 0.0001 ? x.toExponential(1) : (100 * x).toPrecision(2)) + "%";
const main = () => document.getElementById("main");
const showError = (msg) => { main().innerHTML = `<p class="error">${esc(msg)}</p>`; };
const link = (key, f, text) => `<a href="#d=${encodeURIComponent(key)}&f=${f}">${esc(text)}</a>`;
// Features [0, high_level) of a T-SAE form its high-level block (0: no block); marked "HL" wherever a feature is listed.
const highLevel = (key) => (CSAE.common.dictionaries.find((x) => x.key === key) || {}).high_level || 0;
const hlMark = (key, f) => (f < highLevel(key) ? ' <span class="hl" title="high-level block">HL</span>' : "");

// ----- feature statistics ---------------------------------------------------------------------------------------
function contexts(d, f, kind) {
  const k = kind === "top" ? d.k_top : d.k_sample;
  const rows = d[kind + "_rows"], vals = d[kind + "_val"], win = d[kind + "_win"];
  const out = [];
  for (let j = 0; j < k; j++) {
    const r = rows[f * k + j];
    if (r < 0) continue;
    out.push({ row: r, val: vals[f * k + j], q: win.subarray((f * k + j) * d.width, (f * k + j + 1) * d.width) });
  }
  return out;
}

function preview(d, f) {
  const counts = new Map();
  for (const c of contexts(d, f, "top")) {
    const t = CSAE.rows.token[c.row];
    counts.set(t, (counts.get(t) || 0) + 1);
  }
  return [...counts.entries()].sort((a, b) => b[1] - a[1]).slice(0, 3).map(([t]) => JSON.stringify(tokText(t)));
}

function topTopic(d, f) {
  const T = CSAE.common.topics.length;
  if (!T) return ["", 0];
  let best = 0, total = 0;
  for (let t = 0; t < T; t++) {
    total += d.topics[f * T + t];
    if (d.topics[f * T + t] > d.topics[f * T + best]) best = t;
  }
  return total ? [CSAE.common.topics[best], d.topics[f * T + best] / total] : ["", 0];
}

// Search: features whose top contexts contain the query; ranked by how many contexts have it as their max token.
function searchIndex(d) {
  if (d.search) return d.search;
  const w = (d.width - 1) / 2;
  d.search = [];
  for (let f = 0; f < d.n_features; f++) {
    const centres = [], words = [];
    for (const c of contexts(d, f, "top")) {
      centres.push(tokText(CSAE.rows.token[c.row]).trim().toLowerCase());
      for (let o = -w; o <= w; o++) {
        const r = c.row + o;
        if (r >= 0 && r < CSAE.rows.token.length && CSAE.rows.seq[r] === CSAE.rows.seq[c.row]) {
          words.push(tokText(CSAE.rows.token[r]).toLowerCase());
        }
      }
    }
    d.search.push({ centres, text: words.join("\u0001") });
  }
  return d.search;
}

// ----- pages ----------------------------------------------------------------------------------------------------
function homePage() {
  document.getElementById("where").textContent = "";
  const rows = CSAE.common.dictionaries.map((x) => `<tr><td><a class="dict-link" href="#d=${encodeURIComponent(x.key)}">
    ${esc(x.run)}</a></td><td class="num">${x.layer}</td><td class="num">${x.n_features}</td>
    <td class="num">${x.live}</td><td class="num">${x.high_level ? `0-${x.high_level - 1}` : "-"}</td></tr>`).join("");
  main().innerHTML = `${answerPanel()}<div class="panel"><p>Every dictionary (run at its sparsity point, and layer).
    Open one to list its features; open a feature to see its contexts, logit effects, topics and neighbours.</p>
    <table><tr><th>run</th><th class="num">layer</th><th class="num">features</th><th class="num">firing</th>
    <th class="num">high-level block</th></tr>
    ${rows}</table></div>`;
}

// The answer first: the frontier figure and the verdicts at matched L0 (evaluate run's comparison.json).
function answerPanel() {
  const a = CSAE.common.answer;
  if (!a) return "";
  const fmt = (x) => (x === null || x === undefined ? "" : (x >= 0 ? "+" : "") + Number(x).toPrecision(3));
  const tables = Object.entries(a.tables).map(([name, columns]) => {
    const cols = Object.keys(columns);
    const figs = [...new Set(cols.flatMap((c) => Object.keys(columns[c])))];
    const link = (col) => {
      const [point, layer] = col.includes("/") ? col.split("/") : ["", col];
      const keys = CSAE.common.dictionaries.filter((x) => `layer_${x.layer}` === layer
        && (!point || x.run.endsWith("/" + point)));
      return `${esc(col)} ${keys.map((x) => `<a class="dict-link" href="#d=${encodeURIComponent(x.key)}">${esc(x.run)}</a>`).join(" ")}`;
    };
    const body = figs.map((f) => `<tr><td>${esc(f)}</td>${cols.map((c) => {
      const v = columns[c][f];
      return v ? `<td class="${v[0] === "better" ? "better" : v[0] === "worse" ? "worse" : ""}">${esc(v[0])}
        ${fmt(v[1])} [${fmt(v[2])}, ${fmt(v[3])}]</td>` : "<td>-</td>";
    }).join("")}</tr>`).join("");
    return `<h3>${esc(name.replace("_vs_", " vs "))}</h3><table><tr><th>figure</th>${cols.map((c) =>
      `<th>${link(c)}</th>`).join("")}</tr>${body}</table>`;
  }).join("");
  return `<div class="panel"><h2>The answer at matched sparsity</h2>
    ${a.frontier ? '<img class="frontier" src="frontier.png" alt="each figure against L0">' : ""}
    <p>Verdicts (${esc(a.method)}): difference with its 95% interval; better/worse when it excludes 0.</p>
    ${tables}</div>`;
}

const state = { sort: "density", desc: true, query: "", hideDead: true, dense: 10, shown: 200, blockOnly: false };

function blockNote(d) {
  if (!d.high_level) return "";
  return `<p class="muted" id="block-note">Features 0-${d.high_level - 1} (marked <span class="hl">HL</span>) are
    this SAE's high-level block: a Matryoshka prefix that must reconstruct on its own, trained (T-SAE) so that the
    block's codes of adjacent tokens agree; the others are the low-level features (docs/metrics.md).</p>`;
}

function dictionaryPage(d) {
  document.getElementById("where").textContent = `${d.run} \u00b7 layer ${d.layer}`;
  main().innerHTML = `<div class="controls">
    <input type="search" id="search" placeholder="search a token or word in top contexts" value="${esc(state.query)}">
    <label><input type="checkbox" id="hide-dead" ${state.hideDead ? "checked" : ""}> hide dead</label>
    <label>hide dense above <input type="number" id="dense" value="${state.dense}" min="0" max="100" step="any"
      style="width:60px">% of tokens</label>${d.high_level ? `<label><input type="checkbox" id="block-only"
      ${state.blockOnly ? "checked" : ""}> high-level block only</label>` : ""}<span id="count" class="muted"></span>
    </div>${blockNote(d)}
    <table id="features"><thead><tr><th data-s="id" class="num">feature</th><th data-s="density" class="num">density</th>
    <th data-s="max" class="num">max act</th><th data-s="topic">top topic</th><th>top tokens</th></tr></thead>
    <tbody></tbody></table><p><button id="more">show more</button></p>${probesPanel(d)}`;
  const redraw = () => fillTable(d);
  document.getElementById("search").addEventListener("input", (e) => { state.query = e.target.value; state.shown = 200; redraw(); });
  document.getElementById("hide-dead").addEventListener("change", (e) => { state.hideDead = e.target.checked; redraw(); });
  document.getElementById("dense").addEventListener("input", (e) => { state.dense = parseFloat(e.target.value); redraw(); });
  document.getElementById("more").addEventListener("click", () => { state.shown += 500; redraw(); });
  const blockOnly = document.getElementById("block-only");
  if (blockOnly) blockOnly.addEventListener("change", (e) => { state.blockOnly = e.target.checked; redraw(); });
  for (const th of document.querySelectorAll("th[data-s]")) {
    th.addEventListener("click", () => {
      state.desc = state.sort === th.dataset.s ? !state.desc : th.dataset.s !== "id";
      state.sort = th.dataset.s;
      redraw();
    });
  }
  redraw();
}

// The features sparse probing chose per topic (probing.json of `evaluate run`), best first, linked.
function probesPanel(d) {
  if (!d.probes || !Object.keys(d.probes).length) return "";
  const rows = Object.entries(d.probes).map(([topic, fs]) => `<tr><td>${esc(topic)}</td><td>${fs.map((f) =>
    link(d.key, f, "#" + f)).join(" ")}</td></tr>`).join("");
  return `<h3 id="probes">Features sparse probing chose per topic</h3><p class="muted">Ranked by the difference of
    their mean over the topic's training documents and over others' (docs/metrics.md).</p>
    <table class="probes"><thead><tr><th>topic</th><th>features</th></tr></thead><tbody>${rows}</tbody></table>`;
}

function fillTable(d) {
  const n = d.n_rows, q = state.query.trim().toLowerCase();
  const index = q ? searchIndex(d) : null;
  let feats = [];
  for (let f = 0; f < d.n_features; f++) {
    const density = d.fires[f] / n;
    if (state.hideDead && d.fires[f] === 0) continue;
    if (state.blockOnly && d.high_level && f >= d.high_level) continue;
    if (Number.isFinite(state.dense) && density > state.dense / 100) continue;
    let score = 0;
    if (index) {
      const s = index[f];
      score = s.centres.filter((c) => c === q).length * 1000 + (s.text.includes(q) ? 1 : 0);
      if (!score) continue;
    }
    feats.push({ f, density, max: d.max[f], score, topic: topTopic(d, f) });
  }
  const key = { id: (x) => x.f, density: (x) => x.density, max: (x) => x.max, topic: (x) => x.topic[0] }[state.sort];
  feats.sort((a, b) => (index && b.score !== a.score ? b.score - a.score
    : (key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : 0) * (state.desc ? -1 : 1)));
  document.getElementById("count").textContent = `${feats.length} of ${d.n_features} features` +
    (feats.length > state.shown ? `, first ${state.shown} shown` : "");
  document.getElementById("more").style.display = feats.length > state.shown ? "" : "none";
  for (const th of document.querySelectorAll("th[data-s]")) th.classList.toggle("sorted", th.dataset.s === state.sort);
  document.querySelector("#features tbody").innerHTML = feats.slice(0, state.shown).map((x) => `<tr class="feature-row"
    data-f="${x.f}"><td class="num">${link(d.key, x.f, "#" + x.f)}${hlMark(d.key, x.f)}</td><td class="num">${pct(x.density)}</td>
    <td class="num">${fmt(x.max)}</td><td>${esc(x.topic[0])} ${x.topic[0] ? `<span class="muted">${pct(x.topic[1])}</span>` : ""}</td>
    <td class="preview">${esc(preview(d, x.f).join("  "))}</td></tr>`).join("");
}

function renderContext(d, f, c, kind) {
  const w = (d.width - 1) / 2, R = CSAE.rows, maxF = d.max[f];
  let html = `<div class="context ${kind}"><span class="val">${fmt(c.val)}</span>`;
  for (let o = -w; o <= w; o++) {
    const r = c.row + o;
    if (r < 0 || r >= R.token.length || R.seq[r] !== R.seq[c.row]) continue;
    const a = o === 0 ? c.val : (c.q[o + w] / 255) * maxF;
    const alpha = maxF > 0 ? Math.min(1, a / maxF) : 0;
    html += `<span class="tok${o === 0 ? " max" : ""}" style="background:rgba(255,110,0,${alpha.toFixed(3)})"
      title="${o === 0 ? "" : "\u2248 "}${fmt(a)}">${esc(tokText(R.token[r]))}</span>`;
  }
  const doc = R.doc[c.row];
  return html + `<span class="doc">${esc(CSAE.common.titles[doc] || "")}</span></div>`;
}

function histogram(d, f) {
  const B = d.edges.length - 1, counts = d.hist.subarray(f * B, (f + 1) * B);
  let lo = counts.findIndex((x) => x > 0), hi = B - 1;
  while (hi > 0 && counts[hi] === 0) hi--;
  if (lo < 0) return "<p class='muted'>never fires on the rows read</p>";
  const top = Math.max(...counts), W = 560, H = 110, bw = W / (hi - lo + 1);
  let bars = "";
  for (let b = lo; b <= hi; b++) {
    const h = (counts[b] / top) * (H - 16);
    bars += `<rect x="${(b - lo) * bw}" y="${H - 14 - h}" width="${bw - 1}" height="${h}" fill="#4b7bd1">
      <title>[${fmt(d.edges[b])}, ${fmt(d.edges[b + 1])}): ${counts[b]}</title></rect>`;
  }
  return `<svg width="${W}" height="${H}" role="img">${bars}<text x="0" y="${H - 2}" font-size="10">${fmt(d.edges[lo])}</text>
    <text x="${W}" y="${H - 2}" font-size="10" text-anchor="end">${fmt(d.edges[hi + 1])}</text></svg>
    <p class="muted">Every positive activation on the rows read, log-spaced bins (hover a bar for its range and count).</p>`;
}

function logitList(d, f, which) {
  const k = d.k_logits, ids = d[which + "_ids"], vals = d[which];
  let html = "";
  for (let j = 0; j < k; j++) html += `<li>${fmt(vals[f * k + j]).padStart(8)}  ${esc(JSON.stringify(tokText(ids[f * k + j])))}</li>`;
  return `<ul class="plain logits-${which}">${html}</ul>`;
}

function topicsPanel(d, f) {
  const names = CSAE.common.topics, T = names.length;
  if (!T) return "<p class='muted'>the store has no topics</p>";
  const base = CSAE.topicBase, counts = [...d.topics.subarray(f * T, (f + 1) * T)];
  const total = counts.reduce((a, b) => a + b, 0) || 1;
  return `<table><tr><th>topic</th><th class="num">fires</th><th>share of its firing tokens</th>
    <th class="num">share of all tokens</th></tr>` + names.map((t, i) => `<tr><td>${esc(t)}</td>
    <td class="num">${counts[i]}</td><td><span class="bar" style="width:${(160 * counts[i]) / total}px"></span>
    ${pct(counts[i] / total)}</td><td class="num">${pct(base[i])}</td></tr>`).join("") + "</table>";
}

function neighboursPanel(d, f) {
  const k = d.k_nb;
  let html = "<ul class='plain'>";
  for (let j = 0; j < k; j++) {
    const g = d.nb_ids[f * k + j];
    html += `<li>${link(d.key, g, "#" + g)}${hlMark(d.key, g)}  cos ${d.nb_cos[f * k + j].toFixed(3)}</li>`;
  }
  html += "</ul>";
  for (const [run, m] of Object.entries(d.matches)) {
    const other = `${run}/layer_${d.layer}`;
    html += `<p class="match">best match in <b>${esc(run)}</b>: ${link(other, m.ids[f], `${run} #${m.ids[f]}`)}${hlMark(other,
      m.ids[f])} (decoder cosine ${m.cos[f].toFixed(3)})</p>`;
  }
  return html;
}

function featurePage(d, f) {
  if (!(f >= 0 && f < d.n_features)) return showError(`feature ${f} is not in ${d.key}`);
  document.getElementById("where").innerHTML = `<a href="#d=${encodeURIComponent(d.key)}">${esc(d.run)} \u00b7 layer
    ${d.layer}</a> \u00b7 feature ${f}`;
  const top = contexts(d, f, "top");
  const sample = contexts(d, f, "sample").sort((a, b) => b.val - a.val);
  main().innerHTML = `<div class="panel stats" id="feature" data-f="${f}"><b>${esc(d.run)} layer ${d.layer} feature ${f}</b>
    <span>density ${pct(d.fires[f] / d.n_rows)} (${d.fires[f]} of ${d.n_rows} tokens)</span>
    <span>max activation ${fmt(d.max[f])}</span>
    ${d.high_level ? `<span class="block">${f < d.high_level ? '<span class="hl">HL</span> high-level block'
      : "low-level feature"} (block: 0-${d.high_level - 1})</span>` : ""}
    <span>${f > 0 ? link(d.key, f - 1, "\u2190 prev") : ""} ${f + 1 < d.n_features ? link(d.key, f + 1, "next \u2192") : ""}</span></div>
    <div class="panel"><h3>Top ${top.length} contexts</h3><p class="muted">Each token coloured by the feature's activation
    (hover: value), the token of the context outlined; its exact activation on the left.</p>
    <div id="top-contexts">${top.map((c) => renderContext(d, f, c, "top")).join("") || "<p>never fires</p>"}</div></div>
    <div class="panel"><h3>Random firing contexts</h3><p class="muted">A uniform sample of the tokens it fires on (so
    mostly from its lower activation quantiles), highest first.</p>${sample.map((c) => renderContext(d, f, c, "sample")).join("")}</div>
    <div class="grid"><div class="panel"><h3>Activation histogram</h3>${histogram(d, f)}</div>
    <div class="panel"><h3>Logit effects</h3><div class="grid"><div><b>raises</b>${logitList(d, f, "up")}</div>
    <div><b>lowers</b>${logitList(d, f, "down")}</div></div><p class="muted">${esc(CSAE.common.about.logit_note)}</p></div>
    <div class="panel"><h3>Topics of its firing tokens</h3>${topicsPanel(d, f)}</div>
    <div class="panel"><h3>Nearest features (decoder cosine)</h3>${neighboursPanel(d, f)}</div></div>`;
}

// ----- routing --------------------------------------------------------------------------------------------------
function route() {
  const params = new URLSearchParams(location.hash.slice(1));
  const key = params.get("d");
  if (!key) return homePage();
  const f = params.get("f");
  withDictionary(key, (d) => (f === null ? dictionaryPage(d) : featurePage(d, parseInt(f, 10))));
  window.scrollTo(0, 0);
}

function init() {
  const c = CSAE.common;
  CSAE.rows = { token: decode(c.token, Int32Array), seq: decode(c.seq, Int32Array), doc: decode(c.doc, Int32Array) };
  const base = new Array(c.topics.length).fill(0);
  for (let i = 0; i < CSAE.rows.doc.length; i++) {
    const t = c.doc_topic[CSAE.rows.doc[i]];
    if (t >= 0) base[t] += 1;
  }
  CSAE.topicBase = base.map((x) => x / Math.max(1, CSAE.rows.doc.length));
  document.getElementById("about").textContent = `Store ${c.about.store} (model ${c.about.model}); ${c.about.rows_note}.
    Checkpoints: ${c.about.checkpoints.join(", ")}, seed ${c.about.config.seed}.`;
  window.addEventListener("hashchange", route);
  route();
}

document.addEventListener("DOMContentLoaded", init);

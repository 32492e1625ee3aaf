// The /ui page: upload, job list, job page (live progress, stages, warnings, frames, results,
// downloads) and the 3D viewer (viewer.js, loaded on demand so the page works without three.js).
// Plain ES module, no framework; every value from the API is put in the page as text (never as
// HTML). Requests go to this origin only.

const STAGES = [
  ["frames", "Frame Extraction"], ["features", "Feature Detection"],
  ["matching", "Feature Matching"], ["mapping", "Sparse Reconstruction"],
  ["dense", "Dense Reconstruction"], ["meshing", "Meshing"], ["export", "Exporting"],
];
const TERMINAL = new Set(["completed", "failed", "cancelled", "expired", "deleted"]);
const KEY_STORE = "colmap-worker.api-key";
const POLL_MS = 1500;          // job page fallback when the events stream is unavailable
const LIST_MS = 2500;          // job list refresh
const SERVICE_MS = 5000;       // header (jobs running) refresh: GET /health is cheap
const STRIP_MAX = 60;          // frame images shown in the strip
// names an events stream may give its events (EventSource's onmessage sees unnamed ones only)
const EVENT_NAMES = ["message", "snapshot", "status", "progress", "stage", "attempt", "warning",
                     "job", "completed", "failed", "cancelled"];

const $ = (sel) => document.querySelector(sel);
let apiKey = localStorage.getItem(KEY_STORE) || "";
let authOn = false;
let listTimer = null;
let jobCtl = null;
let serviceLine = "";

// ---------- small helpers ----------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = String(v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function fmtS(s) {
  if (s === null || s === undefined) return "";
  return s < 10 ? `${s.toFixed(2)} s` : s < 120 ? `${s.toFixed(1)} s` : `${(s / 60).toFixed(1)} min`;
}

function fmtNum(v, digits = 2) {
  if (v === null || v === undefined) return "";
  return Number.isInteger(v) ? String(v) : Number(v).toFixed(digits);
}

function fmtTime(iso) {
  return iso ? iso.replace("T", " ").replace(/\.\d+/, "").replace(/(\+00:00|Z)$/, "") : "";
}

function notice(text) {
  const p = $("#notice");
  p.textContent = text || "";
  p.hidden = !text;
}

class ApiFailure extends Error {
  constructor(status, error) {
    super(error ? `${error.message} ${error.hint || ""}`.trim() : `HTTP ${status}`);
    this.status = status;
    this.error = error || null;
  }
}

function headers(extra = {}) {
  const h = { Accept: "application/json", ...extra };
  if (apiKey) h["X-API-Key"] = apiKey;
  return h;
}

async function request(path, opts = {}) {
  const r = await fetch(path, { ...opts, headers: headers(opts.headers) });
  if (!r.ok) {
    let body = null;
    try { body = await r.json(); } catch { /* not JSON */ }
    if (r.status === 401) askForKey(body && body.error ? body.error.message : "");
    throw new ApiFailure(r.status, body && body.error);
  }
  return r;
}

async function api(path, opts = {}) {
  return (await request(path, opts)).json();
}

/** An artifact's or frame's bytes (the URL is signed while keys are on; the key goes too). */
async function bytes(url) {
  return (await request(url)).arrayBuffer();
}

// ---------- API key ----------

function askForKey(why) {
  $("#key-form").hidden = false;
  $("#key-state").textContent = why || (apiKey ? "key set" : "this service needs an API key");
}

function setupKey() {
  $("#key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    apiKey = $("#key-input").value.trim();
    $("#key-input").value = "";
    if (apiKey) localStorage.setItem(KEY_STORE, apiKey); else localStorage.removeItem(KEY_STORE);
    $("#key-state").textContent = apiKey ? "key set" : "no key";
    notice("");
    route();
  });
  $("#key-forget").addEventListener("click", () => {
    apiKey = "";
    localStorage.removeItem(KEY_STORE);
    $("#key-state").textContent = "no key";
  });
}

async function loadService() {
  try {
    const [root, health] = await Promise.all([api("/"), api("/health")]);
    authOn = health.auth === "on";
    serviceLine = `v${root.version} · ${root.gpu_enabled ? "GPU" : "CPU"}`;
    showHealth(health);
    if (authOn) askForKey(apiKey ? "key set" : "this service needs an API key");
  } catch (e) {
    notice(`The service does not answer: ${e.message}`);
  }
  setInterval(refreshHealth, SERVICE_MS);  // the header's count follows the jobs
}

function showHealth(health) {
  $("#service").textContent = `${serviceLine} · ${health.active_jobs}/${health.max_concurrent_jobs} jobs running`;
}

async function refreshHealth() {
  try { showHealth(await api("/health")); } catch { /* the next refresh tries again */ }
}

// ---------- home: upload and job list ----------

function setupUpload() {
  const files = $("#upload-files");
  for (const radio of document.querySelectorAll('input[name="kind"]')) {
    radio.addEventListener("change", () => {
      const photos = radio.value === "images" && radio.checked;
      files.multiple = photos;
      files.accept = photos ? "image/jpeg,image/png,.zip,application/zip" : "video/*";
    });
  }
  $("#upload-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    upload();
  });
}

function upload() {
  const kind = document.querySelector('input[name="kind"]:checked').value;
  const chosen = [...$("#upload-files").files];
  if (!chosen.length) return;
  const form = new FormData();
  form.append("project_id", $("#upload-project").value.trim() || "web");
  const name = $("#upload-name").value.trim() ||
    (kind === "video" || chosen.length === 1 ? chosen[0].name.replace(/\.[^.]+$/, "") : `${chosen.length} photos`);
  form.append("scan_name", name.slice(0, 200));
  form.append("quality", $("#upload-quality").value);
  for (const f of chosen) form.append(kind === "video" ? "video" : "images", f);
  const total = chosen.reduce((s, f) => s + f.size, 0);

  const xhr = new XMLHttpRequest();
  xhr.open("POST", kind === "video" ? "/upload-video" : "/upload-images");
  for (const [k, v] of Object.entries(headers())) xhr.setRequestHeader(k, v);
  const bar = $("#upload-bar");
  const text = $("#upload-text");
  $("#upload-progress").hidden = false;
  $("#upload-button").disabled = true;
  bar.value = 0;
  text.textContent = `Uploading 0 of ${fmtBytes(total)}`;
  xhr.upload.onprogress = (e) => {
    if (!e.lengthComputable) return;
    bar.value = (100 * e.loaded) / e.total;
    text.textContent = `Uploading ${fmtBytes(e.loaded)} of ${fmtBytes(e.total)} (${Math.floor(bar.value)}%)`;
  };
  xhr.upload.onload = () => { text.textContent = "Uploaded; the server checks the file…"; };
  xhr.onload = () => {
    $("#upload-button").disabled = false;
    let body = null;
    try { body = JSON.parse(xhr.responseText); } catch { /* not JSON */ }
    if (xhr.status === 202 && body) {
      text.textContent = `${body.message}: job ${body.job_id}`;
      location.hash = `#/jobs/${body.job_id}`;
      return;
    }
    const err = body && body.error;
    if (xhr.status === 401) askForKey(err ? err.message : "");
    text.textContent = err ? `Refused (${err.code}): ${err.message} ${err.hint || ""}` : `Upload failed (HTTP ${xhr.status})`;
  };
  xhr.onerror = () => {
    $("#upload-button").disabled = false;
    text.textContent = "Upload failed: the connection was lost.";
  };
  xhr.send(form);
}

function badge(status) {
  return el("span", { class: `badge ${status}`, text: status });
}

async function refreshList() {
  clearTimeout(listTimer);
  if (authOn && !apiKey) {      // nothing to ask before the key is typed (a 401 otherwise)
    $("#jobs-empty").textContent = "Type the API key (top right) to see your jobs.";
    $("#jobs-empty").hidden = false;
    return;
  }
  $("#jobs-empty").textContent = "No jobs yet.";
  try {
    const list = await api("/jobs?limit=50");
    const body = $("#jobs-table tbody");
    body.replaceChildren(...list.jobs.map((j) => el("tr", {},
      el("td", {}, el("a", { href: `#/jobs/${j.job_id}`, text: j.scan_name })),
      el("td", { text: j.quality }),
      el("td", {}, badge(j.status)),
      el("td", {}, el("progress", { max: 100, value: j.progress }), ` ${j.progress}%`),
      el("td", { text: j.current_stage || (j.queue_position ? `queued #${j.queue_position}` : "") }),
      el("td", { text: fmtTime(j.created_at) }))));
    $("#jobs-empty").hidden = list.jobs.length > 0;
  } catch (e) {
    if (!(e instanceof ApiFailure && e.status === 401)) notice(`Job list: ${e.message}`);
  }
  if (!$("#home").hidden) listTimer = setTimeout(refreshList, LIST_MS);
}

// ---------- job page ----------

function stopJob() {
  if (!jobCtl) return;
  jobCtl.closed = true;
  if (jobCtl.es) jobCtl.es.close();
  clearTimeout(jobCtl.timer);
  if (jobCtl.viewer) jobCtl.viewer.dispose();
  for (const url of jobCtl.blobs) URL.revokeObjectURL(url);
  jobCtl = null;
}

async function showJob(id) {
  $("#home").hidden = true;
  if (authOn && !apiKey) { $("#job").hidden = true; notice("Type the API key (top right) to see this job."); return; }
  $("#job").hidden = false;
  const ctl = { id, closed: false, es: null, timer: null, viewer: null, blobs: [],
                framesLoaded: false, frameWarnings: [], finished: false, job: null };
  jobCtl = ctl;
  $("#job-title").textContent = `Job ${id}`;
  for (const sel of ["#timeline", "#downloads", "#frames-plot", "#frames-strip"]) $(sel).replaceChildren();
  $("#results tbody").replaceChildren();
  $("#viewer").replaceChildren(el("p", { class: "muted", text: "The model appears here when the job has completed." }));
  $("#viewer-layers").replaceChildren();
  $("#warnings").replaceChildren(el("li", { class: "muted", text: "None." }));
  $("#frames-summary").textContent = "The frame selection appears once the Frame Extraction stage has run.";
  let job;
  try {
    job = await api(`/jobs/${encodeURIComponent(id)}`);
  } catch (e) {
    $("#job").hidden = true;  // no placeholder job around the error
    if (e instanceof ApiFailure && e.status === 401) {
      notice("The API key was refused: type a valid key at the top right, then open the job again.");
    } else if (e instanceof ApiFailure && e.status === 404) {
      notice(`There is no job ${id} for this API key (a job of another key is not shown).`);
    } else {
      notice(`Job ${id}: ${e.message}`);
    }
    return;
  }
  if (ctl.closed) return;
  renderJob(ctl, job);
  if (TERMINAL.has(job.status)) finish(ctl, job); else follow(ctl, job);
}

/** Live progress: the job's events stream (EventSource), or polling when it is unavailable. */
function follow(ctl, job) {
  const url = job.events_url || (authOn ? null : `/jobs/${encodeURIComponent(ctl.id)}/events`);
  if (!url || !window.EventSource) { poll(ctl); return; }
  const es = new EventSource(url);
  ctl.es = es;
  const live = $("#job-live");
  live.textContent = "live";
  live.dataset.mode = "events";
  live.dataset.events = "0";
  const onEvent = (ev) => {
    let data;
    try { data = JSON.parse(ev.data); } catch { return; }
    if (ctl.closed || !data || typeof data !== "object") return;
    live.dataset.events = String(Number(live.dataset.events) + 1);
    applyLive(ctl, data);
    if (TERMINAL.has(data.status)) { es.close(); settle(ctl); }
  };
  for (const name of EVENT_NAMES) es.addEventListener(name, onEvent);
  es.onerror = () => {            // no stream (older server, proxy) or a dropped one: poll
    if (ctl.closed || ctl.finished) return;
    es.close();
    ctl.es = null;
    poll(ctl);
  };
}

async function poll(ctl) {
  if (ctl.closed) return;
  $("#job-live").textContent = "polling";
  $("#job-live").dataset.mode = "polling";
  try {
    const job = await api(`/jobs/${encodeURIComponent(ctl.id)}`);
    if (ctl.closed) return;
    renderJob(ctl, job);
    if (TERMINAL.has(job.status)) { finish(ctl, job); return; }
  } catch (e) {
    notice(`Job ${ctl.id}: ${e.message}`);
  }
  ctl.timer = setTimeout(() => poll(ctl), POLL_MS);
}

/** After the terminal event: the full job (results, artifacts) once. */
async function settle(ctl) {
  try {
    const job = await api(`/jobs/${encodeURIComponent(ctl.id)}`);
    if (!ctl.closed) { renderJob(ctl, job); finish(ctl, job); }
  } catch (e) {
    notice(`Job ${ctl.id}: ${e.message}`);
  }
}

function finish(ctl, job) {
  if (ctl.finished) return;
  ctl.finished = true;
  $("#job-live").textContent = "";
  refreshHealth();  // the header's count without waiting for its next refresh
  loadFrames(ctl, job);
  if (job.status === "completed") loadViewer(ctl, job);
}

/** One event's fields (status, progress, current_stage, message) into the status line. */
function applyLive(ctl, data) {
  const job = { ...(ctl.job || {}), ...data };
  if (typeof data.progress !== "number" && ctl.job) job.progress = ctl.job.progress;
  renderStatus(job);
  ctl.job = job;
  renderTimeline(job);
  if (!ctl.framesLoaded && stageIndex(job.current_stage) > 0) loadFrames(ctl, job);
}

function stageIndex(display) {
  return STAGES.findIndex(([id, name]) => name === display || id === display);
}

function renderStatus(job) {
  $("#job-status").replaceWith(Object.assign(badge(job.status), { id: "job-status" }));
  $("#job-bar").value = job.progress || 0;
  $("#job-progress").textContent = `${job.progress || 0}%`;
  $("#job-stage").textContent = job.current_stage || (job.queue_position ? `queued, #${job.queue_position}` : "");
  $("#job-message").textContent = job.message || "";
}

function renderJob(ctl, job) {
  ctl.job = job;
  $("#job-title").textContent = `${job.scan_name} · ${job.quality} · ${job.job_id}`;
  renderStatus(job);
  const err = $("#job-error");
  err.hidden = !job.error;
  if (job.error) {
    err.replaceChildren(el("strong", { text: `${job.error.code}: ` }), job.error.message,
      el("br"), el("em", { text: job.error.hint || "" }));
  }
  renderTimeline(job);
  renderResults(job);
  renderDownloads(job);
  renderWarnings(ctl, job);
  if (!ctl.framesLoaded && (stageIndex(job.current_stage) > 0 || TERMINAL.has(job.status))) loadFrames(ctl, job);
}

function renderTimeline(job) {
  const last = (job.attempts || []).at(-1);
  const wall = (last && last.stage_wall_s) || {};
  const timings = (job.results && job.results.timings_s) || {};
  const skipped = new Set((last && last.skipped_stages) || []);
  const r = job.results || {};
  const notRun = new Set(["dense", "meshing"].filter((id) => r[id] && r[id].skipped));
  const current = stageIndex(job.current_stage);
  const done = job.status === "completed";
  const times = STAGES.map(([id]) => wall[id] ?? timings[id] ?? null);
  const longest = Math.max(1e-9, ...times.filter((t) => t !== null));
  const items = STAGES.map(([id, name], i) => {
    let state = "pending";
    if (times[i] !== null || (done && skipped.has(id))) state = "done";
    else if (i === current && !TERMINAL.has(job.status)) state = "running";
    else if (i < current || done) state = "done";
    if (job.status === "failed" && last && last.failed_stage === id) state = "failed";
    const t = notRun.has(id) ? null : times[i];  // a stage that only said "skipped": no bar
    const bar = el("span", { class: "bar" });
    bar.style.width = t === null ? "0" : `${Math.max(1, (100 * t) / longest)}%`;
    const note = notRun.has(id) ? "skipped" : skipped.has(id) ? "from checkpoint"
      : state === "running" ? "running…" : "";
    return el("li", { class: state, "data-stage": id },
      el("span", { class: "name", text: name }), el("span", { class: "track" }, bar),
      el("span", { class: "time", text: t !== null ? fmtS(t) : note }));
  });
  const extra = [];
  if (job.created_at && job.started_at) {
    const wait = (Date.parse(job.started_at) - Date.parse(job.created_at)) / 1000;
    if (wait >= 0) extra.push(el("li", { class: "meta" }, `queued ${fmtS(wait)}`));
  }
  if (job.results && job.results.job_wall_time_s) {
    extra.push(el("li", { class: "meta" }, `total ${fmtS(job.results.job_wall_time_s)}` +
      (job.attempts_total > 1 ? ` (attempt ${job.attempt})` : "")));
  }
  const ladder = (job.results && job.results.mapping_attempts) || [];
  if (ladder.length > 1) {
    extra.push(el("li", { class: "meta" }, "mapping attempts: " + ladder.map(
      (a) => `${a.step} ${a.outcome} ${fmtS(a.elapsed_s)}`).join(" · ")));
  }
  $("#timeline").replaceChildren(...items, ...extra);
}

function renderResults(job) {
  const r = job.results;
  const rows = [];
  const add = (k, v) => { if (v !== null && v !== undefined && v !== "") rows.push(el("tr", {}, el("th", { text: k }), el("td", { text: v }))); };
  if (job.video) {
    const v = job.video;
    add("Input", v.kind === "images" ? `${v.images} photos` : `${v.width}×${v.height} ${v.codec || ""}, ${fmtNum(v.fps, 1)} fps, ${fmtS(v.duration_s)}`);
  }
  add("Upload", fmtBytes(job.input_bytes));
  if (r) {
    add("Frames selected", r.frames_extracted);
    add("Frames used", r.frames_used);
    add("Registered images", `${r.registered_images} of ${r.frames_used}` + (r.partial ? " (partial)" : ""));
    add("3D points", r.points3d);
    add("Observations", r.observations);
    add("Mean reprojection error", `${fmtNum(r.mean_reprojection_error_px, 3)} px`);
    add("Mean track length", fmtNum(r.mean_track_length, 2));
    add("Observations per image", fmtNum(r.mean_observations_per_image, 1));
    const cams = r.cameras && r.cameras.length > 1 ? r.cameras : (r.camera ? [r.camera] : []);
    cams.forEach((c, i) => {  // every camera: a photo set may have one per EXIF group
      const p = c.params || {};
      const f = p.f ?? p.fx;
      add(cams.length > 1 ? `Camera ${i + 1} of ${cams.length}` : "Camera",
          `${c.model} ${c.width}×${c.height}` + (f ? `, f = ${fmtNum(f, 1)} px` : "") +
          (cams.length > 1 && c.images ? `, ${c.images} images` : ""));
    });
    if (r.matching && r.matching.method) {
      const why = r.matching.order && r.matching.order.reason ? ` (${r.matching.order.reason.replaceAll("_", " ")})` : "";
      add("Matching", `${r.matching.method}, ${r.matching.image_pairs} image pairs` + why);
    }
    add("Mapper", r.mapper);
    if (r.dense) add("Dense", r.dense.skipped ? String(r.dense.reason || "skipped") : `${r.dense.points ?? ""} points`);
    add("Wall time", fmtS(r.job_wall_time_s));
  }
  $("#results tbody").replaceChildren(...rows);
}

function renderDownloads(job) {
  const arts = job.artifacts || [];
  if (!arts.length) {
    const why = TERMINAL.has(job.status) ? `None: the job is ${job.status}.` : "None yet.";
    $("#downloads").replaceChildren(el("p", { class: "muted", text: why }));
    return;
  }
  $("#downloads").replaceChildren(...arts.map((a) => el("a", { class: "button", href: a.url, download: a.name },
    a.name, el("small", { text: ` ${fmtBytes(a.bytes)}` }))));
}

function renderWarnings(ctl, job) {
  const seen = new Set();
  const items = [];
  const add = (w, cls = "") => {
    const key = `${w.code}|${w.message}`;
    if (seen.has(key)) return;
    seen.add(key);
    items.push(el("li", { class: cls }, el("strong", { text: w.code }), `: ${w.message}`,
      w.hint ? el("div", { class: "hint", text: `Hint: ${w.hint}` }) : null));
  };
  if (job.error) add(job.error, "error");
  for (const w of (job.results && job.results.warnings) || []) add(w);
  const checks = job.results && job.results.checks;
  if (checks && checks.failures && checks.failures.length) add({ code: "model_checks", message: `failed checks: ${checks.failures.join(", ")}` });
  for (const w of ctl.frameWarnings) add(w);
  $("#warnings").replaceChildren(...(items.length ? items : [el("li", { class: "muted", text: "None." })]));
}

// ---------- frames: plot and strip ----------

const REASON_COLOURS = { kept: "#2e9d57", not_sharpest: "#9aa3ad", blurry: "#d9822b", near_duplicate: "#7a6fd0",
                         black: "#333", overexposed: "#e0c341", blank: "#c0504d" };

async function loadFrames(ctl, job) {
  if (ctl.framesLoaded) return;
  ctl.framesLoaded = true;
  let doc;
  try {
    doc = await api(`/jobs/${encodeURIComponent(ctl.id)}/frames`);
  } catch (e) {
    ctl.framesLoaded = !(e instanceof ApiFailure && e.status === 409);  // not yet: try later
    return;
  }
  if (ctl.closed) return;
  ctl.frameWarnings = doc.warnings || [];
  renderWarnings(ctl, ctl.job || job);
  const dropped = Object.entries(doc.dropped || {}).map(([k, v]) => `${v} ${k}`).join(", ");
  $("#frames-summary").textContent = doc.input_kind === "images"
    ? `${doc.kept} photos, all kept.`
    : `${doc.kept} of ${doc.num_decoded} decoded frames kept (cap ${doc.cap})` + (dropped ? `; dropped: ${dropped}.` : ".");
  if (doc.input_kind !== "images") $("#frames-plot").replaceChildren(framePlot(doc.frames || []));
  const files = doc.input_kind === "images"
    ? doc.photos.map((p) => ({ file: p.file, label: p.source }))
    : doc.frames.filter((f) => f.kept && f.file).map((f) => ({ file: f.file, label: `${f.timestamp_s.toFixed(2)} s` }));
  loadStrip(ctl, files.slice(0, STRIP_MAX));
}

async function loadStrip(ctl, files) {
  const strip = $("#frames-strip");
  const figures = files.map((f) => el("figure", {}, el("div", { class: "thumb" }), el("figcaption", { text: f.label })));
  strip.replaceChildren(...figures);
  for (let i = 0; i < files.length; i += 1) {
    if (ctl.closed) return;
    try {
      const buf = await bytes(`/jobs/${encodeURIComponent(ctl.id)}/frames/${encodeURIComponent(files[i].file)}`);
      const url = URL.createObjectURL(new Blob([buf], { type: "image/jpeg" }));
      ctl.blobs.push(url);
      figures[i].firstChild.replaceWith(el("img", { src: url, alt: files[i].file, title: files[i].file }));
    } catch {
      return;  // not on this server's disk (another replica, retention): captions only
    }
  }
}

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== null) node.textContent = text;
  return node;
}

/** Sharpness (top) and motion since the last kept frame (bottom) of every decoded frame
 * against its time; kept frames green, dropped ones coloured by reason (tooltip: the numbers). */
function framePlot(frames) {
  const W = 900, H = 262, L = 56, R = 10, T = 18, gap = 34, ph = (H - T - gap - 30) / 2;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "plot", role: "img",
                            "aria-label": "sharpness and motion of each decoded frame" });
  if (!frames.length) return root;
  const t0 = frames[0].timestamp_s;
  const t1 = Math.max(t0 + 1e-6, frames.at(-1).timestamp_s);
  const x = (t) => L + ((W - L - R) * (t - t0)) / (t1 - t0);
  const range = (vals) => {
    const v = vals.filter((a) => a !== null && a !== undefined);
    const lo = v.length ? Math.min(...v) : 0, hi = v.length ? Math.max(...v) : 1;
    return [lo, Math.max(hi, lo + 1e-6)];
  };
  const panels = [
    { label: "sharpness (variance of the Laplacian)", vals: frames.map((f) => f.sharpness), digits: 0 },
    { label: "motion since the last kept frame (px)", vals: frames.map((f) => f.motion_px), digits: 1 },
  ];
  panels.forEach((p, k) => {
    const y0 = T + k * (ph + gap);
    const [lo, hi] = range(p.vals);
    const y = (v) => y0 + ph - 4 - ((ph - 8) * (v - lo)) / (hi - lo);
    root.append(svg("rect", { x: L, y: y0, width: W - L - R, height: ph, class: "frame" }));
    root.append(svg("text", { x: L, y: y0 - 4, class: "axis" }, p.label));
    root.append(svg("text", { x: L - 4, y: y0 + 10, class: "axis end" }, fmtNum(hi, p.digits)));
    root.append(svg("text", { x: L - 4, y: y0 + ph, class: "axis end" }, fmtNum(lo, p.digits)));
    frames.forEach((f, i) => {
      const v = p.vals[i];
      if (v === null || v === undefined) return;
      const reason = f.kept ? "kept" : (f.reason || "dropped");
      const dot = svg("circle", { cx: x(f.timestamp_s).toFixed(1), cy: y(v).toFixed(1),
                                  r: f.kept ? 3.2 : 2.2, fill: REASON_COLOURS[reason] || "#c0504d",
                                  class: f.kept ? "kept" : "dropped", "data-reason": reason });
      dot.append(svg("title", {}, `${f.timestamp_s.toFixed(2)} s · sharpness ${fmtNum(f.sharpness, 1)}` +
        (f.motion_px !== null && f.motion_px !== undefined ? ` · motion ${fmtNum(f.motion_px, 2)} px` : "") +
        ` · ${f.kept ? `kept (${f.file || ""})` : `dropped: ${reason}`}`));
      root.append(dot);
    });
  });
  root.append(svg("text", { x: L, y: H - 4, class: "axis" }, `${t0.toFixed(1)} s`));
  root.append(svg("text", { x: W - R, y: H - 4, class: "axis end" }, `${t1.toFixed(1)} s`));
  const counts = {};
  for (const f of frames) { const k = f.kept ? "kept" : (f.reason || "dropped"); counts[k] = (counts[k] || 0) + 1; }
  let lx = L + 70;
  for (const [k, n] of Object.entries(counts)) {
    root.append(svg("circle", { cx: lx, cy: H - 8, r: 4, fill: REASON_COLOURS[k] || "#c0504d" }));
    const label = `${k} ${n}`;
    root.append(svg("text", { x: lx + 7, y: H - 4, class: "axis" }, label));
    lx += 18 + 7 * label.length;
  }
  return root;
}

// ---------- 3D viewer ----------

function artifact(job, name) {
  return (job.artifacts || []).find((a) => a.name === name) || null;
}

async function loadViewer(ctl, job) {
  const box = $("#viewer");
  let mod;
  try {
    mod = await import("./viewer.js");
  } catch (e) {
    box.replaceChildren(el("p", { class: "problem", text: "The 3D viewer is unavailable: three.js is not installed on the server (run `npm ci` in its directory and restart it)." }));
    return;
  }
  if (ctl.closed) return;
  box.replaceChildren();
  const layers = {
    sparse: artifact(job, "sparse_pc.ply") || artifact(job, "sparse.ply"),
    transforms: artifact(job, "transforms.json"),
    dense: artifact(job, "fused.ply"),
    mesh: artifact(job, "mesh.glb"),
  };
  try {
    ctl.viewer = await mod.createViewer(box, $("#viewer-layers"), layers, bytes);
    if (ctl.closed) ctl.viewer.dispose();
  } catch (e) {
    box.replaceChildren(el("p", { class: "problem", text: `The 3D view failed: ${e.message}` }));
  }
}

// ---------- routing ----------

function route() {
  stopJob();
  notice("");
  const m = location.hash.match(/^#\/jobs\/([A-Za-z0-9_-]{1,100})$/);
  if (m) { clearTimeout(listTimer); showJob(m[1]); return; }
  $("#job").hidden = true;
  $("#home").hidden = false;
  refreshList();
}

setupKey();
setupUpload();
window.addEventListener("hashchange", route);
loadService().then(route);

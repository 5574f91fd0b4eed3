/*
 * Lookalike's try page, and the reference JavaScript client of its public endpoint.
 *
 * The client is one function, usable from any page or app that can reach the transformer (same origin,
 * or behind a proxy that adds CORS headers; `lookalike serve` puts this page on such an origin):
 *
 *     import { searchPhoto, SearchError } from "./app.js";
 *
 *     const result = await searchPhoto(file, { topK: 10 });   // file: a File or Blob of a JPEG/PNG/WebP
 *     result.matches       // the top listings, each once, best first: [{listing_id, title, score,
 *                          //   labels: {category, color, ...}, metadata: {url, price, ...},
 *                          //   photo_id (the photo that matched), image_url (that photo, fetchable),
 *                          //   image_urls (all the listing's photos), category, image}, ...]
 *     result.labels        // {category: {label, probability}, ...} predicted for the photo
 *     result.box           // the part of the photo searched: {box: [x0, y0, x1, y1] (fractions of the
 *                          //   photo), searched: "crop" (the product the service found) | "whole" |
 *                          //   "app" (your box), confidence, region (the crop, with context)}
 *     result.modelVersion  // the model version that answered
 *     result.indexVersion  // the index version that answered
 *     result.requestId     // the id the server logged the request under
 *     result.elapsedMs     // round trip, measured here
 *
 *     // on failure it throws SearchError {status, message}: message is the server's own text,
 *     // e.g. 400 "the image is not an image we can read (JPEG, PNG or WebP expected)",
 *     //      413 "the image is 12,345,678 bytes; the limit is 10,485,760", 503 (not ready)
 *
 * Options: topK (1-100, default 10), filter ("category=footwear", "category=predicted"), nprobe,
 * box ("x0,y0,x1,y1" fractions: search only that part), crop ("auto", the default: search the product the
 * service finds; "off": the whole photo), model (default "lookalike"), baseUrl (default "": this
 * origin), signal (an AbortSignal).
 *
 * "More like this" for a listing already in the index needs no photo: the same options, and
 *
 *     const result = await searchListing("listing-123", { topK: 10 });  // optionally { photoId: "2" }
 *
 * sends the listing id instead of a photo (input `listing_id`, BYTES; `photo_id` beside it to search
 * with that photo of the listing rather than its first): the listing's own stored vector is searched
 * with, the listing is left out of its results, and `result.labels` are its own catalog labels. An
 * unknown listing is a 404 whose message names it.
 *
 * On the wire it is a KServe v2 (Open Inference Protocol) REST request with the binary tensor extension:
 *
 *     POST /v2/models/lookalike/infer
 *     Content-Type: application/octet-stream
 *     Inference-Header-Content-Length: <bytes of the JSON header>
 *
 *     {"inputs":[{"name":"image","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":N}}],
 *      "parameters":{"top_k":10},
 *      "outputs":[{"name":"matches","parameters":{"binary_data":false}}]}
 *     <N bytes: the BYTES element = 4-byte little-endian length, then the photo's bytes>
 *
 * The photo goes up as raw bytes (no base64). Only the `matches` output is asked for, as JSON: BYTES
 * outputs in JSON are strings, and `matches` holds one JSON document per photo with everything the page
 * needs, so the answer is two JSON.parse calls. (Asking for binary outputs would need the reply's
 * Inference-Header-Content-Length and the same length-prefixed decoding; nothing is gained here.)
 * The reply's `parameters` carry `model_version` and `index_version`. Errors are v2 errors: a status
 * (400 bad input, 413 too large, 503 not ready, 504 too slow) and a body {"error": "<message>"}.
 */

export class SearchError extends Error {
  constructor(status, message) {
    super(message);
    this.name = "SearchError";
    this.status = status; // the HTTP status; 0 when no server answered at all
  }
}

const utf8 = new TextEncoder();

/* One BYTES element: its length (uint32, little-endian), then its bytes. */
function bytesElement(bytes) {
  const element = new Uint8Array(4 + bytes.length);
  new DataView(element.buffer).setUint32(0, bytes.length, true);
  element.set(bytes, 4);
  return element;
}

export async function searchPhoto(file, options = {}) {
  const photo = new Uint8Array(await file.arrayBuffer());
  return search_({ image: bytesElement(photo) }, options);
}

export async function searchListing(listingId, { photoId = null, ...options } = {}) {
  const inputs = { listing_id: bytesElement(utf8.encode(String(listingId))) };
  if (photoId) inputs.photo_id = bytesElement(utf8.encode(String(photoId)));
  return search_(inputs, options);
}

/* One query (a photo, or a listing) as a v2 binary-extension request; its one `matches` document. */
async function search_(elements, { topK = 10, filter = null, nprobe = null, box = null, crop = null,
                                   model = "lookalike", baseUrl = "", signal = undefined } = {}) {
  const parameters = { top_k: topK };
  if (filter) parameters.filter = filter;
  if (nprobe) parameters.nprobe = nprobe;
  if (box) parameters.box = box;
  if (crop) parameters.crop = crop;
  const names = Object.keys(elements);
  const header = utf8.encode(JSON.stringify({
    inputs: names.map((name) => ({ name, shape: [1], datatype: "BYTES",
                                   parameters: { binary_data_size: elements[name].length } })),
    parameters,
    outputs: [{ name: "matches", parameters: { binary_data: false } }],
  }));

  const started = performance.now();
  let response;
  try {
    response = await fetch(`${baseUrl}/v2/models/${encodeURIComponent(model)}/infer`, {
      method: "POST",
      headers: {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": String(header.length), // the JSON part's length in bytes
      },
      body: new Blob([header, ...names.map((name) => elements[name])]),
      signal,
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new SearchError(0, `no answer from the server (${err.message}); is \`lookalike serve\` running?`);
  }
  const text = await response.text();
  const elapsedMs = performance.now() - started;
  if (!response.ok) throw new SearchError(response.status, errorMessage(response, text));

  const body = JSON.parse(text);
  const out = (body.outputs || []).find((o) => o.name === "matches");
  if (!out || !Array.isArray(out.data) || out.data.length !== 1) {
    throw new SearchError(response.status, "the answer holds no 'matches' output for the query");
  }
  const doc = JSON.parse(out.data[0]); // BYTES in JSON: a string, here itself a JSON document
  const versions = body.parameters || {};
  return {
    labels: doc.labels || {},
    matches: doc.matches || [],
    box: doc.box || null,
    modelVersion: String(versions.model_version || body.model_version || ""),
    indexVersion: String(versions.index_version || ""),
    requestId: String(body.id || response.headers.get("x-request-id") || ""),
    elapsedMs,
  };
}

/* The server's own words: a v2 error body {"error": ...} (FastAPI's {"detail": ...} for a route it
   does not know), else the body's text, else the status line. */
function errorMessage(response, text) {
  try {
    const body = JSON.parse(text);
    if (body && typeof body.error === "string") return body.error;
    if (body && body.detail) return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (_) {
    // not JSON: show the text as it came
  }
  return text.trim() || `${response.status} ${response.statusText}`;
}

/* Where the page can fetch a listing's photo: the answer's image_url (a catalog URL, or a short-lived
   presigned URL of the store), else its image: http(s) as it is, s3:// (an older transformer's answer)
   through the page server's /photo route, anything else (a path on the server's disk) not at all. */
export function matchPhotoUrl(match) {
  if (typeof match.image_url === "string" && /^https?:\/\//i.test(match.image_url)) return match.image_url;
  return photoUrl(match.image);
}

export function photoUrl(uri) {
  if (typeof uri !== "string" || !uri) return null;
  if (uri.startsWith("s3://")) return `/photo?uri=${encodeURIComponent(uri)}`;
  if (/^https?:\/\//i.test(uri)) return uri;
  return null;
}


/* ---- the page ---------------------------------------------------------------------------------- */

const MODEL = "lookalike";
const STATUS_TEXT = { 400: "Bad Request", 404: "Not Found", 411: "Length Required", 413: "Too Large",
                      500: "Internal Error", 503: "Not Ready", 504: "Timed Out" };

const $ = (id) => document.getElementById(id);
let current = null;    // what is searched with: a photo (File), or {listingId, title} for "more like this"
let inFlight = null;   // the AbortController of the request under way
let previewUrl = null;
let userBox = null;    // [x0, y0, x1, y1] the shopper drew, sent as `box`; null: the service finds the product
let drag = null;       // the box being drawn: {x, y} where the pointer went down (fractions of the photo)
let dragged = false;   // a drag just ended: the click that follows must not open the file chooser

function show(el, visible) { el.hidden = !visible; }

/* Small photos (Fashion-MNIST is 28 px) are shown enlarged with hard pixel edges, not blurred. */
function pixelateWhenEnlarged(img) {
  const mark = () => img.classList.toggle("pixelated", img.naturalWidth > 0 && img.naturalWidth < img.clientWidth);
  if (img.complete) mark(); else img.addEventListener("load", mark, { once: true });
}

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text; // never innerHTML: listing titles are data
  return el;
}

function showError(status, message) {
  $("error-title").textContent = status
    ? `The server answered ${status} ${STATUS_TEXT[status] || ""}`.trim()
    : "No answer from the server";
  $("error-message").textContent = message || "(the server sent no message)";
  show($("error"), true);
  $("error").scrollIntoView({ block: "nearest" }); // on a phone the box is below the photo
}

function clearResults() {
  show($("error"), false);
  show($("answer"), false);
  show($("labels-box"), false);
  $("matches").replaceChildren();
  $("labels").replaceChildren();
}

function renderLabels(labels) {
  const list = $("labels");
  for (const [task, { label, probability }] of Object.entries(labels)) {
    const item = element("li", "label");
    item.dataset.task = task;
    item.append(element("span", "task", task.replace(/_/g, " ")), element("span", "value", label));
    const bar = element("span", "bar");
    const fill = element("span", "fill");
    fill.style.width = `${Math.round(probability * 100)}%`;
    bar.append(fill);
    item.append(bar, element("span", "probability", `${(probability * 100).toFixed(0)}%`));
    list.append(item);
  }
  show($("labels-box"), Object.keys(labels).length > 0);
}

function renderMatch(match, rank) {
  const item = element("li", "match");
  item.dataset.listingId = match.listing_id;
  if (match.photo_id) item.dataset.photoId = match.photo_id;
  const thumb = element("div", "thumb");
  const src = matchPhotoUrl(match);
  if (src) {
    const img = element("img");
    img.alt = match.title || match.listing_id;
    img.src = src;
    img.addEventListener("error", () => thumb.replaceChildren(element("span", "no-photo", "no photo")));
    thumb.append(img);
    pixelateWhenEnlarged(img);
  } else {
    thumb.append(element("span", "no-photo", "no photo"));
  }
  const score = element("div", "score");
  score.append(element("span", "rank", `#${rank}`), element("span", "score-value", match.score.toFixed(3)));
  item.append(thumb, score, element("div", "title", match.title || match.listing_id));
  const meta = element("div", "meta");
  meta.append(element("span", "category", match.category || "—"), element("code", "listing-id", match.listing_id));
  const photos = Array.isArray(match.image_urls) ? match.image_urls.length : 0;
  if (photos > 1) meta.append(element("span", "photos", `${photos} photos · matched ${match.photo_id}`));
  item.append(meta);
  const more = element("button", "more-like-this", "More like this");
  more.type = "button";
  more.addEventListener("click", () => chooseListing(match));
  item.append(more);
  return item;
}

/* Where the photo is drawn inside the preview element (object-fit: contain leaves bands around it). */
function photoRect() {
  const img = $("preview");
  const w = img.clientWidth, h = img.clientHeight;
  const scale = Math.min(w / (img.naturalWidth || 1), h / (img.naturalHeight || 1));
  const pw = img.naturalWidth * scale, ph = img.naturalHeight * scale;
  return { left: img.offsetLeft + (w - pw) / 2, top: img.offsetTop + (h - ph) / 2, width: pw, height: ph };
}

function placeBox(el, box) {
  if (!box) { show(el, false); return; }
  const r = photoRect();
  el.style.left = `${r.left + box[0] * r.width}px`;
  el.style.top = `${r.top + box[1] * r.height}px`;
  el.style.width = `${(box[2] - box[0]) * r.width}px`;
  el.style.height = `${(box[3] - box[1]) * r.height}px`;
  show(el, true);
}

/* The box the service searched: the product it found, or the shopper's own; nothing for the whole photo. */
function renderBox(found) {
  const el = $("found-box");
  el.dataset.searched = found ? found.searched : "";
  el.dataset.box = found ? found.box.join(",") : "";
  placeBox(el, found && found.searched !== "whole" ? found.box : null);
  show($("whole-photo"), Boolean(found && found.searched !== "whole"));
}

function pointAt(event) {
  const r = photoRect();
  const rect = $("preview").getBoundingClientRect();
  const x = (event.clientX - rect.left - (r.left - $("preview").offsetLeft)) / r.width;
  const y = (event.clientY - rect.top - (r.top - $("preview").offsetTop)) / r.height;
  return { x: Math.min(1, Math.max(0, x)), y: Math.min(1, Math.max(0, y)) };
}

function boxOf(a, b) {
  return [Math.min(a.x, b.x), Math.min(a.y, b.y), Math.max(a.x, b.x), Math.max(a.y, b.y)];
}

function render(result) {
  renderLabels(result.labels);
  renderBox(result.box);
  $("model-version").textContent = result.modelVersion || "?";
  $("index-version").textContent = result.indexVersion || "?";
  $("elapsed").textContent = `${Math.round(result.elapsedMs)} ms`;
  $("match-count").textContent = `${result.matches.length} listing${result.matches.length === 1 ? "" : "s"}`;
  $("answer").title = result.requestId ? `request id ${result.requestId}` : "";
  show($("answer"), true);
  $("matches").replaceChildren(...result.matches.map((m, i) => renderMatch(m, i + 1)));
  show($("empty"), result.matches.length === 0);
}

async function search() {
  if (!current) return;
  if (inFlight) inFlight.abort();
  const controller = new AbortController();
  inFlight = controller;
  clearResults();
  show($("empty"), false);
  show($("busy"), true);
  document.body.dataset.state = "searching";
  try {
    const options = {
      topK: Number($("top-k").value),
      filter: $("same-category").checked ? "category=predicted" : null,
      box: userBox && !current.listingId ? userBox.map((v) => v.toFixed(4)).join(",") : null,
      crop: $("auto-crop").checked || current.listingId ? null : "off",
      model: MODEL,
      signal: controller.signal,
    };
    const result = current.listingId
      ? await searchListing(current.listingId, options)
      : await searchPhoto(current, options);
    render(result);
    document.body.dataset.state = "done";
  } catch (err) {
    if (err.name === "AbortError") return;
    showError(err.status, err.message);
    document.body.dataset.state = "error";
  } finally {
    if (inFlight === controller) {
      inFlight = null;
      show($("busy"), false);
    }
  }
}

function sizeText(bytes) {
  if (bytes < 1024) return `${bytes} bytes`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

/* "More like this": search by a listing of the results (no photo is sent: the index has its vectors). */
function chooseListing(match) {
  current = { listingId: match.listing_id, title: match.title || match.listing_id };
  userBox = null;
  renderBox(null); // a listing is searched with its stored vector: no box to draw or take
  const preview = $("preview");
  const src = matchPhotoUrl(match);
  preview.classList.remove("pixelated");
  preview.onload = () => pixelateWhenEnlarged(preview);
  preview.onerror = () => { show(preview, false); show($("no-preview"), true); };
  if (src) preview.src = src;
  show(preview, Boolean(src));
  show($("no-preview"), !src);
  show($("drop-hint"), false);
  $("photo-name").textContent = `more like ${current.title} · ${current.listingId}`;
  $("photo-name").dataset.listingId = current.listingId;
  show($("photo-name"), true);
  window.scrollTo({ top: 0 });
  search();
}

function choose(file) {
  if (!file) return;
  current = file;
  userBox = null;
  renderBox(null);
  delete $("photo-name").dataset.listingId;
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  const preview = $("preview");
  preview.classList.remove("pixelated");
  preview.onload = () => pixelateWhenEnlarged(preview);
  preview.onerror = () => { show(preview, false); show($("no-preview"), true); }; // the server will say why
  preview.src = previewUrl;
  show(preview, true);
  show($("no-preview"), false);
  show($("drop-hint"), false);
  $("photo-name").textContent = `${file.name || "pasted photo"} · ${sizeText(file.size)}`;
  show($("photo-name"), true);
  search();
}

async function checkReady() {
  const status = $("status");
  try {
    const response = await fetch(`/v2/models/${MODEL}/ready`, { cache: "no-store" });
    if (response.ok) {
      status.textContent = `${MODEL} · ready`;
      status.dataset.state = "ready";
    } else {
      status.textContent = `${MODEL} · not ready: ${errorMessage(response, await response.text())}`;
      status.dataset.state = "down";
    }
  } catch (err) {
    status.textContent = `the page server does not answer (${err.message})`;
    status.dataset.state = "down";
  }
}

function wire() {
  for (const id of ["photo", "camera"]) {
    $(id).addEventListener("change", (event) => {
      choose(event.target.files[0]);
      event.target.value = ""; // choosing the same file again searches again
    });
  }
  $("top-k").addEventListener("change", search);
  $("same-category").addEventListener("change", search);
  $("auto-crop").addEventListener("change", () => { userBox = null; search(); });
  $("whole-photo").addEventListener("click", () => {
    userBox = null;
    $("auto-crop").checked = false;
    search();
  });

  // Drag across the photo to draw a box: it is sent as `box` and searched.
  const preview = $("preview");
  preview.addEventListener("pointerdown", (event) => {
    if (!current || current.listingId || event.button !== 0) return;
    event.preventDefault();
    preview.setPointerCapture(event.pointerId);
    drag = pointAt(event);
  });
  preview.addEventListener("pointermove", (event) => {
    if (drag) placeBox($("draft-box"), boxOf(drag, pointAt(event)));
  });
  preview.addEventListener("pointerup", (event) => {
    if (!drag) return;
    const box = boxOf(drag, pointAt(event));
    drag = null;
    show($("draft-box"), false);
    if (box[2] - box[0] < 0.03 || box[3] - box[1] < 0.03) return; // a click, not a box
    dragged = true;
    userBox = box;
    search();
  });
  window.addEventListener("resize", () => {
    const el = $("found-box");
    if (!el.hidden && el.dataset.box) placeBox(el, el.dataset.box.split(",").map(Number));
  });

  const drop = $("drop");
  drop.addEventListener("click", (event) => {
    if (dragged) { event.preventDefault(); dragged = false; } // the end of a drag is not a click
  });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    choose(event.dataTransfer.files[0]);
  });
  window.addEventListener("paste", (event) => {
    const file = [...(event.clipboardData?.files || [])][0];
    if (file) choose(file);
  });
  checkReady();
}

if (typeof document !== "undefined" && document.getElementById("photo")) wire();

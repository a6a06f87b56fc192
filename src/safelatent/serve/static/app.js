// The safelatent web page: a client of the /v1 HTTP API that `safelatent serve` exposes.
// Server text is only ever put into the page as text (textContent / text nodes), never parsed as HTML.
"use strict";

const KEY_STORAGE = "safelatent.apiKey";
const ACTION_LABELS = { keep: "Kept", blur: "Blurred", withhold: "Withheld" };
const $ = (id) => document.getElementById(id);

let models = null; // the last successful GET /v1/models body
let modelsTicket = 0; // bumped per load, so that a slow answer for an older key is dropped
let keyTimer = 0; // debounces the reload after the key is edited

// ---------------------------------------------------------------------------------------------------------
// Small helpers

// Creates an element; attributes with false/null values are skipped, true means a bare attribute.
// Children may be nodes, strings (inserted as text, never as HTML), arrays, or null/false (skipped).
function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value == null) continue;
    node.setAttribute(name, value === true ? "" : String(value));
  }
  node.append(...children.flat(Infinity).filter((child) => child != null && child !== false));
  return node;
}

const listText = (items) => (items.length ? items.join(", ") : "none");
const clamp = (value, min, max) => Math.min(max, Math.max(min, value));
const truncate = (text, max) => (text.length > max ? `${text.slice(0, max - 1)}…` : text);

function setStatus(text, busy = false) {
  $("status").textContent = text;
  $("status").classList.toggle("busy", busy);
}

// ---------------------------------------------------------------------------------------------------------
// API

class ApiError extends Error {
  // status: the HTTP status (0 when the server could not be reached); error: the body's {code, message, hint}.
  constructor(status, error, retryAfter = null) {
    super(error?.message || `The server answered HTTP ${status}.`);
    this.status = status;
    this.code = error?.code ?? "";
    this.hint = error?.hint ?? "";
    this.retryAfter = retryAfter;
  }
}

async function api(path, options = {}) {
  const key = $("api-key").value.trim();
  const headers = { Accept: "application/json", ...options.headers };
  if (key) headers.Authorization = `Bearer ${key}`;
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (err) {
    // fetch rejects on network failures and on header values it cannot send (a key with odd characters).
    const hint = `${err.message || err} — is safelatent serve running and reachable?`;
    throw new ApiError(0, { message: "Could not reach the server.", hint });
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, body?.error, response.headers.get("Retry-After"));
  return body;
}

function clearError() {
  $("error").hidden = true;
  $("error").replaceChildren();
}

// The one alert region moves next to what failed (the key form, or the Generate button) so that it shows
// where the user is looking; nearest-scrolling keeps it on screen.
function showError(err, anchor) {
  let title = null;
  let extra = null;
  if (err.status === 401) {
    title = "A valid API key is needed.";
    extra = ["Enter a key above; the operator creates keys with ", h("code", {}, "safelatent keys add NAME"), "."];
  } else if (err.code === "prompt_blocked") {
    title = "Prompt blocked:";
  } else if (err.status === 429) {
    const seconds = Number.parseInt(err.retryAfter ?? "", 10);
    title = Number.isFinite(seconds)
      ? `Too many requests — try again in ${seconds} s.`
      : "Too many requests — try again later.";
  }
  const box = $("error");
  const paragraphs = [
    h("p", { class: "alert-message" }, title && h("strong", {}, title), title && " ", err.message),
    err.hint && h("p", { class: "alert-hint" }, err.hint),
    extra && h("p", { class: "alert-hint" }, extra),
  ];
  box.replaceChildren(...paragraphs.filter(Boolean));
  anchor.before(box);
  box.hidden = false;
  box.scrollIntoView({ block: "nearest" });
}

// ---------------------------------------------------------------------------------------------------------
// Server description: GET /v1/models fills the adapter picker, the SLD select, the limits and the policy.

async function loadModels() {
  clearTimeout(keyTimer);
  const ticket = ++modelsTicket;
  clearError();
  try {
    const body = await api("v1/models");
    if (ticket !== modelsTicket) return;
    const first = models === null;
    models = body;
    renderModels(body, first);
  } catch (err) {
    if (ticket === modelsTicket) showError(err, $("key-help"));
  }
}

function renderModels({ model, adapters, sld_presets: presets, policy, limits, defaults }, applyDefaults) {
  $("model-info").textContent = `Model: ${model.name} (${model.architecture}) · ${model.hash.slice(0, 12)}`;

  const byAction = (action) => Object.keys(policy.categories).filter((c) => policy.categories[c] === action);
  $("policy-name").textContent = policy.name;
  $("policy-blocked").textContent = listText(byAction("block"));
  $("policy-suppressed").textContent = listText(byAction("suppress"));
  $("policy-hard").textContent = listText(policy.hard_blocked);
  $("policy-min-sld").textContent = policy.minimum_sld;

  // Presets are listed weakest first; anything weaker than the policy's minimum is refused by the server.
  const sld = $("sld");
  const floor = Math.max(0, presets.indexOf(policy.minimum_sld));
  // "" = let the server decide (its default, raised by the policy when a prompt is suppressed); naming a
  // preset weaker than a suppressed prompt needs is refused, so the server's choice comes first.
  const chosen = applyDefaults ? "" : sld.value;
  sld.replaceChildren(
    h("option", { value: "" }, `server default (${defaults.sld}; the policy raises it when needed)`),
    ...presets.map((preset, i) => {
      const note = i < floor ? " (below policy minimum)" : i === floor && floor > 0 ? " (policy minimum)" : "";
      return h("option", { value: preset, disabled: i < floor }, preset + note);
    }),
  );
  sld.value = chosen === "" || presets.indexOf(chosen) >= floor ? chosen : presets[floor];

  const bounds = {
    count: [1, limits.max_images, 1, defaults.count],
    steps: [1, limits.max_steps, 1, defaults.steps],
    width: [limits.size_multiple, limits.max_size, limits.size_multiple, defaults.width],
    height: [limits.size_multiple, limits.max_size, limits.size_multiple, defaults.height],
  };
  for (const [id, [min, max, step, value]] of Object.entries(bounds)) {
    Object.assign($(id), { min, max, step });
    if (applyDefaults) $(id).value = value;
  }
  $("prompt").maxLength = limits.max_prompt_chars;
  $("negative-prompt").maxLength = limits.max_prompt_chars;

  renderAdapters(adapters, limits);
}

function renderAdapters(adapters, limits) {
  const previous = new Map(selectedAdapters().map((a) => [a.name, a.weight])); // survive a key change
  const rows = adapters.map((adapter, i) => {
    const id = `adapter-${i}`;
    const facts = [
      adapter.trigger_words.length ? `Trigger words: ${adapter.trigger_words.join(", ")}.` : "No trigger words.",
      adapter.kind === "erasure" && `Erases: ${adapter.erases ?? "unspecified"}.`,
    ];
    const weight = previous.get(adapter.name) ?? clamp(1, limits.min_weight, limits.max_weight);
    return h(
      "div",
      { class: "adapter" },
      h("input", {
        type: "checkbox", id, "data-adapter": adapter.name, checked: previous.has(adapter.name),
        "aria-describedby": `${id}-facts`,
      }),
      h("label", { for: id, class: "adapter-name" },
        adapter.name, " ", h("span", { class: `kind kind-${adapter.kind}` }, adapter.kind)),
      h("label", { for: `${id}-weight`, class: "weight-label" },
        h("span", { class: "visually-hidden" }, `${adapter.name} `), "weight"),
      h("input", {
        type: "number", id: `${id}-weight`, "data-adapter-weight": adapter.name, class: "weight",
        step: "0.05", min: limits.min_weight, max: limits.max_weight, value: weight,
      }),
      h("p", { class: "help adapter-facts", id: `${id}-facts` }, facts.filter(Boolean).join(" ")),
    );
  });
  const none = h("p", { class: "help" }, "The server has no adapters.");
  $("adapter-list").replaceChildren(...(rows.length ? rows : [none]));
  enforceAdapterLimit();
}

// At most limits.max_adapters may be ticked: once full, the unticked boxes are disabled.
function enforceAdapterLimit() {
  const max = models?.limits.max_adapters ?? Infinity;
  const boxes = [...document.querySelectorAll("[data-adapter]")];
  const full = boxes.filter((box) => box.checked).length >= max;
  for (const box of boxes) box.disabled = full && !box.checked;
  $("adapter-limit").textContent = boxes.length ? `Up to ${max} at once.${full ? " Limit reached." : ""}` : "";
}

function selectedAdapters() {
  return [...document.querySelectorAll("[data-adapter]:checked")].map((box) => ({
    name: box.dataset.adapter,
    weight: Number(box.parentElement.querySelector("[data-adapter-weight]").value),
  }));
}

// ---------------------------------------------------------------------------------------------------------
// Generation

function buildRequest() {
  const int = (id) => Number.parseInt($(id).value, 10);
  const seed = $("seed").value.trim();
  return {
    prompt: $("prompt").value,
    negative_prompt: $("negative-prompt").value.trim() || null,
    adapters: selectedAdapters(),
    sld: $("sld").value || null, // "" (before /v1/models answered) = the server's default
    seed: seed === "" ? null : Number(seed),
    count: int("count"),
    steps: int("steps"),
    width: int("width"),
    height: int("height"),
    guidance_scale: models?.defaults.guidance_scale, // undefined is left out of the JSON
    wait: true,
  };
}

// The browser has already checked the form's constraints when "submit" fires.
async function generate(event) {
  event.preventDefault();
  const button = $("generate");
  if (button.disabled) return; // Ctrl+Enter while a request runs
  const request = buildRequest();
  const hadFocus = document.activeElement === button; // disabling the button drops its focus
  clearError();
  button.disabled = true;
  $("generate-form").setAttribute("aria-busy", "true");
  setStatus("Generating…", true);
  const started = performance.now();
  try {
    let job = await api("v1/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(request),
    });
    // wait=true answers with a finished job; should the server answer 202 (queued) anyway, poll it.
    while (job.status === "queued" || job.status === "running") {
      await new Promise((resolve) => setTimeout(resolve, 1000));
      job = await api(`v1/jobs/${encodeURIComponent(job.job_id)}`);
    }
    if (job.status !== "done") {
      throw new ApiError(500, job.error ?? { message: `The job ended as "${job.status}".` });
    }
    renderResult(job.result, request);
    setStatus(`Done in ${((performance.now() - started) / 1000).toFixed(1)} s`);
    $("results-heading").focus();
  } catch (err) {
    setStatus("Failed — see the message above.");
    showError(err, document.querySelector("#generate-form .actions"));
  } finally {
    button.disabled = false;
    $("generate-form").removeAttribute("aria-busy");
    if (hadFocus && document.activeElement !== $("results-heading")) button.focus();
  }
}

function renderResult(result, request) {
  const warnings = result.warnings ?? [];
  $("warnings").replaceChildren(...warnings.map((warning) => h("li", {}, warning)));
  $("warnings").hidden = warnings.length === 0;
  $("results").replaceChildren(...result.images.map((image) => renderCard(image, result, request)));
}

function renderCard(image, result, request) {
  const label = ACTION_LABELS[image.action] ?? image.action;
  const position = `Image ${image.index + 1} of ${result.images.length}`;
  const titleId = `result-${result.request_id}-${image.index}`;
  const reasons = image.reasons?.length > 0 && h("ul", { class: "reasons" }, image.reasons.map((r) => h("li", {}, r)));
  const src = image.png_base64 && `data:image/png;base64,${image.png_base64}`;
  let media;
  if (src) {
    media = h(
      "div",
      { class: "media" },
      h("img", {
        class: "result-image", src, width: request.width, height: request.height,
        alt: `${position} for the prompt "${truncate(request.prompt, 200)}" — ${label.toLowerCase()}`,
      }),
      image.action === "blur" && h("span", { class: "badge badge-blur", "aria-hidden": "true" }, "Blurred"),
    );
  } else {
    media = h("div", { class: "media withheld-panel" },
      h("p", { class: "withheld-title" }, "Withheld"), h("p", {}, "This image was not returned."));
    media.style.aspectRatio = `${request.width} / ${request.height}`;
  }
  return h(
    "article",
    { class: `result-card action-${image.action}`, "data-action": image.action, "aria-labelledby": titleId },
    h("h3", { id: titleId }, `${position} — `, h("span", { class: `action-label action-${image.action}` }, label)),
    media,
    reasons && h("p", { class: "reasons-title" }, `Why it was ${label.toLowerCase()}:`),
    reasons,
    src && h("a", { href: src, download: `safelatent-${result.request_id}-${image.index}.png` },
      "Download PNG", h("span", { class: "visually-hidden" }, ` of image ${image.index + 1}`)),
    renderProvenance(image, result),
  );
}

function renderProvenance(image, result) {
  const code = (text) => h("code", {}, text);
  const watermark = image.watermark ?? {};
  const decisions = result.policy?.decisions ?? [];
  const rows = [
    ["Request id", code(result.request_id)],
    ["Seed", String(result.seed)],
    ["Model", [result.model.name, " ", code(result.model.hash)]],
    ["Adapters", result.adapters.length
      ? h("ul", {}, result.adapters.map((a) => h("li", {}, `${a.name} × ${a.weight} `, code(a.hash))))
      : "none"],
    ["SLD", describeSld(result.sld)],
    ["Watermark", watermark.embedded
      ? code(watermark.content_id ?? "(no content id)")
      : `none — ${watermark.reason ?? "no reason given"}`],
    ["C2PA", image.c2pa],
    ["Audit log row", result.audit_row == null ? "not recorded" : String(result.audit_row)],
    ["Policy", result.policy?.name ?? "—"],
    ["Policy decision", decisions.length
      ? h("ul", {}, decisions.map((d) => h("li", {}, d.message ? `${d.action}: ${d.message}` : d.action)))
      : "—"],
    ["Classifier scores", describeScores(image.scores)],
    ["Generation time", `${Number(result.seconds).toFixed(1)} s`],
  ];
  return h(
    "details",
    { class: "provenance" },
    h("summary", {}, "Provenance"),
    h("dl", { class: "facts" }, rows.map(([term, value]) => [h("dt", {}, term), h("dd", {}, value)])),
  );
}

// result.sld is null when SLD was off, else its settings ("preset" plus the numbers it resolved to).
function describeSld(sld) {
  if (!sld) return "off";
  const { sld_preset: preset, ...settings } = sld;
  const detail = Object.entries(settings).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`);
  return [preset ?? "custom", detail.length ? h("span", { class: "muted" }, ` (${detail.join(", ")})`) : null];
}

function describeScores(scores) {
  const lines = Object.entries(scores ?? {}).map(([classifier, byCategory]) => {
    const values = Object.entries(byCategory).map(([category, score]) => `${category} ${Number(score).toFixed(2)}`);
    return h("li", {}, `${classifier}: ${values.join(", ")}`);
  });
  return lines.length ? h("ul", {}, lines) : "—";
}

// ---------------------------------------------------------------------------------------------------------
// Wiring

function init() {
  const keyInput = $("api-key");
  keyInput.value = sessionStorage.getItem(KEY_STORAGE) ?? "";

  // Every edit is stored (so a reload keeps it); the models reload after a pause in typing (a pasted key
  // loads at once), or right away on Enter / "Use key".
  keyInput.addEventListener("input", () => {
    const key = keyInput.value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
    clearTimeout(keyTimer);
    keyTimer = setTimeout(loadModels, 600);
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    loadModels();
  });
  $("forget-key").addEventListener("click", () => {
    clearTimeout(keyTimer);
    sessionStorage.removeItem(KEY_STORAGE);
    keyInput.value = "";
    setStatus("API key forgotten.");
    keyInput.focus();
  });

  $("adapter-list").addEventListener("change", (event) => {
    if (event.target.matches("[data-adapter]")) enforceAdapterLimit();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      $("generate-form").requestSubmit(); // runs the form's validation, then "submit"
    }
  });
  $("generate-form").addEventListener("submit", generate);

  loadModels();
}

init();

// The Potluck page: load the models from /info, send the text to the chosen model's predict route,
// draw one bar per label. Plain JavaScript, no build step, no third-party code.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], key: "" };

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h.Authorization = "Bearer " + state.key;
  return h;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error || JSON.stringify(body);
  } catch (_) {
    return "the server answered " + response.status;
  }
}

function describeModel() {
  const model = state.models.find((m) => m.name === $("model").value);
  if (!model) return;
  const valid = model.metrics && model.metrics.valid;
  let text = "Labels: " + model.labels.join(", ");
  if (model.base) text += " · base: " + model.base.split("/").pop();
  if (valid && typeof valid.accuracy === "number") {
    text += " · validation accuracy " + (100 * valid.accuracy).toFixed(1) + " %";
  }
  $("model-about").textContent = text;
}

async function loadModels() {
  const response = await fetch("/info", { headers: headers() });
  if (response.status === 401) {
    $("key-field").hidden = false;
    $("model").innerHTML = "<option>enter the API key first</option>";
    showError("This server needs an API key: enter it above, then click Classify.");
    return false;
  }
  if (!response.ok) {
    showError("Could not load the models: " + (await errorText(response)));
    return false;
  }
  const info = await response.json();
  state.models = info.models;
  const select = $("model");
  select.innerHTML = "";
  for (const model of info.models) {
    const option = document.createElement("option");
    option.value = model.name;
    option.textContent = model.name;
    select.appendChild(option);
  }
  select.disabled = false;
  describeModel();
  showError("");
  return true;
}

function drawBars(ranked) {
  const list = $("bars");
  list.innerHTML = "";
  for (const { label, score } of ranked) {
    const percent = 100 * score;
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.className = "name";
    name.id = "label-" + list.children.length;
    name.textContent = label;
    const track = document.createElement("div");
    track.className = "track";
    track.setAttribute("role", "meter");
    track.setAttribute("aria-labelledby", name.id);
    track.setAttribute("aria-valuemin", "0");
    track.setAttribute("aria-valuemax", "100");
    track.setAttribute("aria-valuenow", percent.toFixed(1));
    track.setAttribute("aria-valuetext", percent.toFixed(1) + " percent");
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = "0%";
    track.appendChild(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = percent.toFixed(1) + " %";
    item.append(name, track, value);
    list.appendChild(item);
    requestAnimationFrame(() => { fill.style.width = percent.toFixed(2) + "%"; });
  }
}

async function classify(event) {
  event.preventDefault();
  state.key = $("api-key").value.trim();
  if (!state.models.length && !(await loadModels())) return;
  const text = $("text").value;
  if (!text.trim()) {
    showError("Paste or type a text first.");
    $("text").focus();
    return;
  }
  const route = "/v1/models/" + encodeURIComponent($("model").value) + "/predict";
  const body = JSON.stringify({ inputs: text });
  $("submit").disabled = true;
  showError("");
  const started = performance.now();
  try {
    const response = await fetch(route, { method: "POST", headers: headers(), body });
    if (response.status === 401) $("key-field").hidden = false;
    if (!response.ok) {
      showError(await errorText(response));
      return;
    }
    const ranked = await response.json();
    drawBars(ranked);
    const top = ranked[0];
    $("results-title").textContent = "Probabilities: " + top.label + " (" + (100 * top.score).toFixed(1) + " %)";
    $("timing").textContent = "Answered in " + Math.round(performance.now() - started) + " ms by " +
      $("model").value + ".";
    const auth = state.key ? " -H 'Authorization: Bearer $KEY'" : "";
    $("curl").textContent = "curl -s " + location.origin + route + auth + " -d '" + body.replace(/'/g, "'\\''") + "'";
    $("results").hidden = false;
  } catch (err) {
    showError("Could not reach the server: " + err.message);
  } finally {
    $("submit").disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("classify").addEventListener("submit", classify);
  $("model").addEventListener("change", describeModel);
  $("text").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("classify").requestSubmit();
  });
  loadModels().catch((err) => showError("Could not reach the server: " + err.message));
});

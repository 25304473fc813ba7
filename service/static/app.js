// The SupportLens page: calls the JSON API and highlights words and sentences.
"use strict";

const $ = (id) => document.getElementById(id);
let attribution = "occlusion";
const pretty = (name) => name.replaceAll("_", " ");
const methodName = (name) => pretty(name).replace(/^./, (c) => c.toUpperCase());

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showStatus(message) { $("status").textContent = message || ""; }

async function call(path, body) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(`${response.status}: ${data.detail || response.statusText}`);
  return data;
}

// Colour for a word score: attention is blue; attributions green (for) and red (against).
function colour(score, scale, signed) {
  const alpha = scale > 0 ? Math.min(1, Math.abs(score) / scale) * 0.75 : 0;
  if (!signed) return `rgba(37, 99, 235, ${alpha.toFixed(3)})`;
  return score >= 0 ? `rgba(22, 163, 74, ${alpha.toFixed(3)})` : `rgba(220, 38, 38, ${alpha.toFixed(3)})`;
}

// Rebuild `text` with each explained word wrapped in a coloured span (offsets index the text).
function highlight(element, text, words, signed) {
  element.replaceChildren();
  const scale = Math.max(0, ...words.map((w) => Math.abs(w.score)));
  let at = 0;
  for (const word of words) {
    if (word.start > at) element.append(text.slice(at, word.start));
    const span = document.createElement("span");
    span.className = "word";
    span.textContent = text.slice(word.start, word.end);
    span.style.background = colour(word.score, scale, signed);
    span.title = word.score.toFixed(4);
    element.append(span);
    at = word.end;
  }
  if (at < text.length) element.append(text.slice(at));
}

// One method's faithfulness on this message, in plain words, next to its highlights.
function showFaithfulness(element, explanation) {
  element.replaceChildren();
  const measured = explanation && explanation.faithfulness;
  element.classList.remove("weak");
  if (!measured) { element.textContent = ""; return; }
  const points = (value) => `${(100 * value).toFixed(1)} points`;
  const intent = pretty(explanation.intent || "the intent");
  const comp = document.createElement("b");
  comp.className = "comp";
  comp.textContent = `comprehensiveness ${measured.comprehensiveness.toFixed(3)}`;
  const suff = document.createElement("b");
  suff.textContent = `sufficiency ${measured.sufficiency.toFixed(3)}`;
  element.append(
    "Faithfulness on this message: ", comp, ` (deleting its top words lowers ${intent} by ${points(measured.comprehensiveness)} on average), `,
    suff, ` (keeping only them lowers it by ${points(measured.sufficiency)}).`,
  );
  // Deleting the top words barely matters: the highlights do not show why.
  if (measured.comprehensiveness < 0.05) element.classList.add("weak");
}

// The target choices: the predicted intent, the contrast of the top two, and each top-k intent.
function fillTargets(topK) {
  const select = $("target");
  const chosen = select.value;
  for (const option of [...select.options]) if (option.dataset.intent) option.remove();
  for (const entry of topK) {
    const option = document.createElement("option");
    option.value = entry.label;
    option.dataset.intent = "1";
    option.textContent = pretty(entry.label);
    select.append(option);
  }
  select.value = [...select.options].some((o) => o.value === chosen) ? chosen : "";
}

async function classify(event) {
  event.preventDefault();
  const text = $("message").value;
  const button = $("classify-button");
  button.disabled = true;
  showStatus("");
  try {
    const method = $("method").value;
    const body = {
      texts: [text], top_k: Number($("top-k").value),
      explain: [...new Set(["attention", method])], faithfulness: $("faithfulness").checked,
    };
    if ($("target").value) body.target = $("target").value;
    const data = await call("/v1/classify", body);
    const result = data.results[0];
    $("intent-label").textContent = result.label.replaceAll("_", " ");
    $("intent-score").textContent = `${(100 * result.score).toFixed(1)}%` + (result.truncated ? " (text truncated)" : "");
    const list = $("top-k-list");
    list.replaceChildren();
    for (const entry of result.top_k) {
      const item = document.createElement("li");
      const label = document.createElement("span");
      label.textContent = entry.label.replaceAll("_", " ");
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.style.width = `${Math.max(1, 100 * entry.score)}%`;
      const value = document.createElement("span");
      value.textContent = `${(100 * entry.score).toFixed(1)}%`;
      item.append(label, bar, value);
      list.append(item);
    }
    const chosen = result.explanations[method];
    highlight($("attention-text"), text, result.explanations.attention.words, false);
    highlight($("attribution-text"), text, chosen.words, method !== "attention" && method !== "rollout");
    $("attribution-name").textContent = methodName(method);
    showFaithfulness($("attention-faithfulness"), result.explanations.attention);
    showFaithfulness($("attribution-faithfulness"), chosen);
    $("explained-target").textContent = chosen.versus_intent
      ? `Explaining why ${pretty(chosen.intent)} rather than ${pretty(chosen.versus_intent)}`
      : `Explaining ${pretty(chosen.intent)}`;
    fillTargets(result.top_k);
    $("faithfulness-help").hidden = !body.faithfulness;
    $("classify-result").hidden = false;
  } catch (error) {
    showStatus(error.message);
  } finally {
    button.disabled = false;
  }
}

async function summarize(event) {
  event.preventDefault();
  const text = $("conversation").value;
  const button = $("summarize-button");
  button.disabled = true;
  showStatus("");
  try {
    const data = await call("/v1/summarize", { texts: [text], max_sentences: Number($("max-sentences").value) });
    const result = data.results[0];
    $("summary-text").textContent = result.summary;
    const element = $("conversation-text");
    element.replaceChildren();
    let at = 0;
    for (const sentence of result.sentences) {
      if (sentence.start > at) element.append(text.slice(at, sentence.start));
      const span = document.createElement("span");
      span.className = "sentence" + (sentence.selected ? " selected" : "");
      span.textContent = text.slice(sentence.start, sentence.end);
      span.title = `score ${sentence.score.toFixed(3)}`;
      element.append(span);
      at = sentence.end;
    }
    if (at < text.length) element.append(text.slice(at));
    $("summarize-result").hidden = false;
  } catch (error) {
    showStatus(error.message);
  } finally {
    button.disabled = false;
  }
}

async function loadModels() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (response.status === 401) { showStatus("This server needs an API key: enter it above."); return; }
    const info = await response.json();
    attribution = info.default_attribution || attribution;
    $("method").value = attribution;
    $("attribution-name").textContent = methodName(attribution);
    $("classify-panel").hidden = !info.models.classify;
    $("summarize-panel").hidden = !info.models.summarize;
  } catch (error) {
    showStatus("Cannot reach the server: " + error.message);
  }
}

$("classify-form").addEventListener("submit", classify);
$("summarize-form").addEventListener("submit", summarize);
$("api-key").addEventListener("change", loadModels);
loadModels();

"use strict";
// Shared pieces of the explorer's pages: element building, number formats, the JSON API client, the
// message banner and the text/confirm dialog.
(function (cm) {
  const NAME_PATTERN = /^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$/;

  const $ = (id) => document.getElementById(id);


  // An element with properties (dataset given as `data`) and children (strings become text).
  function el(tag, props = {}, children = []) {
    const element = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "data") Object.assign(element.dataset, value);
      else if (key === "class") element.className = value;
      else element[key] = value;
    }
    element.append(...children);
    return element;
  }

  // A number for display with `digits` decimals; an em dash for null, undefined or NaN.
  function formatNumber(value, digits = 3) {
    return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "\u2014";
  }

  // "exported / full" counts for the list and the header.
  function formatCounts(counts) {
    if (!counts) return "\u2014";
    const exported = Number(counts.exported).toLocaleString("en-US");
    if (counts.full === undefined || counts.full === counts.exported) return exported;
    return `${exported} / ${Number(counts.full).toLocaleString("en-US")}`;
  }

  // Replacement and completeness as one short string.
  function formatScores(scores) {
    if (!scores) return "\u2014";
    return `R ${formatNumber(scores.replacement, 2)} \u00b7 C ${formatNumber(scores.completeness, 2)}`;
  }

  // URL path of a graph view.
  function graphPath(name) {
    return `/graph/${encodeURIComponent(name)}`;
  }

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  // Call the JSON API; returns {data, response}; failures throw ApiError with the server's one-line detail.
  async function api(method, path, body) {
    const options = { method, headers: { Accept: "application/json" } };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, options);
    } catch (error) {
      throw new ApiError(0, `cannot reach the server (${error.message})`);
    }
    if (response.status === 204) return { data: null, response };
    const data = await response.json().catch(() => null);
    if (!response.ok) throw new ApiError(response.status, errorDetail(data, response));
    return { data, response };
  }

  // The one-line message of an error response (FastAPI's validation lists flattened too).
  function errorDetail(data, response) {
    const detail = data && data.detail;
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) return detail.map((item) => item.msg || JSON.stringify(item)).join("; ");
    return `${response.status} ${response.statusText || "error"}`;
  }

  // Show a message in the banner (kind "error" or "info").
  function showMessage(text, kind = "error") {
    const box = $("message");
    box.className = `message ${kind}`;
    $("message-text").textContent = text;
    box.hidden = false;
  }

  function hideMessage() {
    $("message").hidden = true;
  }

  let dialogDone = null;

  // Ask for a line of text (value given) or a confirmation (value null) in the page's dialog; resolves
  // to the text, true, or null when cancelled. `check(text)` returns an error message or "".
  function ask(text, value = null, check = () => "") {
    const dialog = $("dialog");
    $("dialog-text").textContent = text;
    const input = $("dialog-input");
    input.hidden = value === null;
    input.value = value === null ? "" : value;
    $("dialog-error").hidden = true;
    dialog.showModal();
    if (value !== null) input.select();
    return new Promise((resolve) => {
      dialogDone = (ok) => {
        if (ok && value !== null) {
          const problem = check(input.value.trim());
          if (problem) {
            $("dialog-error").textContent = problem;
            $("dialog-error").hidden = false;
            return;
          }
        }
        dialogDone = null;
        dialog.close();
        resolve(ok ? (value === null ? true : input.value.trim()) : null);
      };
    });
  }

  // Wire the dialog's buttons once: OK validates and resolves, Cancel and Escape resolve null.
  function setUpDialog() {
    $("dialog-form").addEventListener("submit", (event) => {
      event.preventDefault();
      if (dialogDone) dialogDone(true);
    });
    $("dialog-cancel").addEventListener("click", () => dialogDone && dialogDone(false));
    $("dialog").addEventListener("cancel", (event) => {
      event.preventDefault();
      if (dialogDone) dialogDone(false);
    });
  }

  // Problem with a graph name, or "" when it is valid.
  function nameProblem(name) {
    if (NAME_PATTERN.test(name)) return "";
    return "Use 1 to 100 letters, digits, '.', '_' or '-', not starting with '.'.";
  }

  // Show one of the main views.
  function showView(id) {
    for (const view of ["loading", "list-view", "graph-view"]) $(view).hidden = view !== id;
  }

  // Show the link back to the graph list (served mode only; the page itself names no URL but its assets).
  function showHomeLink() {
    $("home-link").href = "/";
    $("home-link").hidden = false;
  }

  cm.ui = {
    $,
    el,
    formatNumber,
    formatCounts,
    formatScores,
    graphPath,
    api,
    showMessage,
    hideMessage,
    ask,
    setUpDialog,
    nameProblem,
    showView,
    showHomeLink,
  };
})((window.Circuitmap = window.Circuitmap || {}));

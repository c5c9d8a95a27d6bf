"use strict";
// Feature dashboards from the server's feature database: a feature's label (editable), activation
// statistics, its log-scale activation histogram with this prompt's activation marked, logit lens and input
// tokens, and its top and sampled contexts shaded by activation; plus the feature search box. Dashboards are
// fetched in the background and cached, so selecting nodes never waits for them.
(function (cm) {
  const { el, formatNumber, api } = cm.ui;
  const SVG = "http://www.w3.org/2000/svg";
  const CACHE_SIZE = 64;
  const SEARCH_DELAY_MS = 200;
  const SEARCH_LIMIT = 20;
  const HIST = { width: 320, height: 96, top: 16, bottom: 18, minBins: 12, pad: 1 };
  const AUTHOR_KEY = "circuitmap.author";

  class FeatureDashboard {
    // `options`: available (the server has a database), canEdit, note (shown when unavailable; "" shows
    // nothing), onLabelSaved(layer, feature, label).
    constructor(container, options) {
      this.container = container;
      this.options = options;
      this.cache = new Map();
      this.shownKey = null;
      this.round = 0;
    }

    // Whether the server has a feature database to show.
    get available() {
      return this.options.available;
    }

    // Show the dashboard of `target` ({layer, feature, activation, inGraph, lens}), or nothing for null;
    // showing what is already shown does nothing (an edit in progress is kept).
    show(target) {
      const key = target ? `${target.layer}/${target.feature}/${target.activation}/${target.inGraph}` : "";
      if (key === this.shownKey) return;
      this.shownKey = key;
      const round = ++this.round;
      this.target = target;
      this.data = null;
      if (!target) return this.setContent("", []);
      if (!this.available) {
        return this.setContent(
          "unavailable",
          this.options.note ? [el("p", { class: "empty" }, [this.options.note])] : [],
        );
      }
      this.setContent("loading", [heading(target), el("p", { class: "empty" }, ["Loading the feature\u2026"])]);
      this.load(target.layer, target.feature).then(
        (data) => round === this.round && this.render(data, target),
        (error) => round === this.round && this.renderError(error, target),
      );
    }

    // Replace the container's content and record its state (for tests: data-state, data-layer/feature).
    setContent(state, children) {
      const box = this.container;
      box.dataset.state = state;
      box.dataset.layer = this.target ? String(this.target.layer) : "";
      box.dataset.feature = this.target ? String(this.target.feature) : "";
      box.replaceChildren(...children);
    }

    // The dashboard of a feature: from the cache, else fetched (a failed fetch is not cached).
    load(layer, feature) {
      const key = `${layer}/${feature}`;
      if (!this.cache.has(key)) {
        const request = api("GET", `/api/features/${layer}/${feature}`).then(({ data }) => data);
        request.catch(() => this.cache.delete(key));
        this.cache.set(key, request);
        if (this.cache.size > CACHE_SIZE) this.cache.delete(this.cache.keys().next().value);
      }
      return this.cache.get(key);
    }

    // Draw the whole dashboard of `data` for `target`.
    render(data, target) {
      this.data = data;
      this.labelBox = el("div", { class: "fd-label", data: { testid: "feature-label" } });
      this.renderLabel();
      this.setContent("ready", [
        heading(target),
        this.labelBox,
        statistics(data, target),
        histogramSection(data, target.activation),
        lensSection(data),
        contextsSection(data),
        quantilesSection(data),
      ]);
    }

    // A failed fetch: its message, and the node's own logit lens when the document has one.
    renderError(error, target) {
      const message = el("p", { class: "fd-error" }, [`Could not load this feature: ${error.message}`]);
      const lens = target.lens ? [lensColumns(outputColumns(target.lens.top, target.lens.bottom))] : [];
      this.setContent("error", [heading(target), message, ...lens]);
    }

    // The current label with where it came from, and the manual-label editor.
    renderLabel() {
      const label = this.data.label;
      const text = el("div", { class: "fd-label-text", data: { testid: "feature-label-text" } }, [
        label ? label.text : "no label",
      ]);
      if (!label) text.classList.add("empty");
      const children = [
        text,
        el("div", { class: "hint", data: { testid: "feature-label-source" } }, [labelSource(label)]),
      ];
      if (this.options.canEdit) children.push(this.labelEditor(label));
      this.labelBox.replaceChildren(...children);
    }

    // The form that saves a manual label (empty text clears the manual label).
    labelEditor(label) {
      const input = el("input", {
        value: label ? label.text : "",
        placeholder: "manual label (empty clears it)",
        maxLength: 500,
        data: { testid: "feature-label-input" },
      });
      const author = el("input", {
        value: readAuthor(),
        placeholder: "your name",
        maxLength: 100,
        class: "fd-author",
        data: { testid: "feature-label-author" },
      });
      const status = el("span", { class: "hint", data: { testid: "feature-label-status" } });
      const button = el("button", { type: "submit", data: { testid: "feature-label-save" } }, ["Save label"]);
      const form = el("form", { class: "fd-label-form" }, [input, author, button, status]);
      form.addEventListener("submit", (event) => {
        event.preventDefault();
        this.saveLabel(input.value, author.value.trim(), button, status);
      });
      return form;
    }

    // Send a manual label; on success the shown label and the graph's labels of this feature follow.
    async saveLabel(text, author, button, status) {
      const edited = this.data;
      const { layer, feature } = edited;
      button.disabled = true;
      status.textContent = "saving\u2026";
      status.className = "hint";
      writeAuthor(author);
      try {
        const body = { text, author: author || null };
        const { data } = await api("PUT", `/api/features/${layer}/${feature}/label`, body);
        Object.assign(edited, { label: data.label, labels: data.labels });
        if (this.data === edited) {
          this.renderLabel();
          this.labelBox.querySelector('[data-testid="feature-label-status"]').textContent = "saved";
        }
        this.options.onLabelSaved(layer, feature, data.label);
      } catch (error) {
        status.textContent = `not saved: ${error.message}`;
        status.className = "hint fd-error";
      } finally {
        button.disabled = false;
      }
    }
  }

  // "Feature L<layer> #<index>", noting a feature that is not in the graph.
  function heading(target) {
    const where = target.inGraph ? "" : " \u00b7 not in this graph";
    return el("h3", { class: "fd-heading", data: { testid: "feature-heading" } }, [
      `Feature L${target.layer} #${target.feature}`,
      el("span", { class: "count" }, [where]),
    ]);
  }

  // Where a label came from: its source, an automatic label's confidence, a manual one's author and time.
  function labelSource(label) {
    if (!label) return "no label in the database yet";
    const parts = [label.source];
    if (typeof label.confidence === "number") parts.push(`confidence ${formatNumber(label.confidence, 2)}`);
    if (label.author) parts.push(`by ${label.author}`);
    if (label.created && label.source !== "auto") parts.push(formatTime(label.created));
    return parts.join(" \u00b7 ");
  }

  // An ISO time as "YYYY-MM-DD HH:MM UTC".
  function formatTime(text) {
    const match = /^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2})/.exec(text);
    return match ? `${match[1]} ${match[2]} UTC` : text;
  }

  // The author name remembered between edits (storage may be unavailable: then nothing is remembered).
  function readAuthor() {
    try {
      return window.localStorage.getItem(AUTHOR_KEY) || "";
    } catch {
      return "";
    }
  }

  // Remember the author name for the next edit.
  function writeAuthor(author) {
    try {
      window.localStorage.setItem(AUTHOR_KEY, author);
    } catch {
      // storage unavailable: the name is simply not remembered
    }
  }

  // Density, maximum and mean activation, and this prompt's activation.
  function statistics(data, target) {
    const facts = [
      ["Density", `${formatPercent(data.density)} of tokens (${data.active_tokens.toLocaleString("en-US")})`],
      ["Max activation", formatNumber(data.max_activation)],
      ["Mean activation", formatNumber(data.mean_activation)],
    ];
    if (Number.isFinite(target.activation)) facts.push(["This prompt", formatNumber(target.activation)]);
    const items = facts.flatMap(([key, value]) => [el("dt", {}, [key]), el("dd", {}, [value])]);
    return el("dl", { class: "facts fd-stats", data: { testid: "feature-stats" } }, items);
  }

  // A share as a percentage with enough digits for rare features.
  function formatPercent(share) {
    if (!Number.isFinite(share)) return "\u2014";
    const percent = share * 100;
    return `${percent >= 1 || percent === 0 ? percent.toFixed(2) : percent.toPrecision(2)}%`;
  }

  // The activation histogram section.
  function histogramSection(data, activation) {
    const svg = histogram(data.histogram, data.histogram_edges, activation);
    const caption = el("p", { class: "hint" }, [
      "activation, log scale",
      Number.isFinite(activation) && activation > 0 ? " \u00b7 red line: this prompt" : "",
    ]);
    return el("section", { class: "panel-section" }, [el("h3", {}, ["Activations"]), svg, caption]);
  }

  // An SVG element with attributes.
  function svgEl(tag, attributes = {}, children = []) {
    const element = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
    element.append(...children);
    return element;
  }

  // The bins to draw: those with counts (and the marked activation's bin), padded, at least minBins wide.
  function binRange(counts, edges, activation) {
    const used = counts.flatMap((count, i) => (count > 0 ? [i] : []));
    const marked = binOf(edges, activation);
    if (marked !== null) used.push(marked);
    if (!used.length) return null;
    let low = Math.max(0, Math.min(...used) - HIST.pad);
    let high = Math.min(counts.length - 1, Math.max(...used) + HIST.pad);
    while (high - low + 1 < Math.min(HIST.minBins, counts.length)) {
      if (low > 0) low--;
      if (high - low + 1 < HIST.minBins && high < counts.length - 1) high++;
    }
    return { low, high };
  }

  // The bin holding a positive activation (the end bins hold what lies beyond them), or null.
  function binOf(edges, value) {
    if (!(Number.isFinite(value) && value > 0)) return null;
    let bin = 0;
    while (bin < edges.length - 2 && value >= edges[bin + 1]) bin++;
    return bin;
  }

  // The histogram on a log activation axis: bars by bin, decade ticks, and this prompt's activation.
  function histogram(counts, edges, activation) {
    const { width, height, top, bottom } = HIST;
    const svg = svgEl("svg", {
      viewBox: `0 0 ${width} ${height}`,
      class: "fd-histogram",
      "data-testid": "feature-histogram",
    });
    const range = binRange(counts, edges, activation);
    if (!range) {
      svg.append(svgEl("text", { x: 4, y: height / 2, class: "fd-axis" }, ["never active in the corpus"]));
      return svg;
    }
    const logLow = Math.log10(edges[range.low]);
    const logHigh = Math.log10(edges[range.high + 1]);
    const x = (value) => ((Math.log10(value) - logLow) / (logHigh - logLow)) * width;
    const base = height - bottom;
    const most = Math.max(1, ...counts.slice(range.low, range.high + 1));
    for (let i = range.low; i <= range.high; i++) {
      if (!counts[i]) continue;
      const barHeight = Math.max(1, (counts[i] / most) * (base - top));
      const left = x(edges[i]);
      const bar = svgEl("rect", {
        x: left,
        y: base - barHeight,
        width: Math.max(0.5, x(edges[i + 1]) - left - 0.5),
        height: barHeight,
        class: "fd-bar",
      });
      bar.append(
        svgEl("title", {}, [
          `${formatValue(edges[i])}\u2013${formatValue(edges[i + 1])}: ${counts[i].toLocaleString("en-US")} tokens`,
        ]),
      );
      svg.append(bar);
    }
    svg.append(svgEl("line", { x1: 0, x2: width, y1: base, y2: base, class: "fd-axis-line" }));
    for (const tick of ticks(edges[range.low], edges[range.high + 1])) {
      const at = x(tick);
      svg.append(svgEl("line", { x1: at, x2: at, y1: base, y2: base + 3, class: "fd-axis-line" }));
      const anchor = at < 12 ? "start" : at > width - 12 ? "end" : "middle";
      svg.append(svgEl("text", { x: at, y: height - 3, "text-anchor": anchor, class: "fd-axis" }, [formatValue(tick)]));
    }
    if (binOf(edges, activation) !== null) svg.append(marker(Math.min(width, Math.max(0, x(activation))), activation));
    return svg;
  }

  // The vertical line at this prompt's activation, with its value.
  function marker(at, activation) {
    const group = svgEl("g", { class: "fd-marker", "data-testid": "histogram-marker", "data-value": activation });
    group.append(svgEl("line", { x1: at, x2: at, y1: HIST.top - 4, y2: HIST.height - HIST.bottom }));
    const anchor = at > HIST.width * 0.7 ? "end" : "start";
    const offset = anchor === "end" ? -3 : 3;
    group.append(
      svgEl("text", { x: at + offset, y: HIST.top - 6, "text-anchor": anchor }, [
        `this prompt ${formatValue(activation)}`,
      ]),
    );
    group.append(svgEl("title", {}, [`this prompt's activation: ${activation}`]));
    return group;
  }

  // Axis ticks between two activations: powers of ten, with 2 and 5 times them on short ranges.
  function ticks(low, high) {
    const decades = Math.log10(high / low);
    const steps = decades < 1.5 ? [1, 2, 5] : [1];
    const every = Math.max(1, Math.ceil(decades / 6));
    const found = [];
    for (let power = Math.floor(Math.log10(low)); power <= Math.ceil(Math.log10(high)); power++) {
      if (power % every !== 0) continue;
      for (const step of steps) {
        const value = step * 10 ** power;
        if (value >= low && value <= high) found.push(value);
      }
    }
    return found;
  }

  // A number in a few characters: 0.0012, 0.25, 3.2, 120.
  function formatValue(value) {
    if (!Number.isFinite(value)) return "\u2014";
    return Math.abs(value) >= 1000 ? value.toExponential(1) : String(Number(value.toPrecision(2)));
  }

  // The output lens from the database and the input tokens.
  function lensSection(data) {
    return el("section", { class: "panel-section", data: { testid: "feature-lens" } }, [
      el("h3", {}, ["Logit lens and input tokens"]),
      lensColumns([...outputColumns(data.output_top, data.output_bottom), ["input tokens", data.input_top, "input"]]),
    ]);
  }

  // The promoted and suppressed output tokens as lens columns.
  function outputColumns(top, bottom) {
    return [
      ["promotes", top, "positive"],
      ["suppresses", bottom, "negative"],
    ];
  }

  // Columns of (token, value) lists.
  function lensColumns(columns) {
    const entry = ([token, value]) =>
      el("li", {}, [
        el("code", {}, [cm.visibleToken(token)]),
        el("span", { class: "value" }, [formatNumber(Number(value), 2)]),
      ]);
    const column = ([title, entries, kind]) =>
      el("div", { class: `lens-column ${kind}` }, [el("h4", {}, [title]), el("ol", {}, (entries || []).map(entry))]);
    return el("div", { class: "lens fd-lens" }, columns.map(column));
  }

  // The top activating contexts.
  function contextsSection(data) {
    const examples = data.top_examples || [];
    const body = examples.length
      ? examples.map((example) => context(example, data.max_activation))
      : [el("p", { class: "empty" }, ["no active contexts in the corpus"])];
    return el("section", { class: "panel-section", data: { testid: "feature-top-contexts" } }, [
      el("h3", {}, ["Top contexts ", el("span", { class: "count" }, [`(${examples.length})`])]),
      ...body,
    ]);
  }

  // The sampled contexts by quantile of their maximum, each group folded under its range.
  function quantilesSection(data) {
    const groups = data.quantile_groups || [];
    if (!groups.length) return el("section", { hidden: true });
    const folded = groups.map((group, k) => {
      const maxima = group.examples.map((example) => example.max_activation);
      const values = `${formatValue(Math.min(...maxima))}\u2013${formatValue(Math.max(...maxima))}`;
      const summary = el("summary", {}, [
        `${percentText(group.low_quantile)}\u2013${percentText(group.high_quantile)}`,
        el("span", { class: "hint" }, [` \u00b7 ${group.examples.length} contexts, max ${values}`]),
      ]);
      const rows = group.examples.map((example) => context(example, data.max_activation));
      return el(
        "details",
        { class: "fd-quantile", open: k === groups.length - 1, data: { testid: "feature-quantile" } },
        [summary, ...rows],
      );
    });
    return el("section", { class: "panel-section", data: { testid: "feature-quantiles" } }, [
      el("h3", {}, ["Sampled contexts by quantile"]),
      ...folded,
    ]);
  }

  // A quantile as a whole percentage.
  function percentText(quantile) {
    return `${Math.round(quantile * 100)}%`;
  }

  // One context: its tokens shaded by activation (relative to the feature's maximum), the peak emphasised,
  // each token's value on hover.
  function context(example, scale) {
    const tokens = example.tokens.map((token, k) => {
      const value = example.activations[k];
      const props = {
        class: k === example.peak ? "tok peak" : "tok",
        title: `${JSON.stringify(token)}: ${formatNumber(value)}`,
      };
      const span = el("span", Object.assign(props, { data: { value: String(value) } }), [shownToken(token)]);
      if (value > 0) span.style.backgroundColor = `rgba(234, 88, 12, ${Math.min(1, value / (scale || 1)).toFixed(3)})`;
      return span;
    });
    return el("div", { class: "fd-context", data: { testid: "feature-context" } }, [
      el("span", { class: "fd-context-max" }, [formatValue(example.max_activation)]),
      el("span", { class: "fd-context-text" }, tokens),
    ]);
  }

  // A token as running text shows it: newlines as a return sign, an empty token as a thin box.
  function shownToken(token) {
    if (token === "") return "\u2395";
    return token.replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192");
  }

  class FeatureSearch {
    // `options`: onOpen(layer, feature), inGraph(layer, feature).
    constructor(input, list, options) {
      this.input = input;
      this.list = list;
      this.options = options;
      this.round = 0;
      this.hits = [];
      input.addEventListener("input", () => this.schedule());
      input.addEventListener("keydown", (event) => this.onKey(event));
    }

    // Search soon after typing stops.
    schedule() {
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this.search(), SEARCH_DELAY_MS);
    }

    // Enter opens the first hit (searching first if the list is not up to date); Escape clears the box.
    async onKey(event) {
      if (event.key === "Escape") {
        this.input.value = "";
        this.search();
        return;
      }
      if (event.key !== "Enter") return;
      event.preventDefault();
      if (this.searchedFor !== this.input.value.trim()) {
        clearTimeout(this.timer);
        await this.search();
      }
      if (this.hits.length) this.open(this.hits[0]);
    }

    // Ask the server for the features matching the box and list them.
    async search() {
      const text = this.input.value.trim();
      const round = ++this.round;
      if (!text) {
        this.searchedFor = "";
        return this.showHits([], "");
      }
      try {
        const query = `q=${encodeURIComponent(text)}&limit=${SEARCH_LIMIT}`;
        const { data } = await api("GET", `/api/features/search?${query}`);
        if (round !== this.round) return;
        this.searchedFor = text;
        this.showHits(data.hits, data.hits.length ? "" : "no feature matches");
      } catch (error) {
        if (round === this.round) this.showHits([], `search failed: ${error.message}`);
      }
    }

    // The list of hits (or a note).
    showHits(hits, note) {
      this.hits = hits;
      const rows = hits.map((hit) => el("li", {}, [this.hitButton(hit)]));
      if (note) rows.push(el("li", { class: "empty" }, [note]));
      this.list.replaceChildren(...rows);
    }

    // One hit: its place, label and characteristic tokens; a mark when the graph holds it.
    hitButton(hit) {
      const present = this.options.inGraph(hit.layer, hit.feature);
      const props = { type: "button", class: "fd-hit", title: hit.tokens ? `tokens: ${hit.tokens}` : "" };
      const data = { testid: "feature-hit", layer: String(hit.layer), feature: String(hit.feature) };
      const button = el("button", Object.assign(props, { data }), [
        el("span", { class: "edge-where" }, [`L${hit.layer} #${hit.feature}`]),
        el("span", { class: "edge-label" }, [hit.label || "(no label)"]),
        el("span", { class: "fd-in-graph" }, [present ? "in graph" : ""]),
      ]);
      button.addEventListener("click", () => this.open(hit));
      return button;
    }

    // Show a hit's feature.
    open(hit) {
      for (const button of this.list.querySelectorAll(".fd-hit")) {
        button.classList.toggle(
          "selected",
          button.dataset.layer === String(hit.layer) && button.dataset.feature === String(hit.feature),
        );
      }
      this.options.onOpen(hit.layer, hit.feature);
    }
  }

  Object.assign(cm, { FeatureDashboard, FeatureSearch });
})((window.Circuitmap = window.Circuitmap || {}));

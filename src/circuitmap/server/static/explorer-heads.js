"use strict";
// Attention in the node panel: the heads that carry a cross-position edge (stored with the graph, else
// computed by the server), and for a chosen head its attention pattern on the prompt as a heat map and the
// strongest query/key node pairs of its QK attribution. Answers are kept per edge and per head site, so going
// back shows them again.
(function (cm) {
  const { KIND } = cm;
  const { el, api, formatNumber } = cm.ui;
  const SVG = "http://www.w3.org/2000/svg";
  const SHOWN_HEADS = 12;
  const KEPT_SITES = 64;
  const PATTERN_PX = 300;
  const MAX_CELL_PX = 18;
  const ROW_ENTRIES = 4;
  const HEAD_NODE = /^attn_([0-9]+)_([0-9]+)_([0-9]+)$/;
  const BIAS_NODE = /^bias_([0-9]+)$/;
  const NEEDS_MODEL =
    "The attention pattern and QK attribution need the model: serve the graph folder with circuitmap serve " +
    "--model and --transcoders.";

  class HeadsPanel {
    // `options`: served, graphName, stored (the loadings embedded in an exported page, or null), tokens (the
    // prompt's tokens by position), nLayers, and nameOf(id) (the explorer's name of a node of the document,
    // or null for ids it lacks).
    constructor(container, options) {
      this.container = container;
      this.options = options;
      this.computable = false;
      this.stored = new Set();
      this.edges = new Map();
      this.sites = new Map();
      this.edge = null;
      this.site = null;
    }

    // Read the stored loadings (the page's own, or the server's) and whether the server can split others.
    async start() {
      let data = this.options.stored;
      if (this.options.served) {
        const path = `/api/graphs/${encodeURIComponent(this.options.graphName)}/heads`;
        data = (await api("GET", path)).data;
      }
      if (!data) return;
      this.computable = Boolean(data.computable);
      for (const entry of data.edges) {
        const key = edgeKey(entry.source, entry.target);
        this.stored.add(key);
        this.edges.set(key, { state: "done", data: Object.assign({ stored: true }, entry) });
      }
    }

    // Whether the heads of the edge from `source` to `target` (ids) can be shown: stored, or computable.
    canShow(source, target) {
      return this.computable || this.stored.has(edgeKey(source, target));
    }

    // Whether that edge is the one shown.
    isShown(source, target) {
      return this.edge !== null && this.edge.key === edgeKey(source, target);
    }

    // Show the heads of `edge` ({source, target, sourcePos, targetPos, weight}), fetching them if not known
    // (or asking again after an error).
    showEdge(edge) {
      this.edge = Object.assign({ key: edgeKey(edge.source, edge.target) }, edge);
      this.site = null;
      if (needsAsking(this.edges.get(this.edge.key))) this.loadEdge(this.edge);
      this.render();
      this.container.scrollIntoView({ block: "nearest" });
    }

    // Keep the shown edge while node `id` is one of its ends; otherwise show nothing.
    followNode(id) {
      if (this.edge === null || id === this.edge.source || id === this.edge.target) return;
      this.edge = null;
      this.site = null;
      this.render();
    }

    // Ask the server for an edge's loadings (stored ones, or computed now).
    async loadEdge(edge) {
      this.edges.set(edge.key, { state: "busy" });
      let outcome;
      try {
        const path = `/api/graphs/${encodeURIComponent(this.options.graphName)}/heads`;
        const { data } = await api("POST", path, { source: edge.source, target: edge.target });
        outcome = { state: "done", data };
      } catch (error) {
        outcome = { state: "error", message: `Could not split this edge over heads: ${error.message}` };
      }
      this.edges.set(edge.key, outcome);
      if (this.edge !== null && this.edge.key === edge.key) this.render();
    }

    // Show head `head` of layer `layer` at (query, key): its pattern and QK pairs, fetched if not known (or
    // asked again after an error).
    showSite(layer, head, query, key) {
      this.site = { layer, head, query, key, id: siteKey(layer, head, query, key) };
      if (this.computable && needsAsking(this.sites.get(this.site.id))) this.loadSite(this.site);
      this.render();
    }

    // Ask the server for a head's pattern and QK attribution at one site.
    async loadSite(site) {
      this.remember(site.id, { state: "busy" });
      let outcome;
      try {
        const path = `/api/graphs/${encodeURIComponent(this.options.graphName)}/qk`;
        const body = { layer: site.layer, head: site.head, query: site.query, key: site.key };
        outcome = { state: "done", data: (await api("POST", path, body)).data };
      } catch (error) {
        outcome = { state: "error", message: `Could not explain this head: ${error.message}` };
      }
      this.remember(site.id, outcome);
      if (this.site !== null && this.site.id === site.id) this.render();
    }

    // Keep the latest answer of a site (the oldest are forgotten).
    remember(key, outcome) {
      this.sites.delete(key);
      this.sites.set(key, outcome);
      if (this.sites.size > KEPT_SITES) this.sites.delete(this.sites.keys().next().value);
    }

    // The panel: the shown edge and its heads, then the chosen head.
    render() {
      const edge = this.edge;
      this.container.hidden = edge === null;
      if (edge === null) {
        this.container.dataset.state = "";
        this.container.replaceChildren();
        return;
      }
      const outcome = this.edges.get(edge.key) || { state: "busy" };
      this.container.dataset.state = outcome.state;
      const title = `${this.name(edge.source)} \u2192 ${this.name(edge.target)}`;
      const parts = [
        el("h3", {}, ["Attention heads ", el("span", { class: "count" }, [title])]),
        el("p", { class: "hint" }, [
          `The edge's weight ${edge.weight.toPrecision(4)} split over the heads whose output at position ` +
            `${edge.targetPos} is the last step of its paths between positions.`,
        ]),
      ];
      if (outcome.state === "busy") parts.push(busy("splitting\u2026", "heads-busy"));
      if (outcome.state === "error") parts.push(error(outcome.message, "heads-error"));
      if (outcome.state === "done") parts.push(...this.headList(outcome.data), this.siteView());
      this.container.replaceChildren(...parts);
    }

    // The heads of an edge by |loading|: each as a button that shows it, with its share of the weight; then
    // the rest and the remainder.
    headList(data) {
      const edge = this.edge;
      const scale = Math.max(...data.heads.map((entry) => Math.abs(entry[2])), 1e-30);
      const rows = data.heads.slice(0, SHOWN_HEADS).map(([layer, head, value]) => {
        const chosen = this.site !== null && this.site.layer === layer && this.site.head === head;
        const props = {
          type: "button",
          class: `head-row${chosen ? " selected" : ""}`,
          title: `loading ${value.toPrecision(4)}: show this head's attention pattern and QK attribution`,
          data: { testid: "head", layer: String(layer), head: String(head) },
        };
        const sign = value * (data.weight || 1) >= 0 ? "positive" : "negative";
        const bar = el("span", { class: `head-bar ${sign}` });
        bar.style.width = `${(100 * Math.abs(value)) / scale}%`;
        const button = el("button", props, [
          el("span", { class: "head-name" }, [headName(layer, head)]),
          el("span", { class: "head-bar-track" }, [bar]),
          el("span", { class: `share ${sign}` }, [share(value, data.weight)]),
        ]);
        button.addEventListener("click", () => this.showSite(layer, head, edge.targetPos, edge.sourcePos));
        return el("li", {}, [button]);
      });
      const rest = data.heads.slice(SHOWN_HEADS);
      const notes = [data.stored ? "stored with the graph" : "computed now"];
      if (rest.length) {
        const sum = rest.reduce((total, entry) => total + entry[2], 0);
        notes.push(`${rest.length} other heads carry ${share(sum, data.weight)}`);
      }
      notes.push(`remainder ${data.remainder.toPrecision(2)}`);
      if (!data.heads.length) rows.push(el("li", { class: "empty" }, ["no head can carry this edge"]));
      return [
        el("ol", { class: "head-list", data: { testid: "head-list" } }, rows),
        el("p", { class: "hint", data: { testid: "heads-note" } }, [`${notes.join("; ")}.`]),
      ];
    }

    // The chosen head: a note without the model, else its pattern, score and strongest pairs.
    siteView() {
      const site = this.site;
      const view = el("div", { class: "head-view", data: { testid: "head-view" } });
      if (site === null) {
        view.append(el("p", { class: "hint" }, ["Click a head to see its attention pattern and QK attribution."]));
        return view;
      }
      const title = `${headName(site.layer, site.head)} \u00b7 query ${this.position(site.query)} \u00b7 key ` +
        `${this.position(site.key)}`;
      view.append(el("h4", { data: { testid: "head-title" } }, [title]));
      if (!this.computable) {
        view.dataset.state = "unavailable";
        view.append(el("p", { class: "hint", data: { testid: "head-note" } }, [NEEDS_MODEL]));
        return view;
      }
      const outcome = this.sites.get(site.id) || { state: "busy" };
      view.dataset.state = outcome.state;
      if (outcome.state === "busy") view.append(busy("computing\u2026", "head-busy"));
      if (outcome.state === "error") view.append(error(outcome.message, "head-error"));
      if (outcome.state === "done") view.append(...this.siteResult(outcome.data));
      return view;
    }

    // A head's answer: the heat map, what the query row attends to, the score and the strongest pairs.
    siteResult(data) {
      const row = data.pattern[data.query_position];
      const strongest = row
        .map((weight, key) => ({ weight, key }))
        .sort((a, b) => b.weight - a.weight)
        .slice(0, ROW_ENTRIES)
        .map(({ weight, key }) => `${this.position(key)} ${(100 * weight).toFixed(1)}%`);
      const score =
        `score ${formatNumber(data.score, 4)}` +
        (data.capped_score !== data.score ? ` (${formatNumber(data.capped_score, 4)} soft-capped)` : "") +
        ": the sum over every pair of a query-side and a key-side node";
      const pairs = data.pairs.map((pair) =>
        el("li", { data: { testid: "qk-pair" } }, [
          el("span", { class: "qk-names" }, [
            el("span", { class: "qk-query" }, [this.name(pair.query, data.labels)]),
            " \u00d7 ",
            el("span", { class: "qk-key" }, [this.name(pair.key, data.labels)]),
          ]),
          el("span", { class: `share ${pair.value >= 0 ? "positive" : "negative"}` }, [
            formatNumber(pair.value, 4),
          ]),
        ]),
      );
      return [
        this.heatMap(data),
        el("p", { class: "hint", data: { testid: "pattern-row" } }, [
          `Query ${this.position(data.query_position)} attends to ${strongest.join(", ")}.`,
        ]),
        el("p", { class: "qk-score", data: { testid: "qk-score" } }, [score]),
        el("h4", {}, ["Strongest query \u00d7 key pairs"]),
        el("ol", { class: "qk-pairs", data: { testid: "qk-pairs" } }, pairs),
      ];
    }

    // The whole pattern as a heat map (rows: query positions, columns: key positions), the query row and the
    // key cell outlined; clicking a cell explains that pair of positions.
    heatMap(data) {
      const n = data.pattern.length;
      const cell = Math.min(MAX_CELL_PX, PATTERN_PX / n);
      const svg = svgEl("svg", {
        class: "head-pattern",
        viewBox: `0 0 ${n * cell} ${n * cell}`,
        width: n * cell,
        height: n * cell,
        role: "img",
        "aria-label": "attention pattern",
      });
      svg.dataset.testid = "head-pattern";
      data.pattern.forEach((row, query) => {
        row.forEach((weight, key) => {
          const rect = svgEl("rect", {
            x: key * cell,
            y: query * cell,
            width: cell,
            height: cell,
            class: "pattern-cell",
            "fill-opacity": Math.max(0.03, weight),
          });
          rect.dataset.query = String(query);
          rect.dataset.key = String(key);
          const tip = `query ${this.position(query)} \u2192 key ${this.position(key)}: ${(100 * weight).toFixed(1)}%`;
          rect.append(svgEl("title", {}, [tip]));
          rect.addEventListener("click", () => this.showSite(data.layer, data.head, query, key));
          svg.append(rect);
        });
      });
      const mark = (x, y, width, kind) =>
        svgEl("rect", { x, y, width, height: cell, class: `pattern-mark ${kind}` });
      svg.append(mark(0, data.query_position * cell, (data.query_position + 1) * cell, "row"));
      svg.append(mark(data.key_position * cell, data.query_position * cell, cell, "site"));
      return el("div", { class: "head-pattern-box" }, [
        svg,
        el("p", { class: "hint" }, ["Rows: query positions; columns: key positions. Click a cell to explain it."]),
      ]);
    }

    // A position with its token.
    position(p) {
      const token = this.options.tokens[p];
      return token === undefined ? String(p) : `${p} \u201c${cm.visibleToken(token)}\u201d`;
    }

    // The name of a node: the explorer's for nodes of the document, else a label from the server's feature
    // database, else what its id says.
    name(id, labels = {}) {
      const known = this.options.nameOf(id);
      if (known !== null) return known;
      if (labels[id]) return labels[id];
      const head = HEAD_NODE.exec(id);
      if (head) return `${headName(Number(head[1]), Number(head[2]))} output`;
      if (BIAS_NODE.test(id)) return "bias";
      const ref = cm.parseNodeId(id, this.options.nLayers);
      if (ref === null) return id;
      if (ref.kind === KIND.FEATURE) return `feature ${ref.index} (L${ref.layer})`;
      if (ref.kind === KIND.ERROR) return `error L${ref.layer} @${ref.position}`;
      if (ref.kind === KIND.TOKEN) return cm.visibleToken(this.options.tokens[ref.position] || id);
      return id;
    }
  }

  // Whether an answer must be asked for: none yet, or the last one failed.
  function needsAsking(outcome) {
    return outcome === undefined || outcome.state === "error";
  }

  // The key of an edge.
  function edgeKey(source, target) {
    return `${source}>${target}`;
  }

  // The key of a head site.
  function siteKey(layer, head, query, key) {
    return `${layer}.${head}@${query}:${key}`;
  }

  // A head as people write it.
  function headName(layer, head) {
    return `L${layer}.H${head}`;
  }

  // A loading as a signed share of the edge's weight.
  function share(value, weight) {
    return weight ? cm.formatShare(value / weight) : formatNumber(value, 4);
  }

  // A busy mark.
  function busy(text, testid) {
    return el("p", { class: "iv-busy", data: { testid } }, [text]);
  }

  // An inline error.
  function error(text, testid) {
    return el("p", { class: "fd-error", data: { testid } }, [text]);
  }

  // An SVG element with attributes.
  function svgEl(tag, attributes = {}, children = []) {
    const element = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
    element.append(...children);
    return element;
  }

  Object.assign(cm, { HeadsPanel });
})((window.Circuitmap = window.Circuitmap || {}));

"use strict";
// Graph data for the explorer: the viewer document as typed arrays, adjacency, client-side pruning,
// subgraph scores, and the explorer state with its URL-hash form. No DOM access here.
(function (cm) {
  const KIND = { FEATURE: 0, ERROR: 1, TOKEN: 2, TARGET: 3 };
  const KIND_NAMES = ["feature", "error", "token", "target"];
  const KIND_OF_TYPE = {
    "cross layer transcoder": KIND.FEATURE,
    "mlp reconstruction error": KIND.ERROR,
    embedding: KIND.TOKEN,
    logit: KIND.TARGET,
  };

  // Node ids, as circuitmap/graphs/ids.py writes and reads them: features "layer_index_position" ("*" as
  // the position: every position), error nodes "err_layer_position", tokens "E_token_position", logit
  // targets "(nLayers + 1)_token_position", other targets "T_ordinal_position". Returns {kind, layer,
  // index, position} (null where the id has no such part), or null for text that is no node id.
  const NUMERIC_ID = /^([0-9]+)_([0-9]+)_([0-9]+|\*)$/;
  const PREFIXED_ID = new Map([
    ["err", [KIND.ERROR, /^err_([0-9]+)_([0-9]+)$/]],
    ["E", [KIND.TOKEN, /^E_([0-9]+)_([0-9]+)$/]],
    ["T", [KIND.TARGET, /^T_([0-9]+)_([0-9]+)$/]],
  ]);
  function parseNodeId(text, nLayers) {
    const id = String(text).replace(/^[ \t\n\r]+|[ \t\n\r]+$/g, "");
    const numeric = NUMERIC_ID.exec(id);
    if (numeric) {
      const layer = Number(numeric[1]);
      const kind = nLayers != null && layer === nLayers + 1 ? KIND.TARGET : KIND.FEATURE;
      const position = numeric[3] === "*" ? null : Number(numeric[3]);
      if (position === null && kind !== KIND.FEATURE) return null;
      return { kind, layer, index: Number(numeric[2]), position };
    }
    const prefixed = PREFIXED_ID.get(id.split("_", 1)[0]);
    const match = prefixed ? prefixed[1].exec(id) : null;
    if (!match) return null;
    const [kind, first, position] = [prefixed[0], Number(match[1]), Number(match[2])];
    return kind === KIND.ERROR
      ? { kind, layer: first, index: null, position }
      : { kind, layer: null, index: first, position };
  }

  // The viewer document indexed for drawing and queries: one slot per node, one per link.
  class Graph {
    constructor(doc) {
      this.doc = doc;
      this.metadata = doc.metadata || {};
      this.nodes = doc.nodes || [];
      this.n = this.nodes.length;
      this.readNodes();
      this.replaceLinks(doc.links || []);
    }

    // Read `links` (the document's, or every kept link fetched later) and what depends on them.
    replaceLinks(links) {
      this.readLinks(links);
      this.inputTotal = this.computeInputTotals();
      this.share = this.computeShares();
      this.targetWeight = this.computeTargetWeights();
      this.incoming = this.adjacency(this.dst);
      this.outgoing = this.adjacency(this.src);
    }

    // Node ids, kinds, layers, positions, influence and activation as arrays; the grid's row and column.
    readNodes() {
      const n = this.n;
      this.ids = new Array(n);
      this.index = new Map();
      this.kind = new Uint8Array(n);
      this.layer = new Int32Array(n);
      this.pos = new Int32Array(n);
      this.influence = new Float64Array(n);
      this.activation = new Float64Array(n);
      let targetLayer = -1;
      let maxLayer = -1;
      let maxPos = -1;
      this.nodes.forEach((node, i) => {
        this.ids[i] = node.node_id;
        this.index.set(node.node_id, i);
        const kind = KIND_OF_TYPE[node.feature_type];
        this.kind[i] = kind === undefined ? KIND.FEATURE : kind;
        this.layer[i] = node.layer === "E" ? -1 : Number(node.layer);
        this.pos[i] = node.ctx_idx;
        this.influence[i] = typeof node.influence === "number" ? node.influence : NaN;
        this.activation[i] = typeof node.activation === "number" ? node.activation : NaN;
        if (this.kind[i] === KIND.TARGET) targetLayer = Math.max(targetLayer, this.layer[i]);
        else maxLayer = Math.max(maxLayer, this.layer[i]);
        maxPos = Math.max(maxPos, node.ctx_idx);
      });
      // Targets sit at layer n_layers + 1; without targets the highest feature layer bounds n_layers.
      this.nLayers = targetLayer > 0 ? targetLayer - 1 : maxLayer + 1;
      this.nRows = this.nLayers + 2;
      this.tokens = (this.metadata.prompt_tokens || []).slice();
      this.nPositions = Math.max(this.tokens.length, maxPos + 1, 1);
      this.row = new Int32Array(this.n);
      for (let i = 0; i < this.n; i++) this.row[i] = this.rowOf(this.kind[i], this.layer[i]);
    }

    // Grid row of a node: tokens at the bottom (0), layer l at l + 1, targets on top.
    rowOf(kind, layer) {
      if (kind === KIND.TOKEN) return 0;
      if (kind === KIND.TARGET) return this.nRows - 1;
      return Math.min(Math.max(layer + 1, 1), this.nRows - 2);
    }

    // Links as source, target and weight arrays; links naming unknown nodes are counted and skipped.
    readLinks(links) {
      const src = new Int32Array(links.length);
      const dst = new Int32Array(links.length);
      const weight = new Float64Array(links.length);
      let m = 0;
      for (const link of links) {
        const s = this.index.get(link.source);
        const t = this.index.get(link.target);
        if (s === undefined || t === undefined) continue;
        src[m] = s;
        dst[m] = t;
        weight[m] = link.weight;
        m++;
      }
      this.skippedLinks = links.length - m;
      this.m = m;
      this.src = src.subarray(0, m);
      this.dst = dst.subarray(0, m);
      this.weight = weight.subarray(0, m);
    }

    // Each node's total |weight| of incoming edges: the document's input_total, else the sum over its links.
    computeInputTotals() {
      const total = new Float64Array(this.n);
      for (let e = 0; e < this.m; e++) total[this.dst[e]] += Math.abs(this.weight[e]);
      this.nodes.forEach((node, i) => {
        if (typeof node.input_total === "number") total[i] = node.input_total;
      });
      return total;
    }

    // Each link's share of its target's input: |w| / input_total(target), 0 for a target without input.
    computeShares() {
      const share = new Float64Array(this.m);
      for (let e = 0; e < this.m; e++) {
        const total = this.inputTotal[this.dst[e]];
        share[e] = total > 0 ? Math.abs(this.weight[e]) / total : 0;
      }
      return share;
    }

    // Targets' weights in influence: target_weight when given, else token_prob renormalised, else equal.
    computeTargetWeights() {
      const weight = new Float64Array(this.n);
      const targets = [];
      for (let i = 0; i < this.n; i++) if (this.kind[i] === KIND.TARGET) targets.push(i);
      if (targets.some((i) => typeof this.nodes[i].target_weight === "number")) {
        for (const i of targets) weight[i] = Number(this.nodes[i].target_weight) || 0;
        return weight;
      }
      const total = targets.reduce((sum, i) => sum + (this.nodes[i].token_prob || 0), 0);
      for (const i of targets) {
        weight[i] = total > 0 ? (this.nodes[i].token_prob || 0) / total : 1 / targets.length;
      }
      return weight;
    }

    // Compressed lists of link indices per node, keyed by `ends` (dst: incoming, src: outgoing).
    adjacency(ends) {
      const offsets = new Int32Array(this.n + 1);
      for (let e = 0; e < this.m; e++) offsets[ends[e] + 1]++;
      for (let i = 0; i < this.n; i++) offsets[i + 1] += offsets[i];
      const fill = offsets.slice(0, this.n);
      const links = new Int32Array(this.m);
      for (let e = 0; e < this.m; e++) links[fill[ends[e]]++] = e;
      return { offsets, links };
    }

    // Link indices of node i in `adjacent` (this.incoming or this.outgoing), largest |weight| first.
    sortedLinks(adjacent, i) {
      const list = Array.from(adjacent.links.subarray(adjacent.offsets[i], adjacent.offsets[i + 1]));
      return list.sort((a, b) => Math.abs(this.weight[b]) - Math.abs(this.weight[a]));
    }

    // Feature index of a feature node (null for other nodes).
    featureIndex(i) {
      const ref = parseNodeId(this.ids[i], this.nLayers);
      return ref && ref.kind === KIND.FEATURE ? ref.index : null;
    }

    // Per node, whether the view's thresholds and toggles show it (tokens and targets always shown).
    visibleNodes(view) {
      const visible = new Uint8Array(this.n);
      for (let i = 0; i < this.n; i++) {
        const kind = this.kind[i];
        if (kind === KIND.TOKEN || kind === KIND.TARGET) visible[i] = 1;
        else if (kind === KIND.ERROR && !view.showErrors) visible[i] = 0;
        else visible[i] = !(this.influence[i] > view.nodeThreshold) ? 1 : 0;
      }
      return visible;
    }

    // Indices of the links shown: both ends visible, sign switched on, share of input at least the threshold.
    visibleLinks(view, nodeVisible) {
      const shown = new Int32Array(this.m);
      let count = 0;
      for (let e = 0; e < this.m; e++) {
        if (!nodeVisible[this.src[e]] || !nodeVisible[this.dst[e]]) continue;
        if (this.weight[e] >= 0 ? !view.showPositive : !view.showNegative) continue;
        if (this.share[e] < view.edgeThreshold) continue;
        shown[count++] = e;
      }
      return shown.subarray(0, count);
    }

    // Replacement and completeness of a subgraph: the kept ids, tokens and targets, with the links among them.
    subgraphScores(keptIds) {
      const kept = new Uint8Array(this.n);
      for (let i = 0; i < this.n; i++) {
        if (this.kind[i] === KIND.TOKEN || this.kind[i] === KIND.TARGET) kept[i] = 1;
      }
      for (const id of keptIds) {
        const i = this.index.get(id);
        if (i !== undefined) kept[i] = 1;
      }
      const live = [];
      for (let e = 0; e < this.m; e++) if (kept[this.src[e]] && kept[this.dst[e]]) live.push(e);
      return this.scoresOver(kept, live);
    }

    // Scores over the live links (the algorithm of the Python graph_scores, see its module docstring).
    scoresOver(kept, live) {
      const influence = this.propagate(live);
      const liveShare = new Float64Array(this.n);
      const cleanShare = new Float64Array(this.n);
      for (const e of live) {
        liveShare[this.dst[e]] += this.share[e];
        if (this.kind[this.src[e]] !== KIND.ERROR) cleanShare[this.dst[e]] += this.share[e];
      }
      let tokenMass = 0;
      let errorMass = 0;
      let lostMass = 0;
      let explained = 0;
      let weighed = 0;
      for (let i = 0; i < this.n; i++) {
        const kind = this.kind[i];
        if (kind === KIND.TOKEN) tokenMass += influence[i];
        else if (kind === KIND.ERROR) errorMass += influence[i];
        else lostMass += influence[i] * (1 - liveShare[i]);
        if (kept[i] && this.inputTotal[i] > 0) {
          explained += influence[i] * cleanShare[i];
          weighed += influence[i];
        }
      }
      return {
        replacement: ratio(tokenMass, tokenMass + errorMass + lostMass),
        completeness: ratio(explained, weighed),
      };
    }

    // Influence on the targets over the live links: target weights pushed down link by link until zero.
    propagate(live) {
      const total = Float64Array.from(this.targetWeight);
      if (!this.n) return total; // no nodes: nothing to push (the loop below would not run)
      let term = Float64Array.from(this.targetWeight);
      for (let step = 0; step < this.n; step++) {
        const next = new Float64Array(this.n);
        let any = false;
        for (const e of live) {
          const flow = term[this.dst[e]] * this.share[e];
          if (flow !== 0) {
            next[this.src[e]] += flow;
            any = true;
          }
        }
        if (!any) return total;
        for (let i = 0; i < this.n; i++) total[i] += next[i];
        term = next;
      }
      throw new Error("the graph's links contain a cycle: influence does not vanish");
    }
  }

  // numerator / denominator, or null when the denominator is not positive (an undefined score).
  function ratio(numerator, denominator) {
    return denominator > 0 ? numerator / denominator : null;
  }

  // The view's fields and their types: thresholds are numbers in [0, 1], toggles booleans.
  const VIEW_TYPES = {
    nodeThreshold: "number",
    edgeThreshold: "number",
    showErrors: "boolean",
    showPositive: "boolean",
    showNegative: "boolean",
  };

  // The default view of a document: its node threshold, every link, errors and both signs shown.
  function defaultView(metadata) {
    const threshold = Number(metadata && metadata.node_threshold);
    return {
      nodeThreshold: threshold > 0 && threshold <= 1 ? threshold : 0.8,
      edgeThreshold: 0,
      showErrors: true,
      showPositive: true,
      showNegative: true,
    };
  }

  // `base` overridden by the well-typed view fields of `extra` (unknown or malformed ones are ignored).
  function overlayView(base, extra) {
    const view = Object.assign({}, base);
    for (const [key, type] of Object.entries(VIEW_TYPES)) {
      const value = extra && extra[key];
      if (typeof value !== type) continue;
      if (type === "boolean") view[key] = value;
      else if (Number.isFinite(value)) view[key] = Math.min(1, Math.max(0, value));
    }
    return view;
  }

  // Whether `value` is a plain JSON object (not null, not a list).
  function isObject(value) {
    return typeof value === "object" && value !== null && !Array.isArray(value);
  }

  // Whether a saved part is absent (missing or null): absent parts take their defaults without a notice.
  function absent(value) {
    return value === undefined || value === null;
  }

  // The node ids in `value`: a list of strings; a non-list, or entries that are not strings, are left out
  // and described in `problems`.
  function idList(value, what, problems) {
    if (absent(value)) return [];
    if (!Array.isArray(value)) {
      problems.push(`${what} is not a list`);
      return [];
    }
    const ids = value.filter((id) => typeof id === "string");
    const bad = value.length - ids.length;
    if (bad) problems.push(`${what} holds ${bad} id(s) that are not text`);
    return ids;
  }

  // The supernodes in `value`: a list of [label, id, …] groups; groups of another shape are left out and
  // described in `problems`.
  function groupList(value, problems) {
    if (absent(value)) return [];
    if (!Array.isArray(value)) {
      problems.push("supernodes is not a list");
      return [];
    }
    const groups = value.filter((group) => Array.isArray(group) && typeof group[0] === "string");
    if (groups.length < value.length) {
      problems.push(`${value.length - groups.length} supernode(s) are not [label, id, \u2026] lists`);
    }
    return groups.map((group) => [group[0], ...idList(group.slice(1), `supernode "${group[0]}"`, problems)]);
  }

  // The explorer state saved in a document's qParams (and qParams.view), on top of the default view. Parts
  // of the wrong type count as absent; each is described in `problems`, for the caller to report.
  function stateFromDocument(doc, problems = []) {
    if (!absent(doc.qParams) && !isObject(doc.qParams)) problems.push("qParams is not an object");
    const q = isObject(doc.qParams) ? doc.qParams : {};
    if (!absent(q.clickedId) && typeof q.clickedId !== "string") problems.push("clickedId is not text");
    if (!absent(q.view) && !isObject(q.view)) problems.push("view is not an object");
    return normalizeState({
      pinned: idList(q.pinnedIds, "pinnedIds", problems),
      supernodes: groupList(q.supernodes, problems),
      labels: {},
      clicked: typeof q.clickedId === "string" ? q.clickedId : "",
      view: overlayView(defaultView(doc.metadata), isObject(q.view) ? q.view : {}),
    });
  }

  // A well-formed copy of a state: unique pins, members pinned, each node in at most one supernode, labels
  // that are strings (parts of the wrong type are dropped, so that nothing here throws).
  function normalizeState(state) {
    const seen = new Set();
    const supernodes = [];
    for (const group of Array.isArray(state.supernodes) ? state.supernodes : []) {
      if (!Array.isArray(group) || group.length < 2) continue;
      const members = group.slice(1).filter((id) => typeof id === "string" && !seen.has(id));
      members.forEach((id) => seen.add(id));
      if (members.length) supernodes.push([String(group[0]), ...members]);
    }
    const listed = Array.isArray(state.pinned) ? state.pinned : [];
    const pinned = [...new Set([...listed, ...seen])].filter((id) => typeof id === "string");
    const labels = isObject(state.labels) ? state.labels : {};
    return {
      pinned,
      supernodes,
      labels: Object.fromEntries(Object.entries(labels).filter(([, label]) => typeof label === "string")),
      clicked: typeof state.clicked === "string" ? state.clicked : "",
      view: Object.assign({}, state.view),
    };
  }

  const HASH_VIEW_KEYS = [
    ["nt", "nodeThreshold"],
    ["et", "edgeThreshold"],
    ["errors", "showErrors"],
    ["pos", "showPositive"],
    ["neg", "showNegative"],
  ];
  const HASH_KEYS = ["node", "pinned", "supernodes", "labels", ...HASH_VIEW_KEYS.map(([key]) => key)];

  // The URL-hash form of a state: readable keys, ids comma-separated, groups and labels as JSON.
  function stateToHash(state) {
    const params = new URLSearchParams();
    if (state.clicked) params.set("node", state.clicked);
    if (state.pinned.length) params.set("pinned", state.pinned.join(","));
    if (state.supernodes.length) params.set("supernodes", JSON.stringify(state.supernodes));
    if (Object.keys(state.labels).length) params.set("labels", JSON.stringify(state.labels));
    params.set("nt", String(state.view.nodeThreshold));
    params.set("et", String(state.view.edgeThreshold));
    params.set("errors", state.view.showErrors ? "1" : "0");
    params.set("pos", state.view.showPositive ? "1" : "0");
    params.set("neg", state.view.showNegative ? "1" : "0");
    return params.toString();
  }

  // A state read from a URL hash: the hash is the whole state, except that view fields it lacks keep the
  // values of `fallback`'s view; null when the hash holds no state. Unreadable JSON throws, for the caller
  // to report; supernodes of the wrong shape are left out and described in `problems`.
  function stateFromHash(hash, fallback, problems = []) {
    const params = new URLSearchParams(hash.replace(/^#/, ""));
    if (!HASH_KEYS.some((key) => params.has(key))) return null;
    const extra = {};
    for (const [key, name] of HASH_VIEW_KEYS) {
      if (!params.has(key)) continue;
      extra[name] = VIEW_TYPES[name] === "number" ? Number(params.get(key)) : params.get(key) !== "0";
    }
    return normalizeState({
      pinned: params.has("pinned") ? params.get("pinned").split(",").filter(Boolean) : [],
      supernodes: params.has("supernodes") ? groupList(JSON.parse(params.get("supernodes")), problems) : [],
      labels: params.has("labels") ? JSON.parse(params.get("labels")) : {},
      clicked: params.get("node") || "",
      view: overlayView(fallback.view, extra),
    });
  }

  // The request body of PUT /api/graphs/{name}/state for a state (revision added by the caller).
  function savedForm(state) {
    return {
      pinnedIds: state.pinned.slice(),
      supernodes: state.supernodes.map((group) => group.slice()),
      clickedId: state.clicked,
      labels: Object.assign({}, state.labels),
      view: Object.assign({}, state.view),
    };
  }

  Object.assign(cm, {
    KIND,
    KIND_NAMES,
    parseNodeId,
    Graph,
    stateFromDocument,
    normalizeState,
    stateToHash,
    stateFromHash,
    savedForm,
  });
})((window.Circuitmap = window.Circuitmap || {}));

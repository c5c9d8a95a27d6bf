"use strict";
// The graph view (served, or exported with the document embedded in the page) and the start-up that picks
// the page to show.
(function (cm) {
  const { KIND, KIND_NAMES } = cm;
  const { $, el, formatNumber, formatCounts, formatScores, api } = cm.ui;
  const { showMessage, hideMessage, ask, setUpDialog, showView, showHomeLink } = cm.ui;
  const EDGE_ROWS = 30;
  const GROUPED_LINKS = 60;
  const GROUPED_TARGETS = 3;
  const EXPANDED_MEMBERS = 10;
  const HASH_DELAY_MS = 150;
  const SCORE_DELAY_MS = 200;
  const DOCUMENT_EDGES = "on the document's edges";
  const HEADS_ID = "circuitmap-heads";
  const TARGET_CLERP = /^Output "(.*)" \(p=[0-9.]+\)$/s;
  const NO_DATABASE =
    "No feature database on this server: build one with circuitmap features build and serve with " +
    "--features to see this feature's contexts, activations and label.";
  const NO_MODEL =
    "Interventions need the model: serve with --model and --transcoders to edit features and compare " +
    "the next tokens and continuations.";

  class Explorer {
    // `options`: doc, name (served), revision, config, exported (bool).
    constructor(options) {
      Object.assign(this, options);
      this.notices = [];
      this.noticeKind = "info";
      this.graph = new cm.Graph(this.doc);
      const problems = [];
      const saved = cm.stateFromDocument(this.doc, problems);
      this.reportMalformed(problems, "saved state");
      this.docState = this.knownState(saved, "saved state");
      this.savedKey = dirtyKey(this.docState);
      this.state = this.initialState();
      this.checked = new Set();
      this.shownAll = { incoming: false, outgoing: false };
      this.scoreRound = 0;
      this.saving = false;
      this.saveQueued = false;
      this.browsedFeature = null;
      this.shownSupernode = null;
      this.featureNodes = null;
      this.mode = "full";
      this.expanded = new Set();
      this.allLinks = false;
    }

    get served() {
      return !this.exported;
    }

    get canSave() {
      return this.served && !this.config.read_only;
    }

    // Build the view, draw it once (timed for the first-paint figure), then hook the controls up.
    start() {
      showView("graph-view");
      this.renderHeader();
      this.canvas = new cm.GraphCanvas($("graph-canvas"), this.graph, {
        onHover: (i, x, y) => this.showTooltip(i, x, y),
        onSelect: (i) => this.select(i),
        labelOf: (i) => this.labelOf(i),
      });
      this.subgraph = new cm.SubgraphView($("subgraph-svg"), {
        onNodeClick: (item, event) => this.onSubgraphClick(item, event),
      });
      this.grouped = new cm.SubgraphView(
        $("grouped-svg"),
        { onNodeClick: (item) => this.onGroupedClick(item) },
        { maxLinks: GROUPED_LINKS, labelLength: 24, slotWidth: 150, rowHeight: 46 },
      );
      $("graph-empty").hidden = this.graph.n > 0;
      this.setUpFeatures();
      this.interventions = new cm.InterventionPanel($("intervention"), {
        available: this.served && Boolean(this.config.can_compute),
        note: this.served ? NO_MODEL : "",
        graphName: this.name,
      });
      this.setUpHeads();
      this.setUpPersona();
      this.applyState();
      this.setMode(this.state.supernodes.length ? "grouped" : "full");
      this.canvas.drawNow();
      this.recordFirstPaint();
      this.wireControls();
      this.updateSaveStatus();
      this.exposeTestHook();
    }

    // Timing marks for tests and the benchmark, and the ready flag: the first draw's end, and the frame
    // after the one that showed it (by then the browser has rasterised the drawing).
    recordFirstPaint() {
      performance.mark("first-paint");
      const timings = { firstPaintMs: performance.now(), baseDrawMs: this.canvas.lastBaseMs, firstFrameMs: null };
      window.circuitmapTimings = timings;
      requestAnimationFrame(() => requestAnimationFrame(() => (timings.firstFrameMs = performance.now())));
      document.body.dataset.ready = "1";
    }

    // A small API for tests: node positions on screen, the state, selection and client-side scores.
    exposeTestHook() {
      window.circuitmapExplorer = {
        nodeScreenPosition: (id) => this.canvas.nodeScreenPosition(id),
        state: () => JSON.parse(JSON.stringify(this.state)),
        select: (id) => this.select(this.graph.index.has(id) ? this.graph.index.get(id) : -1),
        clientScores: (ids) => this.graph.subgraphScores(ids),
        saving: () => this.saving,
        openFeature: (layer, feature) => this.openFeature(layer, feature),
      };
    }

    // The feature dashboard of the node panel and the feature search box (with a feature database only).
    setUpFeatures() {
      const available = this.served && Boolean(this.config.features);
      this.dashboard = new cm.FeatureDashboard($("feature-dashboard"), {
        available,
        canEdit: available && !this.config.read_only,
        note: this.served ? NO_DATABASE : "",
        onLabelSaved: (layer, feature, label) => this.featureLabelSaved(layer, feature, label),
      });
      $("feature-search").hidden = !available;
      if (!available) return;
      this.featureSearch = new cm.FeatureSearch($("feature-search-input"), $("feature-hits"), {
        onOpen: (layer, feature) => this.openFeature(layer, feature),
        inGraph: (layer, feature) => this.nodesOfFeature(layer, feature).length > 0,
      });
    }

    // The heads panel: the attention heads that carry a cross-position edge. Its edges show a "heads" button
    // once the stored loadings are read (and, on a server with the model, on every cross-position edge).
    setUpHeads() {
      const embedded = $(HEADS_ID);
      this.heads = new cm.HeadsPanel($("heads"), {
        served: this.served,
        graphName: this.name,
        stored: embedded ? JSON.parse(embedded.textContent) : null,
        tokens: this.graph.tokens,
        nLayers: this.graph.nLayers,
        nameOf: (id) => (this.graph.index.has(id) ? this.displayName(this.graph.index.get(id)) : null),
      });
      this.heads
        .start()
        .then(() => this.renderPanel())
        .catch((error) => this.notify(`Could not read the stored head loadings: ${error.message}`, "error"));
    }

    // The persona panel (served pages only); it shows itself once the server lists a vector.
    setUpPersona() {
      if (!this.served) return;
      const prompt = this.graph.metadata.prompt || "";
      this.persona = new cm.PersonaPanel($("persona"), { graphName: this.name, prompt });
      this.persona.start().catch((error) => {
        this.notify(`Could not list the persona vectors: ${error.message}`, "error");
      });
    }

    // The state to start from: the URL hash when it holds one (less label edits equal to the saved labels,
    // as a link taken before a save holds), else the document's saved state.
    initialState() {
      const problems = [];
      try {
        const fromHash = cm.stateFromHash(location.hash, this.docState, problems);
        this.reportMalformed(problems, "link");
        if (fromHash) return this.withoutUnchangedLabels(this.knownState(fromHash, "link"));
      } catch (error) {
        const text = `The state in this link could not be read (${error.message}); showing the saved state.`;
        this.notify(text, "error");
      }
      return cm.normalizeState(this.docState);
    }

    // Show a notice in the banner along with the earlier ones (an error among them keeps the banner red).
    notify(text, kind = "info") {
      if (kind === "error") this.noticeKind = "error";
      this.notices.push(text);
      showMessage(this.notices.join(" "), this.noticeKind);
    }

    // Report the parts of the state from `source` that were ignored for being malformed.
    reportMalformed(problems, source) {
      if (problems.length) this.notify(`Malformed parts of the ${source} were ignored: ${problems.join("; ")}.`);
    }

    // `state` without the ids this graph lacks, with a notice saying how many were dropped from `source`.
    knownState(state, source) {
      const unknown = new Set();
      const keep = (ids) =>
        ids.filter((id) => {
          if (this.graph.index.has(id)) return true;
          unknown.add(id);
          return false;
        });
      const labels = Object.entries(state.labels).filter(([id]) => keep([id]).length);
      const clean = cm.normalizeState({
        pinned: keep(state.pinned),
        supernodes: state.supernodes.map((group) => [group[0], ...keep(group.slice(1))]),
        labels: Object.fromEntries(labels),
        clicked: this.graph.index.has(state.clicked) ? state.clicked : "",
        view: state.view,
      });
      if (unknown.size) {
        this.notify(`${unknown.size} node id(s) in the ${source} are not in this graph and were ignored.`);
      }
      return clean;
    }

    // Apply the whole state to the controls, canvas, panel and subgraph.
    applyState() {
      this.setControls();
      this.applyView();
      this.applyMarks();
      this.renderSubgraph();
      this.updateScores();
    }

    // ------------------------------------------------------------ header

    // Title, prompt, model and transcoders, counts and the document's scores.
    renderHeader() {
      const meta = this.graph.metadata;
      const title = this.name || meta.slug || "graph";
      document.title = `${title} \u00b7 circuitmap`;
      $("graph-heading").hidden = false;
      $("graph-title").textContent = title;
      $("graph-prompt").textContent = meta.prompt || "";
      if (this.served) showHomeLink();
      $("save-bar").hidden = !this.canSave;
      const scores = meta.scores || {};
      const facts = [
        ["Model", meta.model],
        ["Transcoders", meta.transcoders],
        ["Nodes", formatCounts(meta.n_nodes)],
        ["Links", formatCounts(meta.n_edges)],
        ["Full graph", formatScores(scores.full)],
        [meta.pruned ? "Pruned document" : "Document", formatScores(scores.exported)],
      ];
      const items = facts.map(([key, value]) =>
        el("span", { class: "fact" }, [el("b", {}, [key]), ` ${value || "\u2014"}`]),
      );
      if (this.exported) items.push(el("span", { class: "fact badge" }, ["exported snapshot (read-only)"]));
      else if (this.config.read_only) items.push(el("span", { class: "fact badge" }, ["read-only server"]));
      $("graph-info").replaceChildren(...items);
      if (this.graph.skippedLinks) {
        const count = this.graph.skippedLinks;
        this.notify(`${count} link(s) name nodes missing from the document and are not shown.`);
      }
    }

    // ------------------------------------------------------------ controls and filters

    // Put the state's view into the sliders and checkboxes.
    setControls() {
      const view = this.state.view;
      $("node-threshold").value = String(view.nodeThreshold);
      $("edge-threshold").value = String(Math.round(Math.cbrt(Math.max(0, view.edgeThreshold)) * 1000));
      $("show-errors").checked = view.showErrors;
      $("show-positive").checked = view.showPositive;
      $("show-negative").checked = view.showNegative;
      this.showControlValues();
    }

    // The sliders' values as text.
    showControlValues() {
      $("node-threshold-value").textContent = formatNumber(this.state.view.nodeThreshold, 3);
      $("edge-threshold-value").textContent = cm.formatShare(this.state.view.edgeThreshold).replace("+", "");
    }

    // Read the controls into the state's view (the link slider is cubic: fine steps near zero).
    readControls() {
      const position = Number($("edge-threshold").value) / 1000;
      Object.assign(this.state.view, {
        nodeThreshold: Number($("node-threshold").value),
        edgeThreshold: position * position * position,
        showErrors: $("show-errors").checked,
        showPositive: $("show-positive").checked,
        showNegative: $("show-negative").checked,
      });
      this.showControlValues();
    }

    // Recompute which nodes and links are shown and hand them to the canvas.
    applyView() {
      const visible = this.graph.visibleNodes(this.state.view);
      const links = this.graph.visibleLinks(this.state.view, visible);
      this.canvas.setVisibility(visible, links);
      if (this.mode !== "full") return;
      const count = (value) => value.toLocaleString("en-US");
      const shown = visible.reduce((sum, v) => sum + v, 0);
      const thinned = this.canvas.thinned ? " (the strong ones drawn: hover or select a node for all of its)" : "";
      $("shown-counts").textContent =
        `${count(shown)} of ${count(this.graph.n)} nodes, ${count(links.length)} of ${count(this.graph.m)} links` +
        thinned;
    }

    // Event wiring for sliders, toggles, buttons, the label box, keys, hash changes and saving.
    wireControls() {
      let pending = 0;
      const onFilter = () => {
        this.readControls();
        if (pending) return;
        pending = requestAnimationFrame(() => {
          pending = 0;
          this.applyView();
          this.stateChanged();
        });
      };
      for (const id of ["node-threshold", "edge-threshold"]) $(id).addEventListener("input", onFilter);
      for (const id of ["show-errors", "show-positive", "show-negative"]) {
        $(id).addEventListener("change", onFilter);
      }
      $("fit-button").addEventListener("click", () => this.canvas.fit());
      $("mode-grouped").addEventListener("click", () => this.setMode("grouped"));
      $("mode-full").addEventListener("click", () => this.setMode("full"));
      $("all-links-button").addEventListener("click", () => this.loadAllLinks());
      $("pin-button").addEventListener("click", () => this.togglePin(this.state.clicked));
      $("node-label").addEventListener("input", () => this.editLabel($("node-label").value));
      $("group-button").addEventListener("click", () => this.group());
      $("ungroup-button").addEventListener("click", () => this.ungroup());
      $("rename-button").addEventListener("click", () => this.renameSupernode());
      $("unpin-button").addEventListener("click", () => this.unpinChecked());
      $("save-button").addEventListener("click", () => this.save());
      document.addEventListener("keydown", (event) => this.onKey(event));
      window.addEventListener("hashchange", () => this.onHashChange());
    }

    // Keys: P pins or unpins the selection, Escape clears it, Ctrl/Cmd+S saves; not while typing text.
    onKey(event) {
      if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "s" && this.canSave) {
        event.preventDefault();
        this.save();
        return;
      }
      const typing = event.target.matches("textarea, select, input:not([type=checkbox]):not([type=range])");
      if (typing || $("dialog").open || event.ctrlKey || event.metaKey || event.altKey) return;
      if (event.key === "p" || event.key === "P") this.togglePin(this.state.clicked);
      else if (event.key === "Escape") this.select(-1);
    }

    // The hash was edited or a link followed: take its state (or the saved one) as a whole.
    onHashChange() {
      if (location.hash.replace(/^#/, "") === cm.stateToHash(this.state)) return;
      this.notices = [];
      this.noticeKind = "info";
      this.state = this.initialState();
      this.checked.clear();
      this.applyState();
      this.updateSaveStatus();
    }

    // ------------------------------------------------------------ state bookkeeping

    // After any change: write the hash soon (coalesced) and refresh the unsaved-changes mark.
    stateChanged() {
      clearTimeout(this.hashTimer);
      this.hashTimer = setTimeout(() => {
        // Resolved against the document's own address, not its base: inside a notebook's frame
        // (about:srcdoc) the base is the notebook's page, which the frame may not take as its address.
        const url = new URL(`#${cm.stateToHash(this.state)}`, location.href).href;
        try {
          history.replaceState(history.state, "", url);
        } catch (error) {
          // A frame whose history cannot change (sandboxed) keeps its state in the page only.
        }
      }, HASH_DELAY_MS);
      this.updateSaveStatus();
    }

    // Mark unsaved changes (served mode only).
    updateSaveStatus() {
      if (!this.canSave) return;
      const dirty = dirtyKey(this.state) !== this.savedKey;
      const status = $("save-status");
      if (dirty) {
        status.textContent = "unsaved changes";
        status.className = "save-status dirty";
      } else if (status.classList.contains("dirty")) {
        status.textContent = "";
        status.className = "save-status";
      }
      $("save-button").classList.toggle("primary", dirty);
    }

    // Save the state. A save asked for while one runs (Ctrl+S is not blocked by the disabled button) waits
    // for it, then runs with the new revision if that one succeeded and something changed since.
    async save() {
      if (this.saving) {
        this.saveQueued = true;
        return;
      }
      this.saving = true;
      let saved;
      do {
        this.saveQueued = false;
        saved = await this.saveOnce();
      } while (saved && this.saveQueued && this.needsSave());
      this.saving = false;
      this.saveQueued = false;
      this.withoutUnchangedLabels(this.state);
    }

    // Whether the state differs from the saved one (the selection included, which Save also stores).
    needsSave() {
      return dirtyKey(this.state) !== this.savedKey || this.state.clicked !== this.docState.clicked;
    }

    // Send the state to the server once; resolves to whether it was saved. A stale revision means someone
    // else saved: the user must reload. A failure stays shown ("not saved") until the next change.
    async saveOnce() {
      const button = $("save-button");
      const status = $("save-status");
      button.disabled = true;
      status.textContent = "saving\u2026";
      status.className = "save-status";
      const snapshot = cm.normalizeState(this.state);
      try {
        const body = Object.assign({ revision: this.revision }, cm.savedForm(snapshot));
        const { data } = await api("PUT", `/api/graphs/${encodeURIComponent(this.name)}/state`, body);
        this.revision = data.revision;
        this.savedAs(snapshot);
        status.textContent = "saved";
        status.className = "save-status saved";
        this.notices = [];
        hideMessage();
        this.stateChanged();
        return true;
      } catch (error) {
        status.textContent = "not saved";
        status.className = "save-status failed";
        showMessage(
          error.status === 409
            ? "Not saved: this graph was saved elsewhere since you opened it. Reload the page to get that " +
                "version (your unsaved changes here will be lost), then redo them."
            : `Could not save: ${error.message}`,
        );
        return false;
      } finally {
        button.disabled = false;
      }
    }

    // Make the just-saved `snapshot` the saved state: its labels become the nodes' clerps (as the server
    // wrote them) and leave the state, which keeps only the edits made since.
    savedAs(snapshot) {
      for (const [id, label] of Object.entries(snapshot.labels)) {
        const i = this.graph.index.get(id);
        const node = this.graph.nodes[i];
        node.clerp = this.graph.kind[i] === KIND.TARGET ? targetClerp(label, node.token_prob) : label;
        delete node.label_source;
      }
      this.docState = cm.normalizeState(Object.assign({}, snapshot, { labels: {} }));
      this.savedKey = dirtyKey(this.docState);
      this.withoutUnchangedLabels(this.state);
      this.tipNode = -1;
      this.renderPanel();
      this.renderSubgraph();
    }

    // `state` without the label edits equal to their node's saved label (they change nothing).
    withoutUnchangedLabels(state) {
      for (const [id, label] of Object.entries(state.labels)) {
        if (label === this.savedLabel(this.graph.index.get(id))) delete state.labels[id];
      }
      return state;
    }

    // ------------------------------------------------------------ selection, labels, tooltip

    // The edited label of node id, or undefined when it has none.
    editedLabel(id) {
      return Object.prototype.hasOwnProperty.call(this.state.labels, id) ? this.state.labels[id] : undefined;
    }

    // The saved label of node i as the label box edits it: the clerp, or a target's name inside its
    // `Output "…" (p=…)` clerp (the server keeps that form around a saved target label).
    savedLabel(i) {
      const clerp = this.graph.nodes[i].clerp || "";
      const match = this.graph.kind[i] === KIND.TARGET && clerp.match(TARGET_CLERP);
      return match ? match[1] : clerp;
    }

    // The text the label box edits: the edited label, else the saved one.
    editableLabel(i) {
      const edited = this.editedLabel(this.graph.ids[i]);
      return edited === undefined ? this.savedLabel(i) : edited;
    }

    // Label of node i as shown: the edited one (a target's in its Output form), else the clerp.
    labelOf(i) {
      const edited = this.editedLabel(this.graph.ids[i]);
      if (edited === undefined) return this.graph.nodes[i].clerp || "";
      if (this.graph.kind[i] !== KIND.TARGET) return edited;
      return targetClerp(edited, this.graph.nodes[i].token_prob);
    }

    // Label of node i, or a description when it has none; a token's own text with its spaces shown.
    displayName(i) {
      const g = this.graph;
      if (g.kind[i] === KIND.TOKEN && this.editedLabel(g.ids[i]) === undefined) {
        return cm.visibleToken(g.nodes[i].clerp || g.tokens[g.pos[i]]);
      }
      const label = this.labelOf(i);
      if (label) return label;
      if (g.kind[i] === KIND.FEATURE) return `feature ${g.featureIndex(i)} (L${g.layer[i]})`;
      if (g.kind[i] === KIND.ERROR) return `error L${g.layer[i]} @${g.pos[i]}`;
      return g.ids[i];
    }

    // Layer as people say it: "embedding", "output (…)", or the layer number.
    layerName(i) {
      const g = this.graph;
      if (g.kind[i] === KIND.TOKEN) return "embedding";
      if (g.kind[i] === KIND.TARGET) return `output (${g.nodes[i].layer})`;
      return String(g.layer[i]);
    }

    // Layer in a few characters: "emb", "out" or L<layer>.
    shortLayer(i) {
      const kind = this.graph.kind[i];
      return kind === KIND.TOKEN ? "emb" : kind === KIND.TARGET ? "out" : `L${this.graph.layer[i]}`;
    }

    // Position with its token.
    positionName(i) {
      const position = this.graph.pos[i];
      const token = this.graph.tokens[position];
      return token === undefined ? String(position) : `${position} \u00b7 \u201c${cm.visibleToken(token)}\u201d`;
    }

    // Select node i (-1 or undefined: none); this ends showing a feature found by search or a supernode.
    select(i) {
      const id = i >= 0 ? this.graph.ids[i] : "";
      const browsing = this.browsedFeature !== null || this.shownSupernode !== null;
      this.browsedFeature = null;
      this.shownSupernode = null;
      if (id === this.state.clicked && !browsing) return;
      this.state.clicked = id;
      this.shownAll = { incoming: false, outgoing: false };
      this.applyMarks();
      this.renderSubgraph();
      this.stateChanged();
    }

    // Selection and pins to the canvas, and the panel.
    applyMarks() {
      const selected = this.graph.index.get(this.state.clicked);
      this.canvas.setMarks(selected === undefined ? -1 : selected, new Set(this.state.pinned));
      this.renderPanel();
    }

    // The hover tooltip: label, kind, layer, position, activation (hidden for -1); kept inside the canvas.
    showTooltip(i, clientX, clientY) {
      const tip = $("tooltip");
      if (i < 0) {
        tip.hidden = true;
        return;
      }
      if (this.tipNode !== i || tip.hidden) {
        this.tipNode = i;
        const g = this.graph;
        const where = [KIND_NAMES[g.kind[i]], `layer ${this.layerName(i)}`, `pos ${this.positionName(i)}`];
        const lines = [el("div", { class: "tip-label" }, [this.displayName(i)])];
        lines.push(el("div", {}, [where.join(" \u00b7 ")]));
        for (const [name, values] of [["activation", g.activation], ["influence", g.influence]]) {
          if (!Number.isNaN(values[i])) lines.push(el("div", {}, [`${name} ${formatNumber(values[i])}`]));
        }
        tip.replaceChildren(...lines);
        tip.dataset.nodeId = g.ids[i];
        tip.hidden = false;
      }
      const box = $("graph-canvas").getBoundingClientRect();
      const x = Math.min(clientX - box.left + 14, box.width - tip.offsetWidth - 4);
      const below = clientY - box.top + 14;
      const y = below + tip.offsetHeight > box.height ? clientY - box.top - tip.offsetHeight - 10 : below;
      tip.style.transform = `translate(${Math.max(0, x)}px, ${Math.max(0, y)}px)`;
    }

    // Record a label edit for the selected node (an edit back to the saved label is no edit; while a save
    // runs every edit is kept, as the saved label may be about to change).
    editLabel(value) {
      const id = this.state.clicked;
      const i = this.graph.index.get(id);
      if (i === undefined) return;
      delete this.state.labels[id];
      if (this.saving || value !== this.savedLabel(i)) this.state.labels[id] = value;
      this.tipNode = -1;
      this.renderSubgraph();
      this.canvas.requestDraw(true);
      this.stateChanged();
    }

    // ------------------------------------------------------------ grouped view and full view

    // Show the grouped view (supernodes, tokens and targets, the strongest summed links) or the full graph
    // on the canvas; the full view's filters apply to it alone.
    setMode(mode) {
      this.mode = mode;
      const grouped = mode === "grouped";
      $("grouped-view").hidden = !grouped;
      $("graph-canvas").hidden = grouped;
      $("full-controls").hidden = grouped;
      $("fit-button").hidden = grouped;
      $("mode-grouped").setAttribute("aria-pressed", String(grouped));
      $("mode-full").setAttribute("aria-pressed", String(!grouped));
      this.updateAllLinksButton();
      if (grouped) this.renderGrouped();
      else {
        this.canvas.onResize();
        this.canvas.requestDraw(true);
        this.applyView();
      }
    }

    // The grouped view's items: each supernode as one box, or once expanded its EXPANDED_MEMBERS first
    // (most influential) members and a box for the rest; then every token and the GROUPED_TARGETS heaviest
    // targets.
    groupedItems() {
      const items = [];
      const add = (label, ids) => {
        const key = ids.join(",");
        if (!this.expanded.has(key)) {
          items.push({ key: `super:${key}`, label, ids, isSuper: true });
          return;
        }
        for (const id of ids.slice(0, EXPANDED_MEMBERS)) {
          const i = this.graph.index.get(id);
          items.push({ key: id, label: this.displayName(i), ids: [id], isSuper: false, group: key });
        }
        if (ids.length > EXPANDED_MEMBERS) add(`${label} (rest)`, ids.slice(EXPANDED_MEMBERS));
      };
      for (const group of this.state.supernodes) add(group[0], group.slice(1));
      const g = this.graph;
      const targets = [];
      for (let i = 0; i < g.n; i++) if (g.kind[i] === KIND.TARGET) targets.push(i);
      targets.sort((a, b) => g.targetWeight[b] - g.targetWeight[a]);
      const tokens = [];
      for (let i = 0; i < g.n; i++) if (g.kind[i] === KIND.TOKEN) tokens.push(i);
      for (const i of [...tokens, ...targets.slice(0, GROUPED_TARGETS)]) {
        items.push({ key: g.ids[i], label: this.displayName(i), ids: [g.ids[i]], isSuper: false });
      }
      return items;
    }

    // Draw the grouped view and say what it shows.
    renderGrouped() {
      if (this.mode !== "grouped") return;
      const items = this.groupedItems();
      this.grouped.render(this.graph, items, new Set(), this.state.clicked);
      const groups = items.filter((item) => item.isSuper).length;
      const members = new Set(this.state.supernodes.flatMap((group) => group.slice(1))).size;
      const features = this.graph.kind.reduce((sum, kind) => sum + (kind === KIND.FEATURE ? 1 : 0), 0);
      const open = this.expanded.size ? `, ${this.expanded.size} expanded (click a member to select it)` : "";
      $("shown-counts").textContent =
        `${groups} supernodes holding ${members} of ${features} features${open}; ` +
        `the ${GROUPED_LINKS} strongest summed links`;
    }

    // A click in the grouped view: a supernode opens into its members (and a saved one shows in the
    // panel); a member or token or target is selected; a selected member's click closes its box again.
    onGroupedClick(item) {
      if (item.isSuper) {
        this.expanded.add(item.ids.join(","));
        const saved = this.subgraphItems().find((other) => other.isSuper && other.ids.join(",") === item.ids.join(","));
        if (saved) this.showSupernode(saved);
        else this.renderGrouped();
        return;
      }
      if (item.group && item.ids[0] === this.state.clicked) {
        this.expanded.delete(item.group);
        this.renderGrouped();
        return;
      }
      this.select(this.graph.index.get(item.ids[0]));
    }

    // The "All links" button: shown on a served graph whose document lists fewer links than it kept.
    updateAllLinksButton() {
      const counts = this.graph.metadata.n_edges || {};
      const more = this.served && !this.allLinks && counts.pruned > counts.exported;
      $("all-links-button").hidden = !more;
      if (more) $("all-links-button").textContent = `All ${Number(counts.pruned).toLocaleString("en-US")} links`;
    }

    // Fetch every kept link (the document lists the strongest only) and show them.
    async loadAllLinks() {
      $("all-links-button").disabled = true;
      try {
        const { data } = await api("GET", `/api/graphs/${encodeURIComponent(this.name)}/links`);
        this.graph.replaceLinks(data.links);
        this.allLinks = true;
        this.canvas.linksChanged();
        this.applyView();
        this.renderSubgraph();
        this.updateAllLinksButton();
      } catch (error) {
        this.notify(`Could not load all links: ${error.message}`, "error");
      } finally {
        $("all-links-button").disabled = false;
      }
    }

    // ------------------------------------------------------------ node panel

    // The selected node's facts, label, pin button, logit lens, intervention, feature dashboard and edges;
    // with no node selected, the dashboard of a feature found by search that the graph lacks, or a
    // supernode's members and intervention.
    renderPanel() {
      const i = this.graph.index.get(this.state.clicked);
      const browsed = i === undefined ? this.browsedFeature : null;
      const group = i === undefined && browsed === null ? this.shownGroup() : null;
      const nothing = i === undefined && browsed === null && group === null;
      $("panel-empty").hidden = !nothing;
      $("panel-body").hidden = nothing;
      $("node-details").hidden = i === undefined;
      $("node-edges").hidden = i === undefined;
      $("supernode-details").hidden = group === null;
      this.heads.followNode(this.state.clicked);
      if (i === undefined) {
        this.panelNode = undefined;
        this.dashboard.show(browsed && { ...browsed, activation: NaN, inGraph: false });
        this.interventions.show(group && this.groupTarget(group));
        if (this.persona) this.persona.showNode(null);
        if (group) this.renderSupernode(group);
        return;
      }
      const g = this.graph;
      const node = g.nodes[i];
      const label = $("node-label");
      if (this.panelNode !== i || document.activeElement !== label) label.value = this.editableLabel(i);
      this.panelNode = i;
      let kind = KIND_NAMES[g.kind[i]];
      if (g.kind[i] === KIND.FEATURE) kind += ` #${g.featureIndex(i)}`;
      if (g.kind[i] === KIND.TARGET) {
        kind += ` \u00b7 p=${formatNumber(node.token_prob)}${node.is_target_logit ? " (top target)" : ""}`;
      }
      $("node-kind").textContent = kind;
      $("node-layer").textContent = this.layerName(i);
      $("node-position").textContent = this.positionName(i);
      $("node-id").textContent = g.ids[i];
      $("node-activation").textContent = formatNumber(g.activation[i]);
      $("node-influence").textContent = Number.isNaN(g.influence[i])
        ? "\u2014 (always shown)"
        : `${formatNumber(g.influence[i])} (share above it; smaller = more influential)`;
      $("pin-button").textContent = this.state.pinned.includes(g.ids[i]) ? "Unpin (P)" : "Pin (P)";
      this.renderLens(i);
      this.interventions.show(this.nodeTarget(i));
      if (this.persona) {
        this.persona.showNode({ id: g.ids[i], layer: g.kind[i] === KIND.FEATURE ? g.layer[i] : null });
      }
      this.renderDashboard(i);
      this.renderEdges(i, "incoming");
      this.renderEdges(i, "outgoing");
    }

    // Incoming or outgoing edges of node i by |weight|, each as its signed share of the target's input.
    renderEdges(i, direction) {
      const g = this.graph;
      const links = g.sortedLinks(direction === "incoming" ? g.incoming : g.outgoing, i);
      $(`${direction}-count`).textContent = `(${links.length.toLocaleString("en-US")})`;
      const shown = this.shownAll[direction] ? links : links.slice(0, EDGE_ROWS);
      const other = (e) => (direction === "incoming" ? g.src[e] : g.dst[e]);
      const rows = shown.map((e) => this.edgeRow(e, other(e)));
      if (!links.length) rows.push(el("li", { class: "empty" }, [`no ${direction} edges`]));
      if (shown.length < links.length) {
        const all = `show all ${links.length.toLocaleString("en-US")}`;
        const more = el("button", { type: "button", class: "more" }, [all]);
        more.addEventListener("click", () => {
          this.shownAll[direction] = true;
          this.renderEdges(i, direction);
        });
        rows.push(el("li", {}, [more]));
      }
      $(`${direction}-edges`).replaceChildren(...rows);
    }

    // One edge's row: its button, and for a cross-position edge whose heads can be shown, a button that shows
    // them.
    edgeRow(e, other) {
      const g = this.graph;
      const row = el("li", {}, [this.edgeButton(e, other)]);
      const [source, target] = [g.ids[g.src[e]], g.ids[g.dst[e]]];
      if (g.pos[g.src[e]] === g.pos[g.dst[e]] || !this.heads.canShow(source, target)) return row;
      const props = {
        type: "button",
        class: `edge-heads${this.heads.isShown(source, target) ? " selected" : ""}`,
        title: "The attention heads that carry this edge between positions",
        data: { testid: "edge-heads", nodeId: g.ids[other] },
      };
      const button = el("button", props, ["heads"]);
      button.addEventListener("click", () => this.showEdgeHeads(e));
      row.append(button);
      return row;
    }

    // Show the heads that carry edge e, and mark its rows.
    showEdgeHeads(e) {
      const g = this.graph;
      const [s, t] = [g.src[e], g.dst[e]];
      const edge = { source: g.ids[s], target: g.ids[t], sourcePos: g.pos[s], targetPos: g.pos[t] };
      this.heads.showEdge(Object.assign(edge, { weight: g.weight[e] }));
      const i = this.graph.index.get(this.state.clicked);
      this.renderEdges(i, "incoming");
      this.renderEdges(i, "outgoing");
    }

    // One edge row: signed share of the target's input, the other node's label and place; selects it.
    edgeButton(e, other) {
      const g = this.graph;
      const total = g.inputTotal[g.dst[e]];
      const share = total > 0 ? g.weight[e] / total : 0;
      const props = { type: "button", class: "edge", title: `weight ${g.weight[e].toPrecision(4)}` };
      const button = el("button", Object.assign(props, { data: { testid: "edge", nodeId: g.ids[other] } }), [
        el("span", { class: `share ${g.weight[e] >= 0 ? "positive" : "negative"}` }, [cm.formatShare(share)]),
        el("span", { class: "edge-label" }, [this.displayName(other)]),
        el("span", { class: "edge-where" }, [`${this.shortLayer(other)} \u00b7 ${g.pos[other]}`]),
      ]);
      button.addEventListener("click", () => this.select(other));
      return button;
    }

    // Logit lens of a feature, as stored in the document when the graph was computed (the feature dashboard
    // shows the database's instead, when there is one).
    renderLens(i) {
      const g = this.graph;
      const section = $("lens-section");
      section.hidden = g.kind[i] !== KIND.FEATURE || this.dashboard.available;
      if (section.hidden) return;
      const lens = g.nodes[i].lens;
      $("lens-body").replaceChildren(
        lens
          ? lensTable(lens)
          : el("p", { class: "empty" }, ["not available: this graph was saved without its logit lens."]),
      );
    }

    // The feature dashboard of node i (fetched in the background), or none for other kinds.
    renderDashboard(i) {
      const g = this.graph;
      const feature = g.kind[i] === KIND.FEATURE ? g.featureIndex(i) : null;
      if (feature === null) return this.dashboard.show(null);
      const lens = g.nodes[i].lens;
      this.dashboard.show({ layer: g.layer[i], feature, activation: g.activation[i], inGraph: true, lens });
    }

    // ------------------------------------------------------------ interventions and shown supernodes

    // What the intervention control edits for node i: the feature itself; none for other kinds.
    nodeTarget(i) {
      const g = this.graph;
      if (g.kind[i] !== KIND.FEATURE) return null;
      return { key: g.ids[i], title: this.displayName(i), ids: [g.ids[i]], skipped: 0, name: null };
    }

    // What the intervention control edits for a supernode: its feature members, under its label.
    groupTarget(group) {
      const ids = group.ids.filter((id) => this.graph.kind[this.graph.index.get(id)] === KIND.FEATURE);
      const skipped = group.ids.length - ids.length;
      return { key: `super:${group.ids.join(",")}`, title: group.label, ids, skipped, name: group.label };
    }

    // The supernode shown in the panel, found by its members (a rename or another group's change keeps it).
    shownGroup() {
      if (this.shownSupernode === null) return null;
      const items = this.subgraphItems();
      return items.find((item) => item.isSuper && item.ids.join(",") === this.shownSupernode) || null;
    }

    // Show a supernode in the panel instead of a node.
    showSupernode(item) {
      this.select(-1);
      this.shownSupernode = item.ids.join(",");
      this.renderPanel();
      this.renderSubgraph();
    }

    // The shown supernode's label and members (each selects its node).
    renderSupernode(group) {
      $("supernode-title").textContent = `\u201c${group.label}\u201d`;
      $("supernode-count").textContent = `(${group.ids.length} nodes)`;
      $("supernode-members").replaceChildren(...group.ids.map((id) => el("li", {}, [this.nodeButton(id)])));
    }

    // ------------------------------------------------------------ features of the database

    // Node indices of a feature (layer, index) in this graph, one per position.
    nodesOfFeature(layer, feature) {
      if (!this.featureNodes) {
        const g = this.graph;
        this.featureNodes = new Map();
        for (let i = 0; i < g.n; i++) {
          const index = g.kind[i] === KIND.FEATURE ? g.featureIndex(i) : null;
          if (index === null) continue;
          const key = `${g.layer[i]}_${index}`;
          if (!this.featureNodes.has(key)) this.featureNodes.set(key, []);
          this.featureNodes.get(key).push(i);
        }
      }
      return this.featureNodes.get(`${layer}_${feature}`) || [];
    }

    // Show a feature found by search: select its most active node when the graph has it.
    openFeature(layer, feature) {
      const nodes = this.nodesOfFeature(layer, feature);
      if (nodes.length) {
        const activation = this.graph.activation;
        this.select(nodes.reduce((best, i) => (activation[i] > activation[best] ? i : best)));
        return;
      }
      this.select(-1);
      this.browsedFeature = { layer, feature };
      this.renderPanel();
    }

    // A feature's label changed in the database: the graph's nodes of it that show the database's label (or
    // no label) show the new one.
    featureLabelSaved(layer, feature, label) {
      for (const i of this.nodesOfFeature(layer, feature)) {
        const node = this.graph.nodes[i];
        if (node.clerp && !node.label_source) continue;
        node.clerp = label ? label.text : "";
        if (label) node.label_source = label.source;
        else delete node.label_source;
      }
      this.withoutUnchangedLabels(this.state);
      this.tipNode = -1;
      this.renderPanel();
      this.renderSubgraph();
      this.updateSaveStatus();
    }

    // ------------------------------------------------------------ pins, supernodes and the subgraph pane

    // The pane's items: supernodes, then pinned nodes outside any supernode.
    subgraphItems() {
      const grouped = new Set(this.state.supernodes.flatMap((group) => group.slice(1)));
      const supers = this.state.supernodes.map((group, k) => {
        return { key: `super:${k}`, label: group[0], ids: group.slice(1), isSuper: true };
      });
      const singles = this.state.pinned
        .filter((id) => !grouped.has(id))
        .map((id) => ({ key: id, label: this.displayName(this.graph.index.get(id)), ids: [id], isSuper: false }));
      return [...supers, ...singles];
    }

    // Pin or unpin node `id` (unpinning removes it from its supernode, and drops an emptied one).
    togglePin(id) {
      if (!id) return;
      if (this.state.pinned.includes(id)) this.unpin([id]);
      else this.state.pinned.push(id);
      this.pinsChanged();
    }

    // Unpin ids, taking them out of their supernodes.
    unpin(ids) {
      const gone = new Set(ids);
      this.state.pinned = this.state.pinned.filter((id) => !gone.has(id));
      this.state.supernodes = this.state.supernodes
        .map((group) => [group[0], ...group.slice(1).filter((id) => !gone.has(id))])
        .filter((group) => group.length > 1);
    }

    // Pins or groups changed: redraw marks, pane and scores; clear the pane's checks.
    pinsChanged() {
      this.checked.clear();
      this.applyMarks();
      this.renderSubgraph();
      this.updateScores();
      this.stateChanged();
    }

    // The checked items of the pane.
    checkedItems() {
      return this.subgraphItems().filter((item) => this.checked.has(item.key));
    }

    // Group the checked items (nodes and supernodes) into one new supernode, after asking for its label.
    async group() {
      const items = this.checkedItems();
      const members = items.flatMap((item) => item.ids);
      if (members.length < 2) return;
      const suggestion = items.find((item) => item.isSuper)?.label || "";
      const label = await ask(`Label for the supernode of ${members.length} nodes`, suggestion, needsText);
      if (label === null) return;
      const merged = new Set(items.filter((item) => item.isSuper).map((item) => item.key));
      this.state.supernodes = this.state.supernodes.filter((_, k) => !merged.has(`super:${k}`));
      this.state.supernodes.push([label, ...members]);
      this.pinsChanged();
    }

    // Dissolve the checked supernodes; their members stay pinned.
    ungroup() {
      const dissolved = new Set(this.checkedItems().filter((item) => item.isSuper).map((item) => item.key));
      this.state.supernodes = this.state.supernodes.filter((_, k) => !dissolved.has(`super:${k}`));
      this.pinsChanged();
    }

    // Rename the one checked supernode.
    async renameSupernode() {
      const item = this.checkedItems().find((candidate) => candidate.isSuper);
      if (!item) return;
      const label = await ask("New label for the supernode", item.label, needsText);
      if (label === null) return;
      this.state.supernodes[Number(item.key.slice("super:".length))][0] = label;
      this.pinsChanged();
    }

    // Unpin every checked item (supernodes with all their members).
    unpinChecked() {
      this.unpin(this.checkedItems().flatMap((item) => item.ids));
      this.pinsChanged();
    }

    // A click in the drawing: Shift/Ctrl/Cmd or a supernode toggles the item's check; a node is selected.
    onSubgraphClick(item, event) {
      if (event.shiftKey || event.ctrlKey || event.metaKey || item.isSuper) this.toggleChecked(item.key);
      else this.select(this.graph.index.get(item.ids[0]));
    }

    // Check or uncheck an item.
    toggleChecked(key) {
      if (this.checked.has(key)) this.checked.delete(key);
      else this.checked.add(key);
      this.renderSubgraph();
    }

    // The pane: the item list with checkboxes, the drawing, and the action buttons' states.
    renderSubgraph() {
      const items = this.subgraphItems();
      $("pinned-list").replaceChildren(...items.map((item) => this.pinnedRow(item)));
      $("subgraph-empty").hidden = items.length > 0;
      $("subgraph-svg").style.display = items.length ? "" : "none";
      this.subgraph.render(this.graph, items, this.checked, this.state.clicked);
      const checked = this.checkedItems();
      const supers = checked.filter((item) => item.isSuper).length;
      $("group-button").disabled = checked.flatMap((item) => item.ids).length < 2;
      $("ungroup-button").disabled = supers === 0;
      $("rename-button").disabled = supers !== 1;
      $("unpin-button").disabled = checked.length === 0;
      this.renderGrouped();
    }

    // One row of the pinned list: checkbox, label (selects a node), and a supernode's members.
    pinnedRow(item) {
      const check = { type: "checkbox", checked: this.checked.has(item.key), data: { testid: "pinned-check" } };
      const box = el("input", check);
      box.addEventListener("change", () => this.toggleChecked(item.key));
      const name = item.isSuper ? this.supernodeButton(item) : this.nodeButton(item.ids[0]);
      const props = { class: item.isSuper ? "super" : "", data: { testid: "pinned-item", key: item.key } };
      const row = el("li", props, [box, name]);
      if (item.isSuper) row.append(el("div", { class: "members" }, item.ids.map((id) => this.nodeButton(id))));
      return row;
    }

    // A button naming a supernode that shows it in the panel.
    supernodeButton(item) {
      const shown = this.state.clicked === "" && item.ids.join(",") === this.shownSupernode;
      const props = {
        type: "button",
        class: `node-link super-label${shown ? " selected" : ""}`,
        title: "Show this supernode in the panel",
        data: { testid: "supernode-label" },
      };
      const button = el("button", props, [item.label]);
      button.addEventListener("click", () => this.showSupernode(item));
      return button;
    }

    // A button naming node `id` that selects it.
    nodeButton(id) {
      const i = this.graph.index.get(id);
      const selected = id === this.state.clicked ? " selected" : "";
      const props = { type: "button", class: `node-link${selected}`, title: id };
      const button = el("button", props, [this.displayName(i)]);
      button.addEventListener("click", () => this.select(i));
      return button;
    }

    // Scores of the pinned subgraph: from the server (exact when it has the full graph), else computed here.
    updateScores() {
      const round = ++this.scoreRound;
      const { pinned, supernodes } = this.state;
      const local = (note) => this.showScores(this.graph.subgraphScores(pinned), DOCUMENT_EDGES, note);
      clearTimeout(this.scoreTimer);
      if (this.exported) return local("");
      $("score-basis").textContent = "computing\u2026";
      this.scoreTimer = setTimeout(async () => {
        const body = { pinnedIds: pinned.slice(), supernodes: supernodes.map((group) => group.slice()) };
        try {
          const { data } = await api("POST", `/api/graphs/${encodeURIComponent(this.name)}/scores`, body);
          if (round === this.scoreRound) this.showScores(data, data.exact ? "exact" : DOCUMENT_EDGES, "");
        } catch (error) {
          if (round === this.scoreRound) local(`the server could not score this subgraph: ${error.message}`);
        }
      }, SCORE_DELAY_MS);
    }

    // Write scores into the pane (full precision kept in data-value for tests); `note` explains a fallback.
    showScores(scores, basis, note) {
      for (const key of ["replacement", "completeness"]) {
        const value = scores[key];
        const cell = $(`score-${key}`);
        cell.textContent = formatNumber(value);
        cell.dataset.value = typeof value === "number" ? String(value) : "null";
      }
      $("score-basis").textContent = basis;
      $("score-basis").title = note;
    }
  }

  // The state fields whose change means "unsaved" (the selection alone does not).
  function dirtyKey(state) {
    const form = cm.savedForm(state);
    delete form.clickedId;
    return JSON.stringify(form);
  }

  // A target's clerp around `label`, as the server writes it: `Output "<label>" (p=<token_prob>)`.
  function targetClerp(label, probability) {
    const p = typeof probability === "number" ? pythonFixed3(probability) : formatNumber(probability);
    return `Output "${label}" (p=${p})`;
  }

  // `value` with 3 decimals as Python's `:.3f` writes it: exact halves (odd sixteenths, the only ones a
  // binary number holds) go to the even digit, where toFixed rounds them up.
  function pythonFixed3(value) {
    const sixteenths = value * 16;
    if (!Number.isInteger(sixteenths) || sixteenths % 2 === 0) return value.toFixed(3);
    const low = Math.floor(value * 1000);
    return ((low % 2 === 0 ? low : low + 1) / 1000).toFixed(3);
  }

  // Dialog check: a label must not be empty.
  function needsText(text) {
    return text ? "" : "Type a label.";
  }

  // A two-column table of the tokens a feature promotes (top) and suppresses (bottom).
  function lensTable(lens) {
    const entry = ([token, value]) =>
      el("li", {}, [
        el("code", {}, [cm.visibleToken(token)]),
        el("span", { class: "value" }, [formatNumber(Number(value), 2)]),
      ]);
    const column = (title, entries, kind) =>
      el("div", { class: `lens-column ${kind}` }, [
        el("h4", {}, [title]),
        el("ol", {}, (entries || []).map(entry)),
      ]);
    return el("div", { class: "lens", data: { testid: "lens" } }, [
      column("promotes", lens.top, "positive"),
      column("suppresses", lens.bottom, "negative"),
    ]);
  }

  // ---------------------------------------------------------------- start-up

  // Fetch a graph document and its revision (the ETag, without quotes).
  async function loadGraph(name) {
    const { data, response } = await api("GET", `/api/graphs/${encodeURIComponent(name)}`);
    const tag = response.headers.get("ETag") || "";
    return { doc: data, revision: tag.replace(/^W\//, "").replace(/^"(.*)"$/, "$1") };
  }

  // Decide what to show: the embedded document (exported page), a served graph, or the list.
  async function boot() {
    setUpDialog();
    $("message-close").addEventListener("click", hideMessage);
    const embedded = $("circuitmap-document");
    if (embedded) {
      $("footer").textContent = "Exported from circuitmap: a read-only snapshot that works offline.";
      const doc = JSON.parse(embedded.textContent);
      const config = { read_only: true, can_compute: false };
      new Explorer({ doc, name: null, revision: null, config, exported: true }).start();
      return;
    }
    const config = (await api("GET", "/api/config")).data;
    $("footer").textContent = `circuitmap ${config.version || ""}${config.read_only ? " \u00b7 read-only" : ""}`;
    const match = location.pathname.match(/^\/graph\/(.+)$/);
    if (!match) {
      await new cm.GraphList(config).start();
      return;
    }
    const name = decodeURIComponent(match[1]);
    let loaded;
    try {
      loaded = await loadGraph(name);
    } catch (error) {
      showHomeLink();
      throw new Error(`Could not open the graph \u201c${name}\u201d: ${error.message}`);
    }
    new Explorer({ doc: loaded.doc, name, revision: loaded.revision, config, exported: false }).start();
  }

  boot().catch((error) => {
    $("loading").textContent = "";
    showMessage(error.message);
  });
})((window.Circuitmap = window.Circuitmap || {}));

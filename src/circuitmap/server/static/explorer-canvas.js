"use strict";
// The link graph on two stacked canvases: a base canvas with the shown nodes, the labels of the most
// influential features and the shown links (only the strong ones when links are many, so that the drawing
// never turns into a solid fan), redrawn only when the view or the filters change, and an overlay with the
// header bands, highlights, rings and every shown link of the hovered and selected nodes, redrawn on hover
// and selection. Positions run across (one column per prompt token), layers up.
(function (cm) {
  const { KIND } = cm;
  const EDGE_RGB = { positive: "37, 99, 235", negative: "224, 82, 33" };
  const NODE_COLORS = ["#0f766e", "#9ca3af", "#475569", "#7c3aed"];
  const SHARE_BUCKETS = [0.02, 0.08, 0.25];
  const BUCKET_WIDTHS = [1, 1, 2, 3];
  const BUCKET_ALPHAS = [0.12, 0.25, 0.35, 0.5];
  const STRONG_BUCKET = 2;
  const DENSE_LINKS = 20000;
  const MIN_LINK_PX = 1.5;
  const HEADER = 34;
  const GUTTER = 44;
  const PAD = 14;
  const CELL_FILL = 0.8;
  const SLOW_DRAW_MS = 12;
  const CHEAP_LINKS = 4000;
  const SETTLE_MS = 140;
  const MIN_GLYPH_PX = 2;
  const ALL_LINKS_UP_TO = 3000;
  const BASE_BUCKET = 2;
  const LABELS = 40;
  const LABEL_CHARS = 24;
  const LABEL_ROOM_PX = 56;
  const MANY_PINS = 100;

  class GraphCanvas {
    // Builds both canvases inside `container`; `handlers` get onHover(i, clientX, clientY) and onSelect(i),
    // and `labelOf(i)` gives the label drawn beside a feature ("" for none).
    constructor(container, graph, handlers) {
      this.container = container;
      this.graph = graph;
      this.handlers = handlers;
      this.base = this.makeCanvas("graph-base");
      this.overlay = this.makeCanvas("graph-overlay");
      this.baseCtx = this.base.getContext("2d", { alpha: false });
      this.overlayCtx = this.overlay.getContext("2d");
      this.nodeVisible = new Uint8Array(graph.n).fill(1);
      this.selected = -1;
      this.hovered = -1;
      this.pinned = new Set();
      this.lastBaseMs = 0;
      this.bucket = this.linkBuckets();
      this.tokenNames = Array.from({ length: graph.nPositions }, (_, p) => visibleToken(graph.tokens[p]));
      this.headers = { width: NaN, texts: new Map() };
      this.setLinks(new Int32Array(graph.m).map((_, e) => e));
      this.measure();
      this.layout();
      this.fit();
      this.listen();
      new ResizeObserver(() => this.onResize()).observe(container);
    }

    // A canvas element filling the container, with a test id.
    makeCanvas(testId) {
      const canvas = document.createElement("canvas");
      canvas.dataset.testid = testId;
      canvas.className = testId;
      this.container.appendChild(canvas);
      return canvas;
    }

    // Width bucket of every link, from its share of the target's input.
    linkBuckets() {
      const bucket = new Uint8Array(this.graph.m);
      for (let e = 0; e < this.graph.m; e++) {
        let b = 0;
        while (b < SHARE_BUCKETS.length && this.graph.share[e] >= SHARE_BUCKETS[b]) b++;
        bucket[e] = b;
      }
      return bucket;
    }

    // The shown links; those the base draws (all of them up to ALL_LINKS_UP_TO, else the strong ones)
    // split once into (width bucket, sign) batches, each drawn as one path.
    setLinks(linkIndices) {
      const drawn =
        linkIndices.length <= ALL_LINKS_UP_TO ? linkIndices : linkIndices.filter((e) => this.bucket[e] >= BASE_BUCKET);
      const counts = new Int32Array(BUCKET_WIDTHS.length * 2);
      const batchOf = (e) => this.bucket[e] * 2 + (this.graph.weight[e] >= 0 ? 1 : 0);
      for (const e of drawn) counts[batchOf(e)]++;
      this.batches = Array.from(counts, (count) => ({ links: new Int32Array(count), size: 0 }));
      for (const e of drawn) {
        const batch = this.batches[batchOf(e)];
        batch.links[batch.size++] = e;
      }
      this.shownLinks = new Uint8Array(this.graph.m);
      for (const e of linkIndices) this.shownLinks[e] = 1;
      this.shownCount = drawn.length;
      this.thinned = drawn.length < linkIndices.length;
    }

    // The graph's links were replaced (all of them fetched): new widths; the caller sets visibility again.
    linksChanged() {
      this.bucket = this.linkBuckets();
      this.setLinks(new Int32Array(0));
    }

    // Apply new filters: which nodes and links are shown.
    setVisibility(nodeVisible, linkIndices) {
      this.nodeVisible = nodeVisible;
      this.setLinks(linkIndices);
      if (this.hovered >= 0 && !nodeVisible[this.hovered]) this.hovered = -1;
      this.requestDraw(true);
    }

    // Update the overlay's marks: the selected node (-1 for none) and the set of pinned ids.
    setMarks(selected, pinned) {
      this.selected = selected;
      this.pinned = pinned;
      this.requestDraw(false);
    }

    // Canvas size in CSS pixels and the device pixel ratio; backing stores sized to match.
    measure() {
      const rect = this.container.getBoundingClientRect();
      this.width = Math.max(1, Math.round(rect.width));
      this.height = Math.max(1, Math.round(rect.height));
      this.dpr = window.devicePixelRatio || 1;
      for (const canvas of [this.base, this.overlay]) {
        canvas.width = Math.round(this.width * this.dpr);
        canvas.height = Math.round(this.height * this.dpr);
        canvas.style.width = `${this.width}px`;
        canvas.style.height = `${this.height}px`;
      }
    }

    // World positions: cell (position, row) is the unit square at (pos, nRows - 1 - row); the nodes of a
    // cell fill a small grid inside it, most influential first, shaped to the cell's on-screen aspect.
    layout() {
      const g = this.graph;
      const cells = new Map();
      for (let i = 0; i < g.n; i++) {
        const key = g.row[i] * g.nPositions + g.pos[i];
        if (!cells.has(key)) cells.set(key, []);
        cells.get(key).push(i);
      }
      const fit = this.fitScales();
      const aspect = fit.sx / fit.sy;
      this.x = new Float64Array(g.n);
      this.y = new Float64Array(g.n);
      this.slot = new Float64Array(g.n);
      this.cells = cells;
      for (const members of cells.values()) {
        members.sort((a, b) => g.kind[a] - g.kind[b] || rank(g.influence[a]) - rank(g.influence[b]));
        const columns = Math.max(1, Math.ceil(Math.sqrt(members.length * aspect)));
        const rows = Math.ceil(members.length / columns);
        members.forEach((i, j) => {
          const margin = (1 - CELL_FILL) / 2;
          this.x[i] = g.pos[i] + margin + (CELL_FILL * ((j % columns) + 0.5)) / columns;
          this.y[i] = g.nRows - 1 - g.row[i] + margin + (CELL_FILL * (Math.floor(j / columns) + 0.5)) / rows;
          this.slot[i] = Math.min((CELL_FILL * fit.sx) / columns, (CELL_FILL * fit.sy) / rows) / fit.sx;
        });
      }
      this.baseRadius = new Float64Array(g.n);
      for (let i = 0; i < g.n; i++) this.baseRadius[i] = nodeRadius(g.kind[i], g.influence[i]);
    }

    // Scales that fit the whole grid in the canvas, leaving room for the header and gutter bands.
    fitScales() {
      const g = this.graph;
      return {
        sx: Math.max(1, this.width - GUTTER - 2 * PAD) / g.nPositions,
        sy: Math.max(1, this.height - HEADER - 2 * PAD) / g.nRows,
      };
    }

    // Show the whole graph.
    fit() {
      const scales = this.fitScales();
      this.fitSx = scales.sx;
      this.view = { sx: scales.sx, sy: scales.sy, tx: GUTTER + PAD, ty: HEADER + PAD };
      this.atFit = true;
      this.requestDraw(true);
    }

    // Keep the drawing matched to the container's size (refit unless the user has zoomed or panned).
    onResize() {
      const rect = this.container.getBoundingClientRect();
      if (Math.round(rect.width) === this.width && Math.round(rect.height) === this.height) return;
      this.measure();
      if (this.atFit) this.fit();
      else this.requestDraw(true);
    }

    // Node i's on-screen radius: its base radius grown gently with zoom, held inside its cell slot.
    radius(i) {
      const zoom = Math.min(3, Math.max(0.5, Math.sqrt(this.view.sx / this.fitSx)));
      const room = Math.max(2.5, (this.slot[i] * this.view.sx) / 2);
      return Math.min(this.baseRadius[i] * zoom, room);
    }

    // Node i's position in canvas CSS pixels under the current view.
    screenX(i) {
      return this.view.tx + this.x[i] * this.view.sx;
    }

    screenY(i) {
      return this.view.ty + this.y[i] * this.view.sy;
    }

    // Node position in viewport CSS pixels (for tests driving the mouse), or null for an unknown id.
    nodeScreenPosition(id) {
      const i = this.graph.index.get(id);
      if (i === undefined) return null;
      const rect = this.container.getBoundingClientRect();
      return { x: rect.left + this.screenX(i), y: rect.top + this.screenY(i) };
    }

    // Schedule a redraw on the next animation frame (the base too when `base`); repeated calls coalesce.
    requestDraw(base) {
      this.pendingBase = this.pendingBase || base;
      if (this.frame) return;
      this.frame = requestAnimationFrame(() => {
        this.frame = 0;
        if (this.pendingBase) this.drawBase();
        this.pendingBase = false;
        this.drawOverlay();
      });
    }

    // Redraw now (used for the first paint, so that it can be timed).
    drawNow() {
      if (this.frame) cancelAnimationFrame(this.frame);
      this.frame = 0;
      this.pendingBase = false;
      this.drawBase();
      this.drawOverlay();
    }

    // The view moved: redraw right away when the base is cheap, else move its last image with a CSS
    // transform (free) and redraw it once the view settles. Recording time alone does not tell the cost:
    // the browser rasterises the links later, so many links count as expensive too.
    viewChanged() {
      this.atFit = false;
      if (this.lastBaseMs < SLOW_DRAW_MS && this.shownCount < CHEAP_LINKS) {
        this.requestDraw(true);
        return;
      }
      const drawn = this.drawnView;
      const a = this.view.sx / drawn.sx;
      const d = this.view.sy / drawn.sy;
      const e = this.view.tx - drawn.tx * a;
      const f = this.view.ty - drawn.ty * d;
      this.base.style.transform = `matrix(${a}, 0, 0, ${d}, ${e}, ${f})`;
      this.requestDraw(false);
      clearTimeout(this.settle);
      this.settle = setTimeout(() => this.requestDraw(true), SETTLE_MS);
    }

    // The base image: every shown link batched by (width, sign), then the shown nodes batched by kind.
    drawBase() {
      const start = performance.now();
      const ctx = this.baseCtx;
      ctx.setTransform(this.dpr, 0, 0, this.dpr, 0, 0);
      ctx.fillStyle = "#ffffff";
      ctx.fillRect(0, 0, this.width, this.height);
      const sx = new Float32Array(this.graph.n);
      const sy = new Float32Array(this.graph.n);
      for (let i = 0; i < this.graph.n; i++) {
        sx[i] = this.screenX(i);
        sy[i] = this.screenY(i);
      }
      this.drawLinkBatches(ctx, sx, sy);
      this.drawNodes(ctx, sx, sy);
      this.drawLabels(ctx, sx, sy);
      this.base.style.transform = "";
      this.drawnView = Object.assign({}, this.view);
      this.lastBaseMs = performance.now() - start;
    }

    // Stroke each batch of links as one path of one-device-pixel hairlines, faint batches first, all
    // fainter when links are many (so that dense graphs do not turn solid; the strongest batch fades
    // least). Hairlines rasterise many times faster than wider strokes, so a wide batch is drawn as
    // parallel hairline copies side by side. Level of detail: links wholly off one side of the canvas, and
    // links too short to see at this zoom (hidden under their nodes), are skipped.
    drawLinkBatches(ctx, sx, sy) {
      const { src, dst } = this.graph;
      const w = this.width;
      const h = this.height;
      const fade = Math.min(1, DENSE_LINKS / Math.max(1, this.shownCount));
      const step = 1 / this.dpr;
      ctx.lineWidth = step;
      for (let b = 0; b < BUCKET_WIDTHS.length; b++) {
        const copies = Math.max(1, Math.round(BUCKET_WIDTHS[b] * this.dpr));
        for (const positive of [0, 1]) {
          const batch = this.batches[b * 2 + positive];
          if (!batch.size) continue;
          ctx.beginPath();
          for (let k = 0; k < batch.size; k++) {
            const e = batch.links[k];
            const x1 = sx[src[e]];
            const y1 = sy[src[e]];
            const x2 = sx[dst[e]];
            const y2 = sy[dst[e]];
            if ((x1 < 0 && x2 < 0) || (x1 > w && x2 > w) || (y1 < 0 && y2 < 0) || (y1 > h && y2 > h)) continue;
            const length = Math.hypot(x2 - x1, y2 - y1);
            if (length < MIN_LINK_PX) continue;
            if (copies === 1) {
              ctx.moveTo(x1, y1);
              ctx.lineTo(x2, y2);
              continue;
            }
            const nx = ((y1 - y2) / length) * step;
            const ny = ((x2 - x1) / length) * step;
            for (let c = 0; c < copies; c++) {
              const offset = c - (copies - 1) / 2;
              ctx.moveTo(x1 + nx * offset, y1 + ny * offset);
              ctx.lineTo(x2 + nx * offset, y2 + ny * offset);
            }
          }
          const rgb = positive ? EDGE_RGB.positive : EDGE_RGB.negative;
          const alpha = BUCKET_ALPHAS[b] * (b === BUCKET_WIDTHS.length - 1 ? Math.sqrt(fade) : fade);
          ctx.strokeStyle = `rgba(${rgb}, ${alpha})`;
          ctx.stroke();
        }
      }
    }

    // Fill the shown nodes, one path per kind: features circles, errors diamonds, tokens and targets boxes.
    drawNodes(ctx, sx, sy) {
      const paths = NODE_COLORS.map(() => new Path2D());
      for (let i = 0; i < this.graph.n; i++) {
        if (!this.nodeVisible[i]) continue;
        const x = sx[i];
        const y = sy[i];
        if (x < -20 || y < -20 || x > this.width + 20 || y > this.height + 20) continue;
        addShape(paths[this.graph.kind[i]], this.graph.kind[i], x, y, this.radius(i));
      }
      ctx.lineWidth = 0.75;
      ctx.strokeStyle = "rgba(255, 255, 255, 0.9)";
      paths.forEach((path, kind) => {
        ctx.fillStyle = NODE_COLORS[kind];
        ctx.fill(path);
        if (kind !== KIND.FEATURE) ctx.stroke(path);
      });
    }

    // Beside the LABELS most influential shown features that have a label, that label, where the node's
    // slot leaves room for it at this zoom and it overlaps neither another label nor the canvas edge.
    drawLabels(ctx, sx, sy) {
      const labelOf = this.handlers.labelOf;
      if (!labelOf) return;
      const g = this.graph;
      const candidates = [];
      for (let i = 0; i < g.n; i++) {
        if (this.nodeVisible[i] && g.kind[i] === KIND.FEATURE) candidates.push(i);
      }
      candidates.sort((a, b) => rank(g.influence[a]) - rank(g.influence[b]));
      ctx.font = "10px system-ui, sans-serif";
      ctx.textBaseline = "middle";
      ctx.lineJoin = "round";
      const taken = [];
      let drawn = 0;
      for (const i of candidates) {
        if (drawn >= LABELS) break;
        if (this.slot[i] * this.view.sx < LABEL_ROOM_PX) continue;
        const label = labelOf(i);
        if (!label) continue;
        const text = label.length > LABEL_CHARS ? `${label.slice(0, LABEL_CHARS - 1)}\u2026` : label;
        const x = sx[i] + this.radius(i) + 3;
        const y = sy[i];
        const box = { left: x, right: x + ctx.measureText(text).width, top: y - 6, bottom: y + 6 };
        if (box.left < 0 || box.right > this.width || box.top < HEADER || box.bottom > this.height) continue;
        if (taken.some((t) => box.left < t.right && t.left < box.right && box.top < t.bottom && t.top < box.bottom)) {
          continue;
        }
        taken.push(box);
        ctx.lineWidth = 3;
        ctx.strokeStyle = "rgba(255, 255, 255, 0.9)";
        ctx.strokeText(text, x, y);
        ctx.fillStyle = "#1f2937";
        ctx.fillText(text, x, y);
        drawn++;
      }
      this.labelsDrawn = drawn;
    }

    // The overlay: a veil and the selected node's links, the hovered node's links, rings, then the bands.
    drawOverlay() {
      const ctx = this.overlayCtx;
      ctx.setTransform(this.dpr, 0, 0, this.dpr, 0, 0);
      ctx.clearRect(0, 0, this.width, this.height);
      if (this.selected >= 0) {
        ctx.fillStyle = "rgba(255, 255, 255, 0.62)";
        ctx.fillRect(0, 0, this.width, this.height);
        this.drawNodeLinks(ctx, this.selected, 1);
      }
      if (this.hovered >= 0 && this.hovered !== this.selected) this.drawNodeLinks(ctx, this.hovered, 0.75);
      const many = this.pinned.size > MANY_PINS;
      for (const id of this.pinned) {
        this.ring(ctx, this.graph.index.get(id), many ? "rgba(217, 119, 6, 0.35)" : "#d97706", many ? 1 : 2);
      }
      this.ring(ctx, this.selected, "#111827", 2.5);
      this.ring(ctx, this.hovered, "#111827", 1.25);
      this.drawBands(ctx);
    }

    // Node i's shown links, sized by share, with the nodes at their other ends redrawn on top. Weak links
    // go into one hairline path per sign; strong ones are stroked one by one, wide (a few wide single
    // lines rasterise fast, one path of many wide lines would not).
    drawNodeLinks(ctx, i, alpha) {
      const g = this.graph;
      const ends = NODE_COLORS.map(() => new Path2D());
      const hairlines = [new Path2D(), new Path2D()];
      const addEnd = (j) => {
        addShape(ends[g.kind[j]], g.kind[j], this.screenX(j), this.screenY(j), this.radius(j));
      };
      for (const adjacent of [g.incoming, g.outgoing]) {
        for (let k = adjacent.offsets[i]; k < adjacent.offsets[i + 1]; k++) {
          const e = adjacent.links[k];
          if (!this.shownLinks[e]) continue;
          const positive = g.weight[e] >= 0 ? 1 : 0;
          const x1 = this.screenX(g.src[e]);
          const y1 = this.screenY(g.src[e]);
          const x2 = this.screenX(g.dst[e]);
          const y2 = this.screenY(g.dst[e]);
          addEnd(g.src[e] === i ? g.dst[e] : g.src[e]);
          if (this.bucket[e] < STRONG_BUCKET) {
            hairlines[positive].moveTo(x1, y1);
            hairlines[positive].lineTo(x2, y2);
            continue;
          }
          ctx.strokeStyle = `rgba(${positive ? EDGE_RGB.positive : EDGE_RGB.negative}, ${alpha * 0.9})`;
          ctx.lineWidth = 1.5 + 1.2 * BUCKET_WIDTHS[this.bucket[e]];
          ctx.beginPath();
          ctx.moveTo(x1, y1);
          ctx.lineTo(x2, y2);
          ctx.stroke();
        }
      }
      ctx.lineWidth = 1 / this.dpr;
      hairlines.forEach((path, positive) => {
        ctx.strokeStyle = `rgba(${positive ? EDGE_RGB.positive : EDGE_RGB.negative}, ${alpha * 0.8})`;
        ctx.stroke(path);
      });
      addEnd(i);
      ends.forEach((path, kind) => {
        ctx.fillStyle = NODE_COLORS[kind];
        ctx.fill(path);
      });
    }

    // A ring around node i (nothing for -1 or an unknown id).
    ring(ctx, i, color, width) {
      if (i === undefined || i < 0) return;
      ctx.strokeStyle = color;
      ctx.lineWidth = width;
      ctx.beginPath();
      ctx.arc(this.screenX(i), this.screenY(i), this.radius(i) + 2.5, 0, 2 * Math.PI);
      ctx.stroke();
    }

    // The fixed bands: prompt tokens across the top, layer names down the left, following pan and zoom.
    drawBands(ctx) {
      const g = this.graph;
      const { sx, sy, tx, ty } = this.view;
      ctx.fillStyle = "rgba(248, 250, 252, 0.94)";
      ctx.fillRect(0, 0, this.width, HEADER);
      ctx.fillRect(0, HEADER, GUTTER, this.height - HEADER);
      ctx.fillStyle = "#1f2937";
      ctx.font = "12px system-ui, sans-serif";
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      for (let p = 0; p < g.nPositions; p++) {
        const x = tx + (p + 0.5) * sx;
        if (x < GUTTER - sx || x > this.width + sx) continue;
        ctx.fillText(this.headerText(ctx, p, sx - 4), x, HEADER / 2);
      }
      ctx.font = "11px system-ui, sans-serif";
      ctx.fillStyle = "#64748b";
      const every = Math.max(1, Math.ceil(14 / sy));
      for (let row = 0; row < g.nRows; row++) {
        const y = ty + (g.nRows - 1 - row + 0.5) * sy;
        const edge = row === 0 || row === g.nRows - 1;
        const crowded = row % every || g.nRows - 1 - row < every;
        if (y < HEADER || y > this.height || (!edge && crowded)) continue;
        ctx.fillText(rowName(row, g.nRows), GUTTER / 2, y);
      }
    }

    // Column header of position p fitted to `width` pixels, cached until the column width changes (the
    // overlay, bands included, redraws on every hover).
    headerText(ctx, p, width) {
      if (this.headers.width !== width) this.headers = { width, texts: new Map() };
      let text = this.headers.texts.get(p);
      if (text === undefined) {
        text = fitText(ctx, this.tokenNames[p], width);
        this.headers.texts.set(p, text);
      }
      return text;
    }

    // The shown node under canvas point (px, py), looked up in the grid cells around it; -1 for none.
    hit(px, py) {
      if (py < HEADER || px < GUTTER) return -1;
      const g = this.graph;
      const wx = (px - this.view.tx) / this.view.sx;
      const wy = (py - this.view.ty) / this.view.sy;
      const column = Math.floor(wx);
      const top = Math.floor(wy);
      let best = -1;
      let bestDistance = Infinity;
      for (let dc = -1; dc <= 1; dc++) {
        for (let dr = -1; dr <= 1; dr++) {
          const row = g.nRows - 1 - (top + dr);
          const position = column + dc;
          if (row < 0 || row >= g.nRows || position < 0 || position >= g.nPositions) continue;
          const members = this.cells.get(row * g.nPositions + position);
          if (!members) continue;
          for (const i of members) {
            if (!this.nodeVisible[i]) continue;
            const distance = Math.hypot(this.screenX(i) - px, this.screenY(i) - py);
            if (distance <= this.radius(i) + 3 && distance < bestDistance) {
              best = i;
              bestDistance = distance;
            }
          }
        }
      }
      return best;
    }

    // Pointer, click and wheel handling: drag pans, wheel zooms about the pointer, click selects.
    listen() {
      const target = this.overlay;
      target.addEventListener("pointerdown", (event) => this.onPointerDown(event));
      target.addEventListener("pointermove", (event) => this.onPointerMove(event));
      target.addEventListener("pointerup", (event) => this.onPointerUp(event));
      target.addEventListener("pointerleave", () => this.setHovered(-1, 0, 0));
      target.addEventListener("click", (event) => this.onClick(event));
      target.addEventListener("wheel", (event) => this.onWheel(event), { passive: false });
    }

    // Canvas-relative coordinates of a mouse event.
    local(event) {
      const rect = this.container.getBoundingClientRect();
      return { x: event.clientX - rect.left, y: event.clientY - rect.top };
    }

    onPointerDown(event) {
      if (event.button !== 0) return;
      this.drag = { start: this.local(event), tx: this.view.tx, ty: this.view.ty, moved: false };
      this.dragged = false;
      this.overlay.setPointerCapture(event.pointerId);
    }

    // Pan while dragging (past a small dead zone), otherwise hover.
    onPointerMove(event) {
      const point = this.local(event);
      if (this.drag && event.buttons & 1) {
        const dx = point.x - this.drag.start.x;
        const dy = point.y - this.drag.start.y;
        if (!this.drag.moved && Math.hypot(dx, dy) < 4) return;
        this.drag.moved = true;
        this.view.tx = this.drag.tx + dx;
        this.view.ty = this.drag.ty + dy;
        this.overlay.classList.add("dragging");
        this.viewChanged();
        return;
      }
      this.setHovered(this.hit(point.x, point.y), event.clientX, event.clientY);
    }

    onPointerUp(event) {
      if (!this.drag) return;
      this.dragged = this.drag.moved;
      this.drag = null;
      this.overlay.classList.remove("dragging");
      if (this.overlay.hasPointerCapture(event.pointerId)) this.overlay.releasePointerCapture(event.pointerId);
    }

    // A click that ended no drag selects the node under the pointer (or clears the selection).
    onClick(event) {
      if (this.dragged) {
        this.dragged = false;
        return;
      }
      const point = this.local(event);
      this.handlers.onSelect(this.hit(point.x, point.y));
    }

    // Zoom about the pointer.
    onWheel(event) {
      event.preventDefault();
      const point = this.local(event);
      const factor = Math.exp(-event.deltaY * (event.deltaMode === 1 ? 0.05 : 0.0015));
      this.zoomAt(point.x, point.y, factor);
    }

    // Scale the view by `factor` keeping canvas point (px, py) fixed.
    zoomAt(px, py, factor) {
      const scale = Math.min(60, Math.max(0.3, (this.view.sx * factor) / this.fitSx)) * this.fitSx;
      const applied = scale / this.view.sx;
      this.view.tx = px - (px - this.view.tx) * applied;
      this.view.ty = py - (py - this.view.ty) * applied;
      this.view.sx *= applied;
      this.view.sy *= applied;
      this.viewChanged();
    }

    // Report hover changes (and pointer moves over the same node, to move the tooltip).
    setHovered(i, clientX, clientY) {
      const changed = i !== this.hovered;
      this.hovered = i;
      this.handlers.onHover(i, clientX, clientY);
      if (changed) this.requestDraw(false);
    }
  }

  // Influence rank for ordering a cell: null influence (tokens, targets) first, then most influential.
  function rank(influence) {
    return Number.isNaN(influence) ? -1 : influence;
  }

  // Base radius in CSS pixels: features and errors by influence (smaller share = bigger), fixed otherwise.
  function nodeRadius(kind, influence) {
    if (kind === KIND.TOKEN) return 5;
    if (kind === KIND.TARGET) return 6;
    if (Number.isNaN(influence)) return 3;
    const strength = 1 - Math.min(1, Math.max(0, influence));
    return 1.8 + 4.7 * strength * strength;
  }

  // Add a node's shape to `path`: circle (feature), diamond (error), wide box (token), square (target).
  function addShape(path, kind, x, y, r) {
    if (kind === KIND.FEATURE) {
      path.moveTo(x + r, y);
      path.arc(x, y, r, 0, 2 * Math.PI);
    } else if (kind === KIND.ERROR) {
      path.moveTo(x, y - r * 1.2);
      path.lineTo(x + r * 1.2, y);
      path.lineTo(x, y + r * 1.2);
      path.lineTo(x - r * 1.2, y);
      path.closePath();
    } else if (kind === KIND.TOKEN) {
      path.rect(x - r * 1.4, y - r * 0.8, r * 2.8, r * 1.6);
    } else {
      path.rect(x - r, y - r, 2 * r, 2 * r);
    }
  }

  // A token with its whitespace made visible, for the column headers.
  function visibleToken(token) {
    return (token === undefined ? "" : String(token)).replace(/ /g, "\u2423").replace(/\n/g, "\u21b5");
  }

  // `text` cut with an ellipsis to fit `width` pixels: no more characters than could fit (a glyph is at
  // least MIN_GLYPH_PX wide) are measured, and the longest prefix that fits is found by bisection.
  function fitText(ctx, text, width) {
    const most = Math.ceil(width / MIN_GLYPH_PX);
    if (text.length <= most && ctx.measureText(text).width <= width) return text;
    const fits = (cut) => ctx.measureText(`${text.slice(0, cut)}\u2026`).width <= width;
    let low = 0;
    let high = Math.min(text.length - 1, most);
    while (low < high) {
      const middle = Math.ceil((low + high) / 2);
      if (fits(middle)) low = middle;
      else high = middle - 1;
    }
    // Do not split a surrogate pair (a character outside the BMP).
    const lead = text.charCodeAt(low - 1);
    const cut = lead >= 0xd800 && lead <= 0xdbff ? low - 1 : low;
    return cut > 0 ? `${text.slice(0, cut)}\u2026` : "";
  }

  // Gutter name of a grid row: "emb" for tokens, "out" for targets, L<layer> between.
  function rowName(row, nRows) {
    if (row === 0) return "emb";
    if (row === nRows - 1) return "out";
    return `L${row - 1}`;
  }

  Object.assign(cm, { GraphCanvas, visibleToken });
})((window.Circuitmap = window.Circuitmap || {}));

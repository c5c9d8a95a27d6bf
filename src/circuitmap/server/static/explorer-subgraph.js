"use strict";
// The subgraph pane: pinned nodes and supernodes drawn in SVG by layer (up) and position (across), with
// the links among them; a supernode's links are the sums of its members' links.
(function (cm) {
  const { KIND } = cm;
  const SVG = "http://www.w3.org/2000/svg";
  const SLOT_WIDTH = 128;
  const ROW_HEIGHT = 74;
  const MARGIN = 28;
  const KIND_FILLS = ["#0f766e", "#9ca3af", "#475569", "#7c3aed"];

  class SubgraphView {
    // `handlers.onNodeClick(item, event)` is called when a drawn item is clicked. `options`: `maxLinks`,
    // the most links drawn (the strongest by |summed weight|; every link by default), and `labelLength`,
    // the characters of a label shown under its item, and `slotWidth` and `rowHeight`, the room given to
    // each item.
    constructor(svg, handlers, options = {}) {
      this.svg = svg;
      this.handlers = handlers;
      this.maxLinks = options.maxLinks || Infinity;
      this.labelLength = options.labelLength || 20;
      this.slotWidth = options.slotWidth || SLOT_WIDTH;
      this.rowHeight = options.rowHeight || ROW_HEIGHT;
    }

    // Draw `items` ({key, label, ids, isSuper}); `checked` holds the checked keys, `selectedId` the
    // selected node id.
    render(graph, items, checked, selectedId) {
      this.svg.replaceChildren();
      const placed = this.place(graph, items);
      if (!placed.length) {
        this.svg.setAttribute("viewBox", "0 0 10 10");
        return;
      }
      // At least the drawing's own size, so that a few nodes are not blown up to fill it.
      const right = Math.max(...placed.map((p) => p.x)) + this.slotWidth / 2 + MARGIN;
      const bottom = Math.max(...placed.map((p) => p.y)) + MARGIN + 20;
      const width = Math.max(right, this.svg.clientWidth);
      const height = Math.max(bottom, this.svg.clientHeight);
      this.svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
      const edges = strongestEdges(summedEdges(graph, placed), this.maxLinks);
      const strongest = Math.max(...edges.map((edge) => Math.abs(edge.weight)), 1e-30);
      for (const edge of edges) this.svg.appendChild(this.edgeElement(edge, strongest));
      for (const p of placed) {
        const selected = p.item.ids.includes(selectedId);
        this.svg.appendChild(this.nodeElement(graph, p, checked.has(p.item.key), selected));
      }
    }

    // Screen slots: rows are the layer rows in use (top = highest), columns the positions in use, each as
    // wide as its most crowded cell; a supernode sits at its members' mean row and last position.
    place(graph, items) {
      const placed = [];
      for (const item of items) {
        const members = item.ids.map((id) => graph.index.get(id)).filter((i) => i !== undefined);
        if (!members.length) continue;
        const row = Math.round(members.reduce((sum, i) => sum + graph.row[i], 0) / members.length);
        const column = Math.max(...members.map((i) => graph.pos[i]));
        placed.push({ item, members, row, column });
      }
      const rows = [...new Set(placed.map((p) => p.row))].sort((a, b) => b - a);
      const columns = [...new Set(placed.map((p) => p.column))].sort((a, b) => a - b);
      const cellCounts = new Map();
      const slotOf = new Map();
      for (const p of placed) {
        const key = `${p.row}:${p.column}`;
        slotOf.set(p, cellCounts.get(key) || 0);
        cellCounts.set(key, (cellCounts.get(key) || 0) + 1);
      }
      let left = MARGIN;
      const columnLeft = new Map();
      for (const column of columns) {
        columnLeft.set(column, left);
        const crowd = Math.max(...rows.map((row) => cellCounts.get(`${row}:${column}`) || 0));
        left += crowd * this.slotWidth;
      }
      for (const p of placed) {
        p.x = columnLeft.get(p.column) + (slotOf.get(p) + 0.5) * this.slotWidth;
        p.y = MARGIN + rows.indexOf(p.row) * this.rowHeight + 12;
      }
      return placed;
    }

    // A curved link from a lower item to a higher one, coloured by sign, width by relative |sum|.
    edgeElement(edge, strongest) {
      const { from, to } = edge;
      const path = document.createElementNS(SVG, "path");
      const middle = (from.y + to.y) / 2;
      path.setAttribute("d", `M${from.x},${from.y} C${from.x},${middle} ${to.x},${middle} ${to.x},${to.y}`);
      path.setAttribute("class", `sg-edge ${edge.weight >= 0 ? "positive" : "negative"}`);
      path.setAttribute("stroke-width", String(1 + 5 * (Math.abs(edge.weight) / strongest)));
      const title = document.createElementNS(SVG, "title");
      const share = edge.share === null ? "" : `, ${formatShare(edge.share)} of the target's input`;
      title.textContent = `${from.item.label} \u2192 ${to.item.label}: ${edge.weight.toPrecision(3)}${share}`;
      path.appendChild(title);
      return path;
    }

    // One item: a shape by kind (a wide box for supernodes) and its label below.
    nodeElement(graph, p, checked, selected) {
      const group = document.createElementNS(SVG, "g");
      group.setAttribute("class", `sg-node${checked ? " checked" : ""}${selected ? " selected" : ""}`);
      group.setAttribute("transform", `translate(${p.x},${p.y})`);
      group.dataset.testid = "subgraph-node";
      group.dataset.key = p.item.key;
      const shape = p.item.isSuper ? superShape(p.members.length) : kindShape(graph.kind[p.members[0]]);
      group.appendChild(shape);
      const text = document.createElementNS(SVG, "text");
      text.setAttribute("y", "24");
      text.setAttribute("text-anchor", "middle");
      text.textContent = shorten(p.item.label, this.labelLength);
      group.appendChild(text);
      const title = document.createElementNS(SVG, "title");
      title.textContent = p.item.isSuper ? `${p.item.label} (${p.members.length} nodes)` : p.item.label;
      group.appendChild(title);
      group.addEventListener("click", (event) => this.handlers.onNodeClick(p.item, event));
      return group;
    }
  }

  // Links between distinct placed items, weights summed over their members' links.
  function summedEdges(graph, placed) {
    const owner = new Map();
    placed.forEach((p, k) => p.members.forEach((i) => owner.set(i, k)));
    const sums = new Map();
    placed.forEach((p, from) => {
      for (const i of p.members) {
        const out = graph.outgoing;
        for (let k = out.offsets[i]; k < out.offsets[i + 1]; k++) {
          const e = out.links[k];
          const to = owner.get(graph.dst[e]);
          if (to === undefined || to === from) continue;
          const key = `${from}>${to}`;
          sums.set(key, (sums.get(key) || 0) + graph.weight[e]);
        }
      }
    });
    return [...sums].map(([key, weight]) => {
      const [from, to] = key.split(">").map(Number);
      const input = placed[to].members.reduce((sum, i) => sum + graph.inputTotal[i], 0);
      return { from: placed[from], to: placed[to], weight, share: input > 0 ? weight / input : null };
    });
  }

  // The `limit` edges of largest |weight|, drawn weakest first (so the strongest lie on top).
  function strongestEdges(edges, limit) {
    if (edges.length <= limit) return edges;
    const ranked = edges.slice().sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight));
    return ranked.slice(0, limit).reverse();
  }

  // SVG shape of a single node of `kind`, centred on the origin.
  function kindShape(kind) {
    if (kind === KIND.FEATURE) return svgElement("circle", { r: 9, fill: KIND_FILLS[kind] });
    if (kind === KIND.ERROR) {
      return svgElement("polygon", { points: "0,-10 10,0 0,10 -10,0", fill: KIND_FILLS[kind] });
    }
    const [width, height] = kind === KIND.TOKEN ? [26, 16] : [18, 18];
    return svgElement("rect", { x: -width / 2, y: -height / 2, width, height, fill: KIND_FILLS[kind] });
  }

  // SVG shape of a supernode: a rounded box showing its member count.
  function superShape(count) {
    const group = svgElement("g", {});
    group.appendChild(svgElement("rect", { x: -22, y: -11, width: 44, height: 22, rx: 11, class: "sg-super" }));
    const text = svgElement("text", { y: 4, "text-anchor": "middle", class: "sg-count" });
    text.textContent = `\u00d7${count}`;
    group.appendChild(text);
    return group;
  }

  // An SVG element with attributes.
  function svgElement(name, attributes) {
    const element = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
    return element;
  }

  // `text` cut to `length` characters with an ellipsis.
  function shorten(text, length) {
    return text.length > length ? `${text.slice(0, length - 1)}\u2026` : text;
  }

  // A signed share as a percentage with three significant digits.
  function formatShare(share) {
    const percent = share * 100;
    const digits = Math.abs(percent) >= 10 ? 1 : Math.abs(percent) >= 1 ? 2 : 3;
    return `${percent >= 0 ? "+" : "\u2212"}${Math.abs(percent).toFixed(digits)}%`;
  }

  Object.assign(cm, { SubgraphView, formatShare });
})((window.Circuitmap = window.Circuitmap || {}));

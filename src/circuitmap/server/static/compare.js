"use strict";
// The page of two graphs side by side (/compare/<a>/<b>), drawn from GET /api/compare/<a>/<b>: both
// prompts and top targets, the prompts aligned on their last tokens, the matched supernodes and the
// shared, vanished and new features with their influence in each graph.
(function (cm) {
  const { $, el, formatNumber, graphPath, api, showMessage, hideMessage } = cm.ui;
  const ROWS = 50; // rows a feature table shows before "Show all"
  const DASH = "\u2014";

  // The two graph names of a /compare/<a>/<b> path, or null when the path does not name two.
  function namesFromPath(path) {
    const parts = path.split("/").filter(Boolean);
    if (parts.length !== 3 || parts[0] !== "compare") return null;
    try {
      return parts.slice(1).map(decodeURIComponent);
    } catch (error) {
      return null;
    }
  }

  // A token as text with its spaces visible: in quotes.
  function quoted(token) {
    return token === null ? DASH : JSON.stringify(token);
  }

  // A change with its sign; an em dash for none.
  function signed(value) {
    if (value === null) return DASH;
    return `${value >= 0 ? "+" : "\u2212"}${Math.abs(value).toFixed(4)}`;
  }

  function changeClass(value) {
    if (value === null || value === 0) return "";
    return value > 0 ? "up" : "down";
  }

  // `value` as a percentage of `scale` (0 when the scale is 0).
  function percent(value, scale) {
    return scale > 0 ? Math.min(100, (100 * value) / scale) : 0;
  }

  // Horizontal bars, one per [value, side], as long as value / scale; a null value keeps its (empty) row.
  function bars(values, scale) {
    return el(
      "span",
      { class: "bars" },
      values.map(([value, side]) => {
        const title = `${side.toUpperCase()}: ${formatNumber(value, 4)}`;
        const bar = el("span", { class: value === null ? `bar ${side} none` : `bar ${side}`, title });
        bar.style.width = `${value === null ? 0 : percent(value, scale)}%`;
        return bar;
      }),
    );
  }

  // A bar from the middle: right for a rise, left for a fall, half the width at |change| = scale.
  function changeBar(change, scale) {
    const box = el("span", { class: "change-bar" });
    if (change === null) return box;
    const width = percent(Math.abs(change), scale) / 2;
    const fill = el("span", { class: `change-fill ${changeClass(change)}` });
    fill.style.width = `${width}%`;
    fill.style.left = change >= 0 ? "50%" : `${50 - width}%`;
    box.append(fill);
    return box;
  }

  function largest(values) {
    return values.reduce((most, value) => (value !== null && value > most ? value : most), 0);
  }

  // One graph's card: its name (a link to its view), prompt, top target and kept features.
  function renderSide(side, letter) {
    const target =
      side.top_target === null
        ? "no target"
        : quoted(side.top_target) +
          (side.top_target_probability === null ? "" : ` (p=${formatNumber(side.top_target_probability)})`);
    $(`side-${letter}`).replaceChildren(
      el("h2", {}, [
        el("span", { class: `key ${letter}` }, [letter.toUpperCase()]),
        " ",
        el("a", { href: graphPath(side.name), data: { testid: `graph-link-${letter}` } }, [side.name]),
      ]),
      el("p", { class: "side-prompt", data: { testid: `prompt-${letter}` } }, [side.prompt]),
      el("dl", { class: "facts" }, [
        el("dt", {}, ["Top target"]),
        el("dd", { data: { testid: `target-${letter}` } }, [target]),
        el("dt", {}, ["Kept features"]),
        el("dd", {}, [side.n_features.toLocaleString("en-US")]),
      ]),
    );
  }

  // Both prompts' tokens in columns counted from the end; tokens that differ are marked.
  function renderTokens(a, b) {
    const width = Math.max(a.tokens.length, b.tokens.length);
    const fromEnd = Array.from({ length: width }, (_, k) => width - 1 - k);
    const tokenAt = (tokens, back) => (back < tokens.length ? tokens[tokens.length - 1 - back] : null);
    const row = (letter, tokens, other) =>
      el("tr", {}, [
        el("th", {}, [el("span", { class: `key ${letter}` }, [letter.toUpperCase()])]),
        ...fromEnd.map((back) => {
          const token = tokenAt(tokens, back);
          const differs = token !== null && token !== tokenAt(other, back);
          return el("td", { class: differs ? "differs" : "" }, [token === null ? "" : quoted(token)]);
        }),
      ]);
    const header = fromEnd.map((back) => el("th", {}, [String(back)]));
    $("token-alignment").replaceChildren(
      el("tr", { class: "from-end" }, [el("th", {}, ["from end"]), ...header]),
      row("a", a.tokens, b.tokens),
      row("b", b.tokens, a.tokens),
    );
  }

  // The supernode table: matched pairs, then those only in A, then those only in B.
  function renderSupernodes(supernodes) {
    const rows = [
      ...supernodes.matched.map((group) => [group, "matched"]),
      ...supernodes.only_in_a.map((group) => [group, "only-a"]),
      ...supernodes.only_in_b.map((group) => [group, "only-b"]),
    ];
    const groups = rows.map(([group]) => group);
    const scale = largest(groups.flatMap((group) => [group.influence_a, group.influence_b]));
    const changes = groups.map((group) => (group.change === null ? null : Math.abs(group.change)));
    const changeScale = largest(changes);
    const name = (text, missing) => (text === null ? el("span", { class: "absent" }, [missing]) : text);
    $("supernode-rows").replaceChildren(
      ...rows.map(([group, status]) =>
        el("tr", { class: status, data: { testid: "supernode-row", status } }, [
          el("td", { title: group.members_a.join(", ") }, [name(group.name_a, "no match in A")]),
          el("td", { title: group.members_b.join(", ") }, [name(group.name_b, "no match in B")]),
          el("td", { class: "number" }, [
            group.common_members ? `${group.common_members} (${formatNumber(group.overlap, 2)})` : DASH,
          ]),
          el("td", { class: "number" }, [formatNumber(group.influence_a, 4)]),
          el("td", { class: "number" }, [formatNumber(group.influence_b, 4)]),
          el("td", {}, [bars([[group.influence_a, "a"], [group.influence_b, "b"]], scale)]),
          el("td", { class: `number ${changeClass(group.change)}` }, [signed(group.change)]),
          el("td", {}, [changeBar(group.change, changeScale)]),
        ]),
      ),
    );
    $("supernode-count").textContent =
      `${supernodes.matched.length} matched, ${supernodes.only_in_a.length} only in A, ` +
      `${supernodes.only_in_b.length} only in B`;
    $("supernode-table").hidden = rows.length === 0;
    $("supernodes-empty").hidden = rows.length > 0;
  }

  // Fill `body` with one row per item (the first ROWS, then a "Show all" button); `columns` is the table's
  // column count, for the button's row and the empty note.
  function fillRows(body, items, makeRow, columns) {
    const show = (count) => {
      const rows = items.slice(0, count).map(makeRow);
      if (items.length > count) {
        const more = el("button", { type: "button", class: "more", data: { testid: "show-all" } }, [
          `Show all ${items.length.toLocaleString("en-US")}`,
        ]);
        more.addEventListener("click", () => show(items.length));
        rows.push(el("tr", {}, [el("td", { colSpan: columns }, [more])]));
      }
      if (items.length === 0) {
        rows.push(el("tr", {}, [el("td", { colSpan: columns, class: "empty" }, ["none"])]));
      }
      body.replaceChildren(...rows);
    };
    show(ROWS);
  }

  function featureName(feature) {
    const ids = [["A", feature.node_a], ["B", feature.node_b]].filter(([, id]) => id !== null);
    return el("td", { class: "feature-name", title: ids.map(([side, id]) => `${side}: ${id}`).join(", ") }, [
      `${feature.layer}/${feature.feature}`,
    ]);
  }

  function labelCell(feature) {
    return feature.label
      ? el("td", { class: "label" }, [feature.label])
      : el("td", { class: "label empty" }, ["no label"]);
  }

  // The three feature tables: shared (both influences and the change), only in A, only in B.
  function renderFeatures(features) {
    const { shared, only_in_a: onlyA, only_in_b: onlyB } = features;
    const scale = largest([...shared, ...onlyA, ...onlyB].flatMap((f) => [f.influence_a, f.influence_b]));
    const changeScale = largest(shared.map((f) => Math.abs(f.change)));
    fillRows(
      $("shared-rows"),
      shared,
      (f) =>
        el("tr", { data: { testid: "feature-row" } }, [
          featureName(f),
          el("td", { class: "number" }, [String(f.from_end)]),
          el("td", { class: "token" }, [quoted(f.token_a)]),
          el("td", { class: `token ${f.token_a === f.token_b ? "" : "differs"}` }, [quoted(f.token_b)]),
          labelCell(f),
          el("td", { class: "number" }, [formatNumber(f.influence_a, 4)]),
          el("td", { class: "number" }, [formatNumber(f.influence_b, 4)]),
          el("td", {}, [bars([[f.influence_a, "a"], [f.influence_b, "b"]], scale)]),
          el("td", { class: `number ${changeClass(f.change)}` }, [signed(f.change)]),
          el("td", {}, [changeBar(f.change, changeScale)]),
        ]),
      10,
    );
    const onlyRow = (side) => (f) =>
      el("tr", { data: { testid: "feature-row" } }, [
        featureName(f),
        el("td", { class: "number" }, [String(f.from_end)]),
        el("td", { class: "token" }, [quoted(f[`token_${side}`])]),
        labelCell(f),
        el("td", { class: "number" }, [formatNumber(f[`influence_${side}`], 4)]),
        el("td", {}, [bars([[f[`influence_${side}`], side]], scale)]),
      ]);
    fillRows($("only-a-rows"), onlyA, onlyRow("a"), 6);
    fillRows($("only-b-rows"), onlyB, onlyRow("b"), 6);
    $("shared-count").textContent = `(${shared.length})`;
    $("only-a-count").textContent = `(${onlyA.length})`;
    $("only-b-count").textContent = `(${onlyB.length})`;
    $("feature-count").textContent =
      `${shared.length} shared, ${onlyA.length} only in A, ${onlyB.length} only in B`;
  }

  function render(comparison) {
    renderSide(comparison.a, "a");
    renderSide(comparison.b, "b");
    renderTokens(comparison.a, comparison.b);
    renderSupernodes(comparison.supernodes);
    renderFeatures(comparison.features);
    $("compare-title").textContent = `${comparison.a.name} vs ${comparison.b.name}`;
    const { model, transcoders } = comparison;
    $("footer").textContent = `model ${model || DASH} \u00b7 transcoders ${transcoders || DASH}`;
    $("loading").hidden = true;
    $("compare-view").hidden = false;
  }

  async function start() {
    $("message-close").addEventListener("click", hideMessage);
    const names = namesFromPath(window.location.pathname);
    try {
      if (names === null) throw new Error("the address must be /compare/<graph A>/<graph B>");
      document.title = `${names[0]} vs ${names[1]} \u00b7 circuitmap`;
      render((await api("GET", `/api/compare/${names.map(encodeURIComponent).join("/")}`)).data);
    } catch (error) {
      $("loading").hidden = true;
      showMessage(`Could not compare the graphs: ${error.message}`);
    } finally {
      document.body.dataset.ready = "1";
    }
  }

  start();
})((window.Circuitmap = window.Circuitmap || {}));

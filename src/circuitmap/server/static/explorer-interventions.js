"use strict";
// Interventions in the node panel: scale a feature node (or every feature of a supernode) by a multiple of
// its activation on this prompt, run the model on the server, and show the top next tokens and the greedy
// continuation of the original and the edited run side by side. Outcomes are kept per target, so going back
// to a node shows its last result.
(function (cm) {
  const { el, api } = cm.ui;
  const KEPT_OUTCOMES = 64;
  const HINT =
    "Multiply the activation on this prompt (0 switches it off, 2 doubles it) and compare the next " +
    "tokens and the greedy continuation.";

  class InterventionPanel {
    // `options`: available (the server has a model), note (why not; "" shows nothing), graphName.
    constructor(container, options) {
      this.container = container;
      this.options = options;
      this.outcomes = new Map();
      this.key = "";
      this.target = null;
    }

    // Show the control for `target` ({key, title, ids: feature node ids, skipped: members that are not
    // features, name: a supernode's label or null}), or nothing for null. Showing the shown target again
    // only follows a new title, so a value being typed and a running request are kept. Without a model
    // and without a note (the exported page) nothing is ever shown.
    show(target) {
      if (!this.options.available && !this.options.note) target = null;
      const key = target ? target.key : "";
      if (key === this.key) {
        if (target) {
          this.target = target;
          this.title.textContent = target.title;
        }
        return;
      }
      this.key = key;
      this.target = target;
      if (!target) {
        this.container.dataset.state = "";
        this.container.replaceChildren();
        return;
      }
      this.build(target);
      this.renderOutcome();
    }

    // The heading, the factor and its buttons, and the places for the busy mark, an error and the result.
    build(target) {
      this.title = el("span", { class: "count" }, [target.title]);
      const notes = [];
      if (!this.options.available) notes.push(this.options.note);
      else if (!target.ids.length) notes.push("None of its members is a feature: only features can be edited.");
      else notes.push(HINT);
      if (target.skipped) notes.push(`${target.skipped} member(s) that are not features stay as they are.`);
      const usable = this.options.available && target.ids.length > 0;
      this.factor = el("input", {
        type: "number",
        value: "0",
        step: "0.1",
        disabled: !usable,
        class: "iv-factor",
        title: "multiple of the activation",
        data: { testid: "intervention-factor" },
      });
      this.scaleButton = el(
        "button",
        { type: "submit", disabled: !usable, data: { testid: "intervention-scale" } },
        ["Scale"],
      );
      this.ablateButton = el(
        "button",
        { type: "button", disabled: !usable, title: "Scale by 0", data: { testid: "intervention-ablate" } },
        ["Ablate"],
      );
      this.busy = el("span", { class: "iv-busy", hidden: true, data: { testid: "intervention-busy" } }, [
        "running\u2026",
      ]);
      const form = el("form", { class: "iv-form" }, [
        el("label", { class: "iv-label" }, [this.factor, "\u00d7 activation"]),
        this.scaleButton,
        this.ablateButton,
        this.busy,
      ]);
      form.addEventListener("submit", (event) => {
        event.preventDefault();
        this.run(this.factor.value.trim() === "" ? NaN : Number(this.factor.value));
      });
      this.ablateButton.addEventListener("click", () => this.run(0));
      this.error = el("p", { class: "fd-error", hidden: true, data: { testid: "intervention-error" } });
      this.result = el("div", { class: "iv-result", data: { testid: "intervention-result" } });
      this.container.replaceChildren(
        el("h3", {}, ["Intervene ", this.title]),
        ...notes.map((text) => el("p", { class: "hint", data: { testid: "intervention-note" } }, [text])),
        form,
        this.error,
        this.result,
      );
    }

    // Ask the server for the edited run of the shown target, scaled by `factor`.
    async run(factor) {
      const { key, target } = this;
      if (!Number.isFinite(factor)) {
        this.remember(key, { state: "error", message: "Type a number: the multiple of the activation." });
        return this.renderOutcome();
      }
      const edit = { nodes: target.ids, operation: "scale", value: factor };
      if (target.name !== null) edit.name = target.name;
      this.remember(key, { state: "busy" });
      this.renderOutcome();
      let outcome;
      try {
        const path = `/api/graphs/${encodeURIComponent(this.options.graphName)}/intervene`;
        const { data } = await api("POST", path, { edits: [edit] });
        outcome = { state: "done", data };
      } catch (error) {
        outcome = { state: "error", message: `Could not run the edit: ${error.message}` };
      }
      this.remember(key, outcome);
      if (this.key === key) this.renderOutcome();
    }

    // Keep the latest outcome of a target (the oldest are forgotten).
    remember(key, outcome) {
      this.outcomes.delete(key);
      this.outcomes.set(key, outcome);
      if (this.outcomes.size > KEPT_OUTCOMES) this.outcomes.delete(this.outcomes.keys().next().value);
    }

    // The shown target's outcome: nothing yet, running, an error, or the two runs side by side.
    renderOutcome() {
      const usable = this.options.available && this.target.ids.length > 0;
      const outcome = this.outcomes.get(this.key) || { state: usable ? "idle" : "unavailable" };
      this.container.dataset.state = outcome.state;
      const busy = outcome.state === "busy";
      this.busy.hidden = !busy;
      for (const button of [this.scaleButton, this.ablateButton]) button.disabled = busy || !usable;
      this.error.hidden = outcome.state !== "error";
      this.error.textContent = outcome.state === "error" ? outcome.message : "";
      this.result.replaceChildren(...(outcome.state === "done" ? comparison(outcome.data) : []));
    }
  }

  // The edits as the server read them, then the original and edited columns.
  function comparison(data) {
    const before = new Set(data.top_before.map(([token]) => token));
    return [
      el("p", { class: "hint iv-edits", data: { testid: "intervention-edits" } }, [data.edits.join("; ")]),
      el("div", { class: "iv-columns" }, [
        column("original", "intervention-original", data.top_before, data.continuation_before, null),
        column("edited", "intervention-edited", data.top_after, data.continuation_after, before),
      ]),
    ];
  }

  // One run: its top next tokens with probabilities (tokens new to the top list marked) and its greedy
  // continuation.
  function column(title, testid, top, continuation, before) {
    const rows = top.map(([token, probability]) => {
      const fresh = before !== null && !before.has(token);
      return el("li", { class: fresh ? "iv-new" : "", data: { testid: "intervention-token" } }, [
        el("code", { title: JSON.stringify(token) }, [cm.visibleToken(token)]),
        el("span", { class: "value" }, [formatProbability(probability)]),
      ]);
    });
    return el("div", { class: "iv-column", data: { testid } }, [
      el("h4", {}, [title]),
      el("ol", { class: "iv-tokens" }, rows),
      el("h4", {}, ["continuation"]),
      el("p", { class: "iv-continuation", data: { testid: "intervention-continuation" } }, [
        continuation ? `\u2026${continuation}` : "(nothing: the model stops here)",
      ]),
    ]);
  }

  // A probability as a percentage with enough digits for small ones.
  function formatProbability(p) {
    if (!Number.isFinite(p)) return "\u2014";
    const percent = p * 100;
    return `${percent >= 10 ? percent.toFixed(1) : percent >= 0.1 ? percent.toFixed(2) : percent.toPrecision(2)}%`;
  }

  Object.assign(cm, { InterventionPanel });
})((window.Circuitmap = window.Circuitmap || {}));

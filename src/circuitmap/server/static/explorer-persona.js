"use strict";
// The persona panel, for a server started with --persona: pick a vector and a layer, read the selected
// feature node's projection on the vector (its activation times its write into the residual entering that
// layer, along the unit vector), project a prompt and a response token by token, and steer a continuation
// along the vector beside the unsteered one. It stays hidden when the server lists no vector.
(function (cm) {
  const { el, api, formatNumber } = cm.ui;

  class PersonaPanel {
    // `options`: graphName, prompt (the graph's, to start the prompt box with).
    constructor(container, options) {
      this.container = container;
      this.options = options;
      this.vectors = [];
      this.node = null;
      this.round = 0;
      this.projections = new Map();
    }

    // Ask the server for its vectors and build the panel when there is one.
    async start() {
      this.vectors = (await api("GET", "/api/personas")).data;
      if (!this.vectors.length) return;
      this.build();
      this.container.hidden = false;
      this.chooseVector();
    }

    // The selector and layer, the node's projection, and the project and steer forms with their results.
    build() {
      this.vector = el(
        "select",
        { data: { testid: "persona-vector" } },
        this.vectors.map((v) => {
          const named = v.trait && v.trait !== v.name ? `${v.name} (${v.trait})` : v.name;
          return el("option", { value: v.name }, [named]);
        }),
      );
      this.layerInput = el("input", {
        type: "number",
        step: "1",
        class: "iv-factor",
        data: { testid: "persona-layer" },
      });
      this.vector.addEventListener("change", () => this.chooseVector());
      this.layerInput.addEventListener("change", () => this.renderNode());
      this.nodeValue = el("p", { class: "pv-node", data: { testid: "persona-node" } });

      this.prompt = el("textarea", { rows: 2, value: this.options.prompt, data: { testid: "persona-prompt" } });
      this.response = el("textarea", {
        rows: 2,
        placeholder: "Response (optional): projected token by token",
        data: { testid: "persona-response" },
      });
      this.projectButton = el("button", { type: "submit", data: { testid: "persona-project" } }, ["Project"]);
      this.projection = el("div", { data: { testid: "persona-projection", state: "idle" } });
      const projectForm = el("form", { class: "pv-form" }, [this.prompt, this.response, this.projectButton]);
      projectForm.addEventListener("submit", (event) => {
        event.preventDefault();
        this.project();
      });

      this.coefficient = el("input", {
        type: "number",
        value: "0.5",
        step: "0.1",
        class: "iv-factor",
        data: { testid: "persona-coefficient" },
      });
      this.steerButton = el("button", { type: "submit", data: { testid: "persona-steer" } }, ["Steer"]);
      this.steering = el("div", { data: { testid: "persona-steering", state: "idle" } });
      const steerForm = el("form", { class: "iv-form" }, [
        el("label", { class: "iv-label" }, [this.coefficient, "\u00d7 typical norm"]),
        this.steerButton,
      ]);
      steerForm.addEventListener("submit", (event) => {
        event.preventDefault();
        this.steer();
      });

      this.container.replaceChildren(
        el("h3", {}, ["Persona"]),
        el("div", { class: "iv-form" }, [
          this.vector,
          el("label", { class: "iv-label" }, ["layer", this.layerInput]),
        ]),
        this.nodeValue,
        projectForm,
        this.projection,
        steerForm,
        this.steering,
      );
    }

    // The chosen vector's layers, starting at its default layer.
    chooseVector() {
      const chosen = this.chosen();
      this.layerInput.min = "0";
      this.layerInput.max = String(chosen.n_layers - 1);
      this.layerInput.value = String(chosen.layer);
      this.renderNode();
    }

    chosen() {
      return this.vectors.find((v) => v.name === this.vector.value);
    }

    // The layer typed, or null (with the reason shown in `where`) when it is not one of the vector's.
    layer(where) {
      const layer = Number(this.layerInput.value);
      const last = this.chosen().n_layers - 1;
      const typed = this.layerInput.value.trim() !== "";
      if (typed && Number.isInteger(layer) && layer >= 0 && layer <= last) return layer;
      showError(where, `Type a layer from 0 to ${last}.`);
      return null;
    }

    // Follow the selection: `node` is {id, layer} (layer null for a node that is not a feature), or null.
    showNode(node) {
      this.node = node;
      if (this.nodeValue) this.renderNode();
    }

    // The selected node's projection, fetched once per vector and layer for the whole graph; a later call
    // (another node, vector or layer) overrides an earlier one still waiting.
    async renderNode() {
      const round = ++this.round;
      const { node } = this;
      const box = this.nodeValue;
      if (node === null) return showNode(box, "Select a feature node to see its projection on the vector.");
      if (node.layer === null) return showNode(box, "Only feature nodes write into the residual stream.");
      const layer = this.layer(box);
      if (layer === null) return;
      if (node.layer >= layer) {
        const after = `A feature of layer ${node.layer} writes after the residual entering layer ${layer}.`;
        return showNode(box, after);
      }
      const key = `${this.vector.value}@${layer}`;
      if (!this.projections.has(key)) {
        const path =
          `/api/graphs/${encodeURIComponent(this.options.graphName)}/persona/` +
          `${encodeURIComponent(this.vector.value)}?layer=${layer}`;
        const request = api("GET", path).then(({ data }) => data.values);
        request.catch(() => this.projections.delete(key));
        this.projections.set(key, request);
      }
      showNode(box, "projecting\u2026");
      try {
        const value = (await this.projections.get(key))[node.id];
        if (round === this.round) showNode(box, `projection at layer ${layer}: ${signed(value)}`, value);
      } catch (error) {
        if (round === this.round) showError(box, `Could not project the graph's features: ${error.message}`);
      }
    }

    // Project the prompt (and the response, when given) on the vector at the layer.
    async project() {
      const layer = this.layer(this.projection);
      if (layer === null) return;
      const body = { prompt: this.prompt.value, layer };
      if (this.response.value.trim()) body.response = this.response.value;
      await this.ask(this.projectButton, this.projection, "project", body, projectionView);
    }

    // Steer the prompt's continuation along the vector at the layer, by the coefficient.
    async steer() {
      const layer = this.layer(this.steering);
      if (layer === null) return;
      const coefficient = this.coefficient.value.trim() === "" ? NaN : Number(this.coefficient.value);
      if (!Number.isFinite(coefficient)) {
        return showError(this.steering, "Type a number: the steering coefficient.");
      }
      const body = { prompt: this.prompt.value, layer, coefficient, relative: true };
      await this.ask(this.steerButton, this.steering, "steer", body, (data) => [
        el("div", { class: "iv-columns" }, [
          continuation("unsteered", "persona-unsteered", data.unsteered),
          continuation("steered", "persona-steered", data.steered),
        ]),
      ]);
    }

    // POST `body` to the vector's `action`, then show `view(answer)` (or the error) in `box`.
    async ask(button, box, action, body, view) {
      button.disabled = true;
      box.dataset.state = "busy";
      box.replaceChildren(el("span", { class: "iv-busy" }, ["running\u2026"]));
      try {
        const path = `/api/personas/${encodeURIComponent(this.vector.value)}/${action}`;
        const { data } = await api("POST", path, body);
        box.dataset.state = "done";
        box.replaceChildren(...view(data));
      } catch (error) {
        showError(box, `Could not ${action}: ${error.message}`);
      } finally {
        button.disabled = false;
      }
    }
  }

  // The last prompt token's projection, then the response's mean and its tokens coloured by sign.
  function projectionView(data) {
    const parts = [`last prompt token ${signed(data.last_prompt)}`];
    if (data.mean !== null) parts.push(`mean over the response ${signed(data.mean)}`);
    const tokens = data.tokens.map((token, k) => {
      const value = data.values[k];
      return el(
        "li",
        { class: `pv-token ${value >= 0 ? "positive" : "negative"}`, data: { testid: "persona-token", value } },
        [el("code", { title: JSON.stringify(token) }, [cm.visibleToken(token)]), signed(value)],
      );
    });
    return [
      el("p", { class: "hint", data: { testid: "persona-summary" } }, [parts.join(" \u00b7 ")]),
      el("ol", { class: "pv-tokens" }, tokens),
    ];
  }

  // One continuation under its title.
  function continuation(title, testid, text) {
    return el("div", { class: "iv-column" }, [
      el("h4", {}, [title]),
      el("p", { class: "iv-continuation", data: { testid } }, [text || "(nothing: the model stops here)"]),
    ]);
  }

  // A projection with its sign.
  function signed(value) {
    return `${value > 0 ? "+" : ""}${formatNumber(value, 3)}`;
  }

  // The node's projection coloured by its sign, or a note when `value` is not given.
  function showNode(box, text, value) {
    box.className = value === undefined ? "pv-node hint" : `pv-node ${value >= 0 ? "positive" : "negative"}`;
    box.dataset.state = value === undefined ? "note" : "done";
    if (value === undefined) delete box.dataset.value;
    else box.dataset.value = String(value);
    box.textContent = text;
  }

  // An error in place of a result.
  function showError(box, text) {
    box.dataset.state = "error";
    delete box.dataset.value;
    box.replaceChildren(el("span", { class: "fd-error", data: { testid: "persona-error" } }, [text]));
  }

  Object.assign(cm, { PersonaPanel });
})((window.Circuitmap = window.Circuitmap || {}));

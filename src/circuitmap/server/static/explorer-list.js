"use strict";
// The graph list page (served mode): the table of graphs with rename and delete, and the form that
// computes a new graph as a background job, with its progress.
(function (cm) {
  const { $, el, formatCounts, formatScores, graphPath, api } = cm.ui;
  const { showMessage, hideMessage, ask, nameProblem, showView } = cm.ui;
  const POLL_MS = 500;
  const SCORES_TITLE = "replacement (R) and completeness (C) of the full graph; of the exported part below";

  class GraphList {
    // `config`: the server's /api/config answer.
    constructor(config) {
      this.config = config;
      this.editable = !config.read_only;
    }

    // Show the page: the compute form when the server can compute, then the list and unfinished jobs.
    async start() {
      document.title = "circuitmap graphs";
      showView("list-view");
      if (this.config.can_compute && this.editable) this.setUpCompute();
      await this.refresh();
      if (this.config.can_compute && this.editable) await this.resumeJobs();
    }

    // Reload and redraw the table.
    async refresh() {
      let graphs;
      try {
        graphs = (await api("GET", "/api/graphs")).data.graphs;
      } catch (error) {
        showMessage(`Could not list the graphs: ${error.message}`);
        return;
      }
      $("graph-rows").replaceChildren(...graphs.map((graph) => this.row(graph)));
      $("graph-table").hidden = graphs.length === 0;
      const empty = $("graph-list-empty");
      empty.hidden = graphs.length > 0;
      empty.textContent = this.config.can_compute
        ? "No graphs yet: compute one above."
        : "No graphs yet. Write one with `circuitmap attribute --prompt \u2026 --out FOLDER/NAME`, then reload.";
    }

    // One table row: name link, prompt, model, transcoders, date, counts, scores and actions.
    row(graph) {
      const created = graph.created ? new Date(graph.created) : null;
      const when = created && !Number.isNaN(created.getTime()) ? created.toLocaleString() : "\u2014";
      const scores = graph.scores || {};
      const scoreCell = el("td", { title: SCORES_TITLE }, [
        formatScores(scores.full),
        el("div", { class: "sub" }, [`exported ${formatScores(scores.exported)}`]),
      ]);
      const actions = el("td", { class: "actions" }, [
        el("a", { href: graphPath(graph.name), class: "button", data: { testid: "open-graph" } }, ["Open"]),
      ]);
      if (this.editable) {
        const rename = el("button", { type: "button", data: { testid: "rename-graph" } }, ["Rename"]);
        rename.addEventListener("click", () => this.rename(graph.name));
        const props = { type: "button", class: "danger", data: { testid: "delete-graph" } };
        const remove = el("button", props, ["Delete"]);
        remove.addEventListener("click", () => this.remove(graph.name));
        actions.append(rename, remove);
      }
      return el("tr", { data: { testid: "graph-row", name: graph.name } }, [
        el("td", {}, [el("a", { href: graphPath(graph.name), data: { testid: "graph-link" } }, [graph.name])]),
        el("td", { class: "prompt" }, [graph.prompt || ""]),
        el("td", {}, [graph.model || "\u2014"]),
        el("td", {}, [graph.transcoders || "\u2014"]),
        el("td", {}, [when]),
        el("td", { class: "number" }, [formatCounts(graph.n_nodes)]),
        el("td", { class: "number" }, [formatCounts(graph.n_edges)]),
        scoreCell,
        actions,
      ]);
    }

    // Rename a graph after asking for the new name.
    async rename(name) {
      const next = await ask(`New name for \u201c${name}\u201d`, name, nameProblem);
      if (next === null || next === name) return;
      try {
        await api("POST", `/api/graphs/${encodeURIComponent(name)}/rename`, { name: next });
        hideMessage();
      } catch (error) {
        showMessage(`Could not rename ${name}: ${error.message}`);
      }
      await this.refresh();
    }

    // Delete a graph once confirmed.
    async remove(name) {
      if (!(await ask(`Delete the graph \u201c${name}\u201d? Its files are removed for good.`))) return;
      try {
        await api("DELETE", `/api/graphs/${encodeURIComponent(name)}`);
        hideMessage();
      } catch (error) {
        showMessage(`Could not delete ${name}: ${error.message}`);
      }
      await this.refresh();
    }

    // The compute form: start a job, then follow it and open its graph when it is done.
    setUpCompute() {
      $("compute-section").hidden = false;
      const model = [this.config.model, this.config.transcoders].filter(Boolean).join(" with ");
      $("compute-hint").textContent = model ? `Runs ${model} on the server in the background.` : "";
      $("compute-form").addEventListener("submit", async (event) => {
        event.preventDefault();
        const prompt = $("compute-prompt").value;
        const name = $("compute-name").value.trim();
        if (!prompt.trim()) return showMessage("Type a prompt to compute its graph.");
        if (name && nameProblem(name)) return showMessage(`Graph name: ${nameProblem(name)}`);
        const body = name ? { prompt, name } : { prompt };
        try {
          const { data } = await api("POST", "/api/jobs", body);
          hideMessage();
          $("compute-prompt").value = "";
          $("compute-name").value = "";
          this.follow({ id: data.id, prompt, state: "queued", stage: "", done: 0, total: 0 }, true);
        } catch (error) {
          showMessage(`Could not start the computation: ${error.message}`);
        }
      });
    }

    // Follow the server's unfinished jobs (started before this page was loaded).
    async resumeJobs() {
      try {
        const { data } = await api("GET", "/api/jobs");
        for (const job of data.jobs) if (isRunning(job)) this.follow(job, false);
      } catch (error) {
        showMessage(`Could not list the running computations: ${error.message}`);
      }
    }

    // Show a job's progress, polling it until it ends; open its graph when done if `open`.
    follow(job, open) {
      const box = el("div", { class: "job", data: { testid: "job", jobId: job.id } });
      $("jobs").prepend(box);
      const poll = async () => {
        try {
          job = (await api("GET", `/api/jobs/${encodeURIComponent(job.id)}`)).data;
        } catch (error) {
          job = Object.assign({}, job, { state: "failed", error: error.message });
        }
        this.renderJob(box, job);
        if (isRunning(job)) setTimeout(poll, POLL_MS);
        else this.finish(job, open);
      };
      this.renderJob(box, job);
      setTimeout(poll, POLL_MS);
    }

    // A job's box: prompt, state with stage and rows done (or the server's message), a progress bar
    // (moving without a total), any error, and cancel while it runs.
    renderJob(box, job) {
      const progress = el("progress", { max: Math.max(job.total || 0, 1), data: { testid: "job-progress" } });
      if (job.total > 0) progress.value = job.done;
      else if (job.state === "done") progress.value = 1;
      const steps = job.total > 0 ? `${job.stage}: ${job.done}/${job.total}` : job.stage;
      const status = [job.state, job.message || steps].filter(Boolean).join(" \u00b7 ");
      const parts = [
        el("div", { class: "job-prompt" }, [job.prompt || ""]),
        el("div", { class: "job-status", data: { testid: "job-status" } }, [status]),
        progress,
      ];
      if (job.error) parts.push(el("div", { class: "job-error" }, [job.error]));
      if (isRunning(job)) {
        const cancel = el("button", { type: "button", data: { testid: "job-cancel" } }, ["Cancel"]);
        cancel.addEventListener("click", () => this.cancel(job));
        parts.push(cancel);
      } else if (job.state === "done" && job.graph) {
        parts.push(el("a", { href: graphPath(job.graph), class: "button" }, ["Open graph"]));
      }
      box.className = `job ${job.state}`;
      box.replaceChildren(...parts);
    }

    // Ask the server to cancel a job.
    async cancel(job) {
      try {
        await api("DELETE", `/api/jobs/${encodeURIComponent(job.id)}`);
      } catch (error) {
        showMessage(`Could not cancel: ${error.message}`);
      }
    }

    // A job ended: open its graph (if asked), or report the failure and refresh the list.
    async finish(job, open) {
      if (job.state === "done" && job.graph && open) {
        location.href = graphPath(job.graph);
        return;
      }
      if (job.state === "failed") showMessage(`The computation failed: ${job.error || "unknown error"}`);
      await this.refresh();
    }
  }

  // Whether a job may still change (queued or running).
  function isRunning(job) {
    return job.state === "queued" || job.state === "running";
  }

  cm.GraphList = GraphList;
})((window.Circuitmap = window.Circuitmap || {}));

// Promptstore admin: live progress without a page reload. Polls the JSON feed for the
// rows (or the task) marked data-live, writes numbers with textContent only, and stops
// when nothing is live. The task page reloads itself once its run finishes, so that the
// chart, the confusion matrix and the error are drawn by the server.
(function () {
  "use strict";
  var pollMs = parseInt(document.body.getAttribute("data-poll-ms"), 10) || 1000;
  var ACTIVE = { queued: true, running: true };

  function pct(v) { return Math.round(100 * v) + " %"; }

  function updateRow(el, t) {
    var p = el.querySelector("[data-field=progress]");
    if (p) { p.value = t.run_progress; }
    var pt = el.querySelector("[data-field=pct]");
    if (pt) { pt.textContent = pct(t.run_progress); }
    var st = el.querySelector("[data-field=status]");
    if (st) { st.textContent = t.status; st.className = "badge s-" + t.status; }
    var rs = el.querySelector("[data-field=run_status]");
    if (rs && t.run_status) { rs.textContent = (el.id === "task" ? "" : "run: ") + t.run_status; }
    var acc = el.querySelector("[data-field=val_accuracy]");
    if (acc && t.val_accuracy !== null) { acc.textContent = (100 * t.val_accuracy).toFixed(1) + " %"; }
    if (!t.live) { el.removeAttribute("data-live"); }
  }

  function pollTasks() {
    var els = document.querySelectorAll("[data-task][data-live]");
    if (!els.length) { return; }
    var byId = {};
    var ids = [];
    els.forEach(function (el) {
      var id = el.getAttribute("data-task");
      (byId[id] = byId[id] || []).push(el);
      if (ids.indexOf(id) < 0) { ids.push(id); }
    });
    fetch("/admin/api/tasks?ids=" + encodeURIComponent(ids.join(",")), { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { if (!r.ok) { throw new Error(r.status); } return r.json(); })
      .then(function (body) {
        body.items.forEach(function (t) {
          (byId[t.id] || []).forEach(function (el) {
            var before = el.getAttribute("data-run-status");
            updateRow(el, t);
            if (el.id === "task" && before && !ACTIVE[t.run_status]) { window.location.reload(); }
          });
        });
      })
      .catch(function () { /* the next tick tries again */ })
      .finally(function () { setTimeout(pollTasks, pollMs); });
  }

  function setStat(name, value) {
    document.querySelectorAll("[data-stat='" + name + "']").forEach(function (el) {
      var fmt = el.getAttribute("data-format");
      if (value === null || value === undefined) {
        el.textContent = fmt === "rate" ? "measuring…" : (fmt === "pct" ? "not reported" : "—");
      } else if (fmt === "rate") { el.textContent = value.toFixed(2) + "/s"; }
      else if (fmt === "pct") { el.textContent = (100 * value).toFixed(1) + " %"; }
      else if (Array.isArray(value)) { el.textContent = value.length ? value.join(", ") : "none seen"; }
      else { el.textContent = String(value); }
    });
  }

  function pollOverview() {
    if (!document.querySelector("[data-overview]")) { return; }
    fetch("/admin/api/overview", { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { if (!r.ok) { throw new Error(r.status); } return r.json(); })
      .then(function (o) {
        Object.keys(o.tasks).forEach(function (k) { setStat("tasks." + k, o.tasks[k]); });
        setStat("tasks_total", o.tasks_total);
        setStat("tenants", o.tenants);
        ["queue_depth", "queue_note", "queued_runs", "running_runs", "workers"].forEach(function (k) { setStat("jobs." + k, o.jobs[k]); });
        setStat("cache.prompts", o.cache.prompts);
        setStat("cache.hit_rate", o.cache.hit_rate);
        ["batches", "images_per_second", "queued_images"].forEach(function (k) { setStat("cache." + k, o.cache[k]); });
        setStat("requests.rate", o.requests.rate);
        setStat("requests.served", o.requests.served);
        setStat("requests.tenant_requests", o.requests.tenant_requests);
      })
      .catch(function () {})
      .finally(function () { setTimeout(pollOverview, 2 * pollMs); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    setTimeout(pollTasks, pollMs);
    setTimeout(pollOverview, 2 * pollMs);
  });
}());

// Promptstore admin: live progress without a page reload. The list pages poll the JSON feed
// for the rows marked data-live and stop when nothing is live. The task page listens to its
// Server-Sent Events feed (/admin/tasks/{id}/events): "state" events move its progress and
// status, every task event is appended to its events table, and the page reloads itself when
// its run starts or finishes, or a version is published or served, or an evaluation is queued
// or done, so that the server draws the charts, tables and actions again. Text is written
// with textContent only.
(function () {
  "use strict";
  var pollMs = parseInt(document.body.getAttribute("data-poll-ms"), 10) || 1000;
  var ACTIVE = { queued: true, running: true };
  // The task page follows its Server-Sent Events feed; without EventSource it polls as the lists do.
  var feedActive = false;

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
    var els = document.querySelectorAll(feedActive ? "[data-task][data-live]:not(#task)" : "[data-task][data-live]");
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

  // Task events after which the page reloads (the server redraws versions and evaluations).
  var RELOAD_ON = { published: true, served: true, evaluation_queued: true, evaluated: true, min_score: true };
  var MAX_EVENT_ROWS = 500;

  function cell(text, cls) {
    var td = document.createElement("td");
    if (cls) { td.className = cls; }
    td.textContent = text;
    return td;
  }

  function appendEvent(e) {
    var body = document.querySelector("#events tbody");
    if (!body || body.querySelector("tr[data-event-id='" + e.id + "']")) { return; }
    var scroller = body.closest(".events-scroll");
    var atEnd = scroller && scroller.scrollTop + scroller.clientHeight >= scroller.scrollHeight - 4;
    var tr = document.createElement("tr");
    tr.setAttribute("data-event-id", String(e.id));
    tr.className = "ev-" + String(e.kind).replace(/[^a-z_]/g, "");
    tr.appendChild(cell(String(e.id), "num sub"));
    tr.appendChild(cell(e.time, "time"));
    var kind = document.createElement("code");
    kind.textContent = e.kind;
    var td = document.createElement("td");
    td.appendChild(kind);
    tr.appendChild(td);
    tr.appendChild(cell(e.text));
    body.appendChild(tr);
    while (body.rows.length > MAX_EVENT_ROWS) { body.deleteRow(0); }
    var empty = document.getElementById("events-empty");
    if (empty) { empty.hidden = true; }
    if (atEnd) { scroller.scrollTop = scroller.scrollHeight; }
  }

  function feedStatus(text, cls) {
    var el = document.getElementById("feed-status");
    if (el) { el.textContent = text; el.className = "feed " + cls; }
  }

  function taskFeed() {
    var el = document.getElementById("task");
    if (!el || !window.EventSource) { return; }
    feedActive = true;
    var id = el.getAttribute("data-task");
    var wasLive = el.hasAttribute("data-live");
    var reloading = false;
    var src = new EventSource("/admin/tasks/" + encodeURIComponent(id) + "/events?after=" +
      encodeURIComponent(el.getAttribute("data-events-after") || "0"));

    function reload() {
      if (reloading) { return; }
      reloading = true;
      src.close();
      feedStatus("live updates: reloading…", "on");
      window.location.reload();
    }

    src.onopen = function () { feedStatus("live updates: on", "on"); };
    src.onerror = function () {
      if (reloading) { return; }
      feedStatus(src.readyState === EventSource.CLOSED ? "live updates: stopped (reload the page)" : "live updates: reconnecting…", "off");
    };
    src.addEventListener("state", function (m) {
      var t = JSON.parse(m.data);
      updateRow(el, t);
      if (Boolean(t.live) !== wasLive) { reload(); }
    });
    src.addEventListener("deleted", function () {
      src.close();
      feedStatus("this task was deleted", "off");
    });
    (el.getAttribute("data-event-kinds") || "").split(",").forEach(function (kind) {
      if (!kind) { return; }
      src.addEventListener(kind, function (m) {
        var e = JSON.parse(m.data);
        appendEvent(e);
        if (kind === "epoch") {
          var ep = document.getElementById("latest-epoch");
          if (ep) { ep.textContent = e.text; }
        }
        if (RELOAD_ON[kind]) { reload(); }
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    taskFeed();
    setTimeout(pollTasks, pollMs);
    setTimeout(pollOverview, 2 * pollMs);
  });
}());

// Keyboard shortcuts for task pages, live stats.
// Plain script, no build step.
(function () {
  "use strict";
  const typing = (el) => el && (el.tagName === "TEXTAREA" || (el.tagName === "INPUT" && el.type === "text") || el.isContentEditable);

  // Prevent double submissions: a form is sent once, then its buttons are disabled.
  document.querySelectorAll("form").forEach((f) => {
    f.addEventListener("submit", () => {
      if (f.dataset.sent) { return; }
      f.dataset.sent = "1";
      setTimeout(() => f.querySelectorAll("button").forEach((b) => (b.disabled = true)), 0);
    });
  });

  const task = document.getElementById("task-form");
  const undo = document.getElementById("undo-form");
  let criterion = 0;
  const criteria = task ? Array.from(task.querySelectorAll(".criterion")) : [];
  const markCriterion = () => criteria.forEach((c, i) => c.classList.toggle("current", i === criterion));
  // Start at the first criterion without a score (a "change" page arrives pre-filled).
  const firstOpen = criteria.findIndex((c) => !c.querySelector("input:checked"));
  criterion = firstOpen < 0 ? 0 : firstOpen;
  markCriterion();
  // Clicking a score makes its criterion the highlighted one.
  criteria.forEach((c, i) => c.addEventListener("change", () => { criterion = i; markCriterion(); }));
  // Free-text forms are sent only with Ctrl+Enter (or the button), never by a stray key.
  const freeText = task && task.querySelector("textarea");

  document.addEventListener("keydown", (e) => {
    if (typing(document.activeElement) && !(e.key === "Enter" && (e.ctrlKey || e.metaKey))) { return; }
    // Undo works on every page that offers it, including the "done" page.
    if (e.key === "u" && undo && !e.ctrlKey && !e.metaKey && !e.altKey) { e.preventDefault(); undo.requestSubmit(); return; }
    if (!task) { return; }
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); task.requestSubmit(); return; }
    if (e.ctrlKey || e.metaKey || e.altKey) { return; }
    const choice = task.querySelector('button[data-key="' + e.key + '"]');
    if (choice) { e.preventDefault(); choice.click(); return; }
    if (criteria.length && (e.key === "ArrowDown" || e.key === "ArrowUp")) {
      e.preventDefault();
      criterion = Math.max(0, Math.min(criteria.length - 1, criterion + (e.key === "ArrowDown" ? 1 : -1)));
      markCriterion();
      return;
    }
    if (criteria.length && /^[0-9]$/.test(e.key)) {
      const radio = criteria[criterion].querySelector('input[value="' + e.key + '"]');
      if (radio) {
        radio.checked = true;
        criterion = Math.min(criterion + 1, criteria.length - 1);
        markCriterion();
      }
      return;
    }
    // Rating forms submit with Enter; pairwise forms only through their choice
    // buttons; free-text forms only with Ctrl+Enter.
    if ((e.key === "Enter" || e.key === "n") && !freeText && !task.querySelector("button[data-key]")) {
      e.preventDefault(); task.requestSubmit();
    }
  });

  // Live agreement stats: refresh the server-rendered fragment every 15 s.
  const stats = document.getElementById("live-stats");
  if (stats && stats.dataset.src) {
    setInterval(() => {
      fetch(stats.dataset.src, { credentials: "same-origin" })
        .then((r) => (r.ok ? r.text() : Promise.reject(r.status)))
        .then((html) => { stats.innerHTML = html; })
        .catch(() => {});
    }, 15000);
  }
})();

// Keyboard shortcuts for task pages, file loading for import forms, live stats.
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
  markCriterion();

  document.addEventListener("keydown", (e) => {
    if (!task) { return; }
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); task.requestSubmit(); return; }
    if (typing(document.activeElement) || e.ctrlKey || e.metaKey || e.altKey) { return; }
    const choice = task.querySelector('button[data-key="' + e.key + '"]');
    if (choice) { e.preventDefault(); choice.click(); return; }
    if (criteria.length && /^[0-9]$/.test(e.key)) {
      const radio = criteria[criterion].querySelector('input[value="' + e.key + '"]');
      if (radio) {
        radio.checked = true;
        criterion = Math.min(criterion + 1, criteria.length - 1);
        markCriterion();
      }
      return;
    }
    // Forms answered with a choice button (pairwise) are only sent by that button.
    if ((e.key === "Enter" || e.key === "n") && !task.querySelector("button[data-key]")) {
      e.preventDefault(); task.requestSubmit(); return;
    }
    if (e.key === "u" && undo) { e.preventDefault(); undo.requestSubmit(); }
  });

  // <input type=file data-into=ID> copies the chosen file's text into textarea #ID.
  document.querySelectorAll("input[type=file][data-into]").forEach((inp) => {
    inp.addEventListener("change", () => {
      const f = inp.files[0];
      if (!f) { return; }
      f.text().then((t) => {
        document.getElementById(inp.dataset.into).value = t;
        const src = document.getElementById(inp.dataset.into + "-name");
        if (src) { src.value = f.name; }
      });
    });
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

// Every table.sortable: click a column head that has data-sort to sort by it (numbers: largest
// first, names: A to Z; click again for the other way; a cell's data-v, when present, is its number).
// The component table (#component-table) also filters: type words in #component-filter to keep the
// rows whose text holds every word. A component's view (#view-<label>, shown by CSS :target) gets
// its top images copied from its table row when it opens; every thumbnail's data URI is written once
// (#thumb-data) and set on the images that show it.
(function () {
  "use strict";
  // Thumbnails: each image's data URI is held once (#thumb-data) and put on every img[data-thumb].
  var held = document.getElementById("thumb-data");
  if (held) {
    var uris = JSON.parse(held.textContent);
    Array.prototype.forEach.call(document.querySelectorAll("img[data-thumb]"), function (img) {
      var uri = uris[img.getAttribute("data-thumb")];
      if (uri) img.src = uri;
    });
  }
  var each = function (list, fn) { Array.prototype.forEach.call(list, fn); };

  function key(row, i) {
    var cell = row.cells[i];
    var v = cell.getAttribute("data-v");
    if (v === null) return cell.textContent.trim().toLowerCase();
    var x = parseFloat(v);
    return isNaN(x) ? -Infinity : x;
  }

  function sortable(table) {
    var body = table.tBodies[0];
    var heads = table.tHead ? table.tHead.rows[0].cells : [];
    each(heads, function (th, i) {
      if (!th.hasAttribute("data-sort")) return;
      th.addEventListener("click", function () {
        var numeric = th.getAttribute("data-sort") === "number";
        var was = th.getAttribute("aria-sort");
        var down = was ? was === "ascending" : numeric;
        each(heads, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", down ? "descending" : "ascending");
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = key(a, i), y = key(b, i);
          var c = x < y ? -1 : x > y ? 1 : 0;
          return down ? -c : c;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  }
  each(document.querySelectorAll("table.sortable"), sortable);

  var table = document.getElementById("component-table");
  if (!table) return;
  var body = table.tBodies[0];
  var box = document.getElementById("component-filter");
  var count = document.getElementById("component-count");
  function filter() {
    var words = box.value.toLowerCase().split(/\s+/).filter(Boolean);
    var shown = 0;
    each(body.rows, function (r) {
      var text = r.textContent.toLowerCase();
      var keep = words.every(function (w) { return text.indexOf(w) >= 0; });
      r.hidden = !keep;
      if (keep) shown += 1;
    });
    count.textContent = shown + " of " + body.rows.length + " components";
  }
  if (box) {
    box.addEventListener("input", filter);
    filter();
  }

  function openView() {
    var view = document.getElementById(decodeURIComponent(location.hash.slice(1)));
    if (!view || !view.classList.contains("compview")) return;
    var slot = view.querySelector("[data-images-of]");
    var row = slot && document.getElementById(slot.getAttribute("data-images-of"));
    if (!row || slot.hasChildNodes()) return;
    each(row.querySelectorAll("td.thumbs img"), function (img) { slot.appendChild(img.cloneNode()); });
  }
  window.addEventListener("hashchange", openView);
  openView();
})();

// The clusters table of the report: click a header to sort by its column, click again to reverse.
// Numbers sort as numbers (from each cell's data-value), NaN and empty cells last.
"use strict";

function sortValue(row, column) {
  const text = row.cells[column].dataset.value;
  const number = Number(text);
  return text === "" || Number.isNaN(number) ? null : number;
}

function sortBy(table, header, column) {
  const ascending = header.dataset.order !== "ascending";
  for (const th of table.tHead.rows[0].cells) delete th.dataset.order;
  header.dataset.order = ascending ? "ascending" : "descending";
  const rows = Array.from(table.tBodies[0].rows);
  rows.sort((a, b) => {
    const x = sortValue(a, column), y = sortValue(b, column);
    if (x === null || y === null) return (x === null) - (y === null);
    return ascending ? x - y : y - x;
  });
  table.tBodies[0].append(...rows);
}

document.addEventListener("DOMContentLoaded", () => {
  const table = document.getElementById("clusters");
  if (!table) return;
  Array.from(table.tHead.rows[0].cells).forEach((header, column) => {
    header.addEventListener("click", () => sortBy(table, header, column));
  });
});

// Upload one file with tus-js-client's parallelUploads (tus concatenation), for
// tests/test_tus_concat.py and bench/bench.py.
// usage: node parallel.mjs ENDPOINT FILE PARALLEL PART_SIZE|split FILENAME
// PART_SIZE: slice boundaries on multiples of it (parallelUploadBoundaries, the last
// slice takes the rest); "split": tus-js-client's own even split (unaligned).
// Prints {"url": ..., "seconds": ...} on success; exits 1 with the error otherwise.
import { readFileSync } from "node:fs";
import { run } from "./run.mjs";

const [endpoint, file, parallel, partSize, filename] = process.argv.slice(2);
const data = readFileSync(file);
const n = Number(parallel);
const options = {
  endpoint,
  metadata: { filename, filetype: "application/octet-stream" },
  parallelUploads: n,
  retryDelays: [100, 500, 1000, 2000],
};
if (partSize !== "split") {
  const part = Number(partSize);
  const perSlice = Math.ceil(data.length / part / n) * part;
  const bounds = [];
  for (let start = 0; start < data.length; start += perSlice) {
    bounds.push({ start, end: Math.min(start + perSlice, data.length) });
  }
  options.parallelUploadBoundaries = bounds;
  options.parallelUploads = bounds.length;
}
const started = process.hrtime.bigint();
run(data, options, () => ({
  seconds: Number(process.hrtime.bigint() - started) / 1e9,
}));

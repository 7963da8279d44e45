// Upload one file with tus-js-client (the real npm package), for tests/test_tus_clients.py.
// usage: node upload.mjs ENDPOINT FILE CHUNK_SIZE|inf FILENAME
// Prints {"url": ...} on success; exits 1 with the error otherwise.
import { readFileSync } from "node:fs";
import { run } from "./run.mjs";

const [endpoint, file, chunk, filename] = process.argv.slice(2);
const data = readFileSync(file);
const options = {
  endpoint,
  metadata: { filename, filetype: "application/octet-stream" },
  retryDelays: [100, 500, 1000],
};
if (chunk !== "inf") options.chunkSize = Number(chunk);

run(data, options);

// Upload one file with tus-js-client speaking the IETF resumable-upload draft, for
// tests/test_ietf_resumable.py.
// usage: node upload_ietf.mjs ENDPOINT FILE CHUNK_SIZE|inf FILENAME PROTOCOL
// PROTOCOL is tus-js-client's option: ietf-draft-03 (interop 5) or ietf-draft-05 (6).
// Prints {"url": ..., "retries": n} on success; exits 1 with the error otherwise.
import { readFileSync } from "node:fs";
import { run } from "./run.mjs";

const [endpoint, file, chunk, filename, protocol] = process.argv.slice(2);
const data = readFileSync(file);
let retries = 0;
const options = {
  endpoint,
  protocol,
  metadata: { filename, filetype: "application/octet-stream" },
  retryDelays: [100, 200, 500, 1000, 1000],
  onShouldRetry: (err) => {
    retries += 1;
    const status = err.originalResponse ? err.originalResponse.getStatus() : 0;
    return !(status >= 400 && status < 500) || status === 409 || status === 423;
  },
};
if (chunk !== "inf") options.chunkSize = Number(chunk);

run(data, options, () => ({ retries }));

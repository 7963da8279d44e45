// Upload one file with tus-js-client (the real npm package), for tests/test_tus_clients.py.
// usage: node upload.mjs ENDPOINT FILE CHUNK_SIZE|inf FILENAME
// Prints {"url": ...} on success; exits 1 with the error otherwise.
import { readFileSync } from "node:fs";
import { Upload } from "tus-js-client";

const [endpoint, file, chunk, filename] = process.argv.slice(2);
const data = readFileSync(file);
const options = {
  endpoint,
  metadata: { filename, filetype: "application/octet-stream" },
  retryDelays: [100, 500, 1000],
};
if (chunk !== "inf") options.chunkSize = Number(chunk);

const upload = new Upload(data, {
  ...options,
  onError: (err) => {
    console.error(String(err));
    process.exit(1);
  },
  onSuccess: () => {
    console.log(JSON.stringify({ url: upload.url }));
  },
});
upload.start();

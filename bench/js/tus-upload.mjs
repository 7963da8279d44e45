// The bench's tus client: tus-js-client (pinned in package-lock.json), reading the file
// from disk with its Node file reader (an fs.ReadStream: each PATCH re-opens the file
// at its offset, nothing is held in memory).
// usage: node tus-upload.mjs ENDPOINT FILE CHUNK_BYTES|inf COUNT [PARALLEL PART_BYTES]
// PARALLEL > 1: parallelUploads (tus concatenation) with slice boundaries on multiples
// of PART_BYTES (the server's part size), so the server completes the final upload
// without a copy.
// Starts COUNT uploads of FILE at once and prints one JSON line:
//   {"seconds": first start to last success, "patches": PATCH requests answered,
//    "urls": [upload URL, ...]}
// Exits 1 with the error on stderr if any upload fails (no retries: a bench must not
// hide a failure behind a retry).
import { createReadStream, statSync } from "node:fs";
import { performance } from "node:perf_hooks";
import { Upload } from "tus-js-client";

const [endpoint, file, chunk, count, parallel, part] = process.argv.slice(2);
let patches = 0;

function slices() {
  const n = Number(parallel || 1);
  if (n <= 1) return {};
  const size = statSync(file).size;
  const step = Math.ceil(size / Number(part) / n) * Number(part);
  const bounds = [];
  for (let start = 0; start < size; start += step) {
    bounds.push({ start, end: Math.min(start + step, size) });
  }
  return { parallelUploads: bounds.length, parallelUploadBoundaries: bounds };
}

function one() {
  return new Promise((resolve, reject) => {
    const upload = new Upload(createReadStream(file), {
      endpoint,
      metadata: { filename: "bench.bin", filetype: "application/octet-stream" },
      retryDelays: null,
      ...(chunk === "inf" ? {} : { chunkSize: Number(chunk) }),
      ...slices(),
      onAfterResponse: (req) => {
        if (req.getMethod() === "PATCH") patches += 1;
      },
      onError: reject,
      onSuccess: () => resolve(upload.url),
    });
    upload.start();
  });
}

const t0 = performance.now();
try {
  const urls = await Promise.all(Array.from({ length: Number(count) }, one));
  const seconds = (performance.now() - t0) / 1000;
  console.log(JSON.stringify({ seconds, patches, urls }));
} catch (err) {
  console.error(String(err));
  process.exit(1);
}

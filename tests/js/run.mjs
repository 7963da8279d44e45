// What every tus-js-client script here shares: start the upload, print one JSON line
// {"url": ..., ...extra()} on success, exit 1 with the error otherwise.
import { Upload } from "tus-js-client";

export function run(data, options, extra = () => ({})) {
  const upload = new Upload(data, {
    ...options,
    onError: (err) => {
      console.error(String(err));
      process.exit(1);
    },
    onSuccess: () => {
      console.log(JSON.stringify({ url: upload.url, ...extra() }));
    },
  });
  upload.start();
}

// The peer the proxy is compared with: @tus/server + @tus/s3-store (versions pinned in
// package-lock.json), pointed at the bench's SeaweedFS.  Everything else is the packages'
// defaults; S3Store buffers each part in a file under os.tmpdir() ($TMPDIR), which the
// bench measures.
// usage: AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \
//        node peer-server.mjs PORT S3_ENDPOINT BUCKET PART_SIZE_BYTES
// Prints "listening" once the port is open.
import { S3Store } from "@tus/s3-store";
import { Server } from "@tus/server";

const [port, endpoint, bucket, partSize] = process.argv.slice(2);
const server = new Server({
  path: "/files",
  datastore: new S3Store({
    partSize: Number(partSize),
    s3ClientConfig: {
      bucket,
      endpoint,
      region: "us-east-1",
      forcePathStyle: true,
      credentials: {
        accessKeyId: process.env.AWS_ACCESS_KEY_ID,
        secretAccessKey: process.env.AWS_SECRET_ACCESS_KEY,
      },
      // As the proxy's botocore config (request_checksum_calculation="when_required"):
      // no CRC32 per request that the proxy, with part_checksum = "none", does not pay.
      requestChecksumCalculation: "WHEN_REQUIRED",
    },
  }),
});
server.listen({ host: "127.0.0.1", port: Number(port) }, () => console.log("listening"));

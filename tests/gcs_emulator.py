"""gcp-storage-emulator, in memory on 127.0.0.1, plus the one GCS behaviour tensorstore needs that it lacks.

    python tests/gcs_emulator.py PORT BUCKET

GCS answers every object download with `x-goog-generation` (the object's generation). tensorstore's OCDBT driver
(orbax's checkpoint format) reads its manifest's generation from that header and makes it the precondition of its
next write; without it the write fails with "Malformed StorageGeneration". This adds the header; the generation is
the one the emulator already reports in the object's metadata.
"""

import sys

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    """The emulator's download, with the object's generation headers as GCS sends them."""
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
        pass
    else:
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])
    return _download(request, response, storage, *args, **kwargs)


def main(port: int, bucket: str) -> None:
    """Serves until killed."""
    objects.download = download  # objects.get (alt=media) calls it by name
    for _, handlers in server.HANDLERS:
        for method, handler in handlers.items():
            if handler is _download:
                handlers[method] = download
    emulator = server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    emulator.run()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])

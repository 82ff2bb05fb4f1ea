#!/usr/bin/env python3
"""Writes an OCI image (an OCI layout in a tar, what `ctr images import` reads) from
directories, one layer per directory, without a container engine.

    oci_image.py --out IMAGE.tar --name REF [--entrypoint JSON] [--cmd JSON] [--user U]
                 [--env K=V]... [--workdir DIR] [--label K=V]... DIR [DIR...]

Layers are uncompressed, reproducible tars: entries sorted, times zeroed, owners as the files
have them (so stage them with the owners the image needs). Prints the manifest's digest.
"""

import argparse
import hashlib
import io
import json
import os
import tarfile


def layer_bytes(root):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        paths = []
        for directory, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(dirs + files):
                paths.append(os.path.join(directory, name))
        for path in sorted(paths, key=lambda p: os.path.relpath(p, root)):
            info = tar.gettarinfo(path, arcname=os.path.relpath(path, root))
            info.mtime = 0
            info.uname = info.gname = ""
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return buffer.getvalue()


def blob(blobs, data, media_type):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--name", required=True, help="full reference, e.g. docker.io/x/y:tag")
    parser.add_argument("--entrypoint")
    parser.add_argument("--cmd")
    parser.add_argument("--user")
    parser.add_argument("--workdir")
    parser.add_argument("--env", action="append", default=[])
    parser.add_argument("--label", action="append", default=[])
    parser.add_argument("layers", nargs="+")
    args = parser.parse_args()

    blobs = {}
    layers, diff_ids = [], []
    for root in args.layers:
        data = layer_bytes(root)
        descriptor = blob(blobs, data, "application/vnd.oci.image.layer.v1.tar")
        layers.append(descriptor)
        diff_ids.append(descriptor["digest"])
    config = {}
    if args.entrypoint:
        config["Entrypoint"] = json.loads(args.entrypoint)
    if args.cmd:
        config["Cmd"] = json.loads(args.cmd)
    if args.user:
        config["User"] = args.user
    if args.workdir:
        config["WorkingDir"] = args.workdir
    if args.env:
        config["Env"] = args.env
    if args.label:
        config["Labels"] = dict(item.split("=", 1) for item in args.label)
    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    config_descriptor = blob(
        blobs,
        json.dumps(image_config, sort_keys=True, separators=(",", ":")).encode(),
        "application/vnd.oci.image.config.v1+json",
    )
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_descriptor,
        "layers": layers,
    }
    manifest_descriptor = blob(
        blobs,
        json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode(),
        "application/vnd.oci.image.manifest.v1+json",
    )
    manifest_descriptor["annotations"] = {
        "io.containerd.image.name": args.name,
        "org.opencontainers.image.ref.name": args.name.rsplit(":", 1)[1],
    }
    manifest_descriptor["platform"] = {"architecture": "amd64", "os": "linux"}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [manifest_descriptor]}

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(data))

    tmp = args.out + ".tmp"
    with tarfile.open(tmp, mode="w") as tar:
        add(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add(tar, "index.json", json.dumps(index, sort_keys=True).encode())
        for digest, data in sorted(blobs.items()):
            add(tar, "blobs/sha256/" + digest.split(":", 1)[1], data)
    os.replace(tmp, args.out)
    print(manifest_descriptor["digest"])


if __name__ == "__main__":
    main()

"""Builds a small OCI image from a static busybox and pushes it to a registry
over the distribution API (plain HTTP, loopback only), for bench/runtime.sh.

    python3 bench/oci-image.py 127.0.0.1:PORT REPOSITORY:TAG
"""
import gzip, hashlib, io, json, sys, tarfile, urllib.request

registry, name = sys.argv[1], sys.argv[2]
repo, tag = name.rsplit(":", 1)


def add(tar, path, data=None, mode=0o755):
    info = tarfile.TarInfo(path)
    info.mtime = 1_700_000_000
    if data is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
    else:
        info.size, info.mode = len(data), mode
        tar.addfile(info, io.BytesIO(data))


raw = io.BytesIO()
with tarfile.open(fileobj=raw, mode="w") as tar:
    for d in ["bin", "etc", "srv", "srv/www"]:
        add(tar, d)
    add(tar, "bin/busybox", open("/bin/busybox", "rb").read())
    add(tar, "srv/www/index.html", b"served from an image\n", 0o644)
layer = gzip.compress(raw.getvalue(), mtime=0)
digest = lambda b: "sha256:" + hashlib.sha256(b).hexdigest()
config = json.dumps({
    "architecture": "amd64", "os": "linux",
    "config": {"Cmd": ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/srv/www"], "Env": ["PATH=/bin"]},
    "rootfs": {"type": "layers", "diff_ids": [digest(raw.getvalue())]},
}).encode()


def request(method, url, body=b"", headers=None):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    return urllib.request.urlopen(req)


base = f"http://{registry}/v2/{repo}"
for blob in (layer, config):
    location = request("POST", f"{base}/blobs/uploads/").headers["Location"]
    if location.startswith("/"):
        location = f"http://{registry}{location}"
    sep = "&" if "?" in location else "?"
    request("PUT", f"{location}{sep}digest={digest(blob)}", blob,
            {"Content-Type": "application/octet-stream"})
manifest = json.dumps({
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(config), "size": len(config)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest(layer), "size": len(layer)}],
}).encode()
request("PUT", f"{base}/manifests/{tag}", manifest,
        {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
print(f"{len(layer)} bytes of layer")

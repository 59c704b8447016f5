"""A loopback Hugging Face Hub for contract tests, written from the Hub's documented HTTP
API (huggingface.co/docs/hub/api, the Git LFS batch API that the Hub serves for large
files, and the commit endpoint `huggingface_hub` documents), not from our client:

- `POST /api/repos/create` {name, organization, type, private or visibility}: 200
  {url}; 409 when the
  repository exists. A new repository holds one commit with `.gitattributes`, whose
  patterns send matching files (Parquet among them) to LFS.
- `GET /api/{type}s/{repo}/tree/{revision}[/{path}]?recursive=`: files and folders,
  1,000 entries a page with a `Link: <...>; rel="next"` header for the next; a file's
  `oid` is its git blob id, an LFS file's `lfs.oid` the content's sha256.
- `POST /api/{type}s/{repo}/preupload/{revision}` {files: [{path, sample, size}]}: each
  file's `uploadMode` ("lfs" when `.gitattributes` matches it, it is over 10 MB or its
  sample is binary; else "regular"), `shouldIgnore`, and the `oid` of the file the
  revision holds at that path.
- `POST /{type}s/{repo}.git/info/lfs/objects/batch` (operation "upload"): per object, an
  `upload` action (a PUT of the bytes to a pre-signed URL, which takes no
  Authorization) and a `verify` action, or no actions when the store already holds the
  object; the PUT is refused unless the bytes hash to the oid.
- `POST /api/validate-yaml` {content, repoType}: 400 on a card whose metadata is not
  YAML.
- `POST /api/{type}s/{repo}/commit/{revision}` (NDJSON: header, file, lfsFile,
  deletedFile, deletedFolder): applied whole or not at all; an `lfsFile` whose object
  the store does not hold is refused.
- `GET /api/{type}s/{repo}/revision/{revision}`: the repository's info.
Every request needs `Authorization: Bearer TOKEN` (401 otherwise); a private
repository is not found without it.
"""
from __future__ import annotations

import base64
import fnmatch
import hashlib
import http.server
import json
import threading
import urllib.parse

import yaml

GITATTRIBUTES = b"".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n".encode()
                         for pattern in ("*.parquet", "*.arrow", "*.bin", "*.gz", "*.zip",
                                         "*.tar", "*.pkl", "*.npy", "*.safetensors"))
LFS_ABOVE_BYTES = 10 * 1024 * 1024
PAGE = 1000


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\n"
            f"size {size}\n").encode()


class Repo:
    def __init__(self, private: bool):
        self.private = private
        self.files: dict[str, dict] = {".gitattributes": {"content": GITATTRIBUTES}}
        self.commits = [hashlib.sha1(b"initial").hexdigest()]

    def lfs_patterns(self) -> list[str]:
        text = self.files.get(".gitattributes", {}).get("content", b"").decode()
        return [line.split()[0] for line in text.splitlines()
                if "filter=lfs" in line and line.strip()]

    def entry(self, path: str) -> dict:
        file = self.files[path]
        if "lfs" in file:
            pointer = lfs_pointer(file["lfs"], file["size"])
            return {"type": "file", "path": path, "size": file["size"],
                    "oid": git_blob_id(pointer),
                    "lfs": {"oid": file["lfs"], "size": file["size"],
                            "pointerSize": len(pointer)}}
        return {"type": "file", "path": path, "size": len(file["content"]),
                "oid": git_blob_id(file["content"])}


class HubServer:
    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        # LFS objects by repository: the batch API answers for one repository's.
        self.lfs_store: dict[tuple[str, str], bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        # A test holds commits here to kill the client while one is under way.
        self.hold_commits = threading.Event()
        self.commit_arrived = threading.Event()
        self.release_commit = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with server.lock:
                    server.requests.append((self.command, self.path))
                status, payload, headers = server.handle(self.command, self.path,
                                                         dict(self.headers), body)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Type", headers.get(
                    "Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_HEAD = _handle

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client killed mid-request (the kill test) is not the server's fault

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()

    def reset_log(self):
        with self.lock:
            self.requests.clear()

    def count(self, method: str, part: str) -> int:
        return sum(1 for m, path in self.requests if m == method and part in path)

    # -- the API

    def handle(self, method, raw_path, headers, body):
        url = urllib.parse.urlsplit(raw_path)
        path, query = urllib.parse.unquote(url.path), urllib.parse.parse_qs(url.query)
        if method == "PUT" and path.startswith("/lfs-upload/"):
            # A pre-signed URL, as the Hub's storage hands out: no Authorization.
            where = urllib.parse.urlsplit(raw_path).path[len("/lfs-upload/"):]
            if (query.get("signature") or [""])[0] != self._signature(where):
                return 403, {"error": "SignatureDoesNotMatch"}, {}
            repo_id, oid = urllib.parse.unquote(where).rsplit("/", 1)
            return self._lfs_put(repo_id, oid, body)
        authorization = headers.get("Authorization") or headers.get("authorization") or ""
        if authorization != f"Bearer {self.token}":
            return 401, {"error": "Invalid credentials in Authorization header"}, {}
        if method == "POST" and path.startswith("/lfs-verify/"):
            repo_id = path[len("/lfs-verify/"):].rsplit("/", 1)[0]
            found = (repo_id, json.loads(body).get("oid")) in self.lfs_store
            return (200, {}, {}) if found else (404, {"error": "Object not found"}, {})
        if method == "POST" and path == "/api/repos/create":
            return self._create(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body))
        if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            repo_id = path[1:-len(".git/info/lfs/objects/batch")].split("/", 1)[1]
            return self._with_repo(repo_id, lambda repo: self._lfs_batch(
                repo_id, json.loads(body)))
        for route in ("tree", "preupload", "commit", "revision"):
            marker = f"/{route}/"
            if path.startswith("/api/") and marker in path:
                head, _, rest = path.partition(marker)
                repo_id = head.split("/", 3)[3]
                return self._with_repo(repo_id, lambda repo: getattr(self, f"_{route}")(
                    repo_id, repo, method, rest, query, body))
        return 404, {"error": f"no route {method} {path}"}, {}

    def _with_repo(self, repo_id, then):
        repo = self.repos.get(repo_id)
        if repo is None:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        return then(repo)

    def _create(self, request):
        name = request["name"]
        repo_id = f"{request.get('organization') or 'me'}/{name}" if "/" not in name \
            else name
        url = f"{self.endpoint}/datasets/{repo_id}"
        with self.lock:
            if repo_id in self.repos:
                return 409, {"error": "You already created this dataset repo",
                             "url": url}, {}
            # `private` (a boolean) or, in the newer form, `visibility`.
            self.repos[repo_id] = Repo(bool(request.get("private")) or request.get(
                "visibility") in ("private", "protected"))
        return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

    def _validate_yaml(self, request):
        content = request.get("content") or ""
        if content.startswith("---"):
            try:
                yaml.safe_load(content.split("---", 2)[1])
            except yaml.YAMLError as error:
                return 400, {"error": f"Invalid metadata in README.md: {error}"}, {}
        return 200, {"warnings": []}, {}

    def _tree(self, repo_id, repo, method, rest, query, body):
        revision, _, under = rest.partition("/")
        recursive = (query.get("recursive") or ["false"])[0].lower() == "true"
        entries, folders = [], set()
        for path in sorted(repo.files):
            if under and not path.startswith(under.rstrip("/") + "/"):
                continue
            relative = path[len(under.rstrip("/")) + 1:] if under else path
            parts = relative.split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(parts[:depth])
                if folder not in folders and (recursive or depth == 1):
                    folders.add(folder)
                    entries.append({"type": "directory", "size": 0,
                                    "oid": hashlib.sha1(folder.encode()).hexdigest(),
                                    "path": f"{under.rstrip('/')}/{folder}" if under
                                    else folder})
            if recursive or len(parts) == 1:
                entries.append(repo.entry(path))
        start = int((query.get("cursor") or ["0"])[0])
        page = entries[start:start + PAGE]
        headers = {}
        if start + PAGE < len(entries):
            headers["Link"] = (f"<{self.endpoint}/api/datasets/{repo_id}/tree/{revision}"
                               f"?recursive={str(recursive).lower()}&cursor="
                               f"{start + PAGE}>; rel=\"next\"")
        return 200, page, headers

    def _preupload(self, repo_id, repo, method, rest, query, body):
        patterns = repo.lfs_patterns()
        answers = []
        for file in json.loads(body)["files"]:
            sample = base64.b64decode(file["sample"])
            lfs = (any(fnmatch.fnmatch(file["path"].rsplit("/", 1)[-1], p) for p in patterns)
                   or file["size"] > LFS_ABOVE_BYTES or b"\0" in sample)
            held = repo.entry(file["path"]) if file["path"] in repo.files else None
            answers.append({"path": file["path"], "uploadMode": "lfs" if lfs else "regular",
                            "shouldIgnore": False,
                            "oid": (held["lfs"]["oid"] if held and "lfs" in held
                                    else held["oid"] if held else None)})
        return 200, {"files": answers, "commitOid": repo.commits[-1]}, {}

    def _lfs_batch(self, repo_id, request):
        if request.get("operation") != "upload":
            return 422, {"message": "only uploads here"}, {}
        objects = []
        for wanted in request["objects"]:
            oid, size = wanted["oid"], wanted["size"]
            entry = {"oid": oid, "size": size, "authenticated": True}
            if (repo_id, oid) not in self.lfs_store:
                where = f"{urllib.parse.quote(repo_id, safe='')}/{oid}"
                entry["actions"] = {
                    "upload": {"href": f"{self.endpoint}/lfs-upload/{where}"
                                       f"?signature={self._signature(where)}",
                               "expires_in": 3600},
                    "verify": {"href": f"{self.endpoint}/lfs-verify/{where}",
                               "expires_in": 3600}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}, {
            "Content-Type": "application/vnd.git-lfs+json"}

    def _signature(self, where: str) -> str:
        return hashlib.sha256(f"{self.token}:{where}".encode()).hexdigest()[:32]

    def _lfs_put(self, repo_id, oid, body):
        if hashlib.sha256(body).hexdigest() != oid:
            return 400, {"error": "the uploaded bytes do not hash to the object id"}, {}
        with self.lock:
            self.lfs_store[(repo_id, oid)] = body
        return 200, {}, {}

    def _commit(self, repo_id, repo, method, rest, query, body):
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return 400, {"error": "the first line must be the commit's header"}, {}
        if self.hold_commits.is_set():
            self.commit_arrived.set()
            self.release_commit.wait(60)
            return 503, {"error": "Service Unavailable"}, {}
        changes: dict[str, dict | None] = {}
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                changes[value["path"]] = {"content": base64.b64decode(value["content"])}
            elif line["key"] == "lfsFile":
                if (repo_id, value["oid"]) not in self.lfs_store:
                    return 422, {"error": f"LFS object {value['oid']} of {value['path']} "
                                 "was never uploaded"}, {}
                changes[value["path"]] = {"lfs": value["oid"], "size": len(
                    self.lfs_store[(repo_id, value["oid"])])}
            elif line["key"] in ("deletedFile", "deletedFolder"):
                doomed = [p for p in repo.files if p == value["path"]
                          or p.startswith(value["path"].rstrip("/") + "/")]
                if not doomed:
                    return 404, {"error": "A file with this name doesn't exist"}, {
                        "X-Error-Code": "EntryNotFound"}
                changes.update({p: None for p in doomed})
        with self.lock:
            for path, file in changes.items():
                if file is None:
                    repo.files.pop(path, None)
                else:
                    repo.files[path] = file
            oid = hashlib.sha1(body + repo.commits[-1].encode()).hexdigest()
            repo.commits.append(oid)
        return 200, {"success": True, "commitOid": oid,
                     "commitUrl": f"{self.endpoint}/datasets/{repo_id}/commit/{oid}",
                     "hookOutput": ""}, {}

    def _revision(self, repo_id, repo, method, rest, query, body):
        return 200, {"id": repo_id, "sha": repo.commits[-1], "private": repo.private,
                     "siblings": [{"rfilename": p} for p in sorted(repo.files)]}, {}

    # -- what a test reads

    def content(self, repo_id: str, path: str) -> bytes:
        file = self.repos[repo_id].files[path]
        return self.lfs_store[(repo_id, file["lfs"])] if "lfs" in file else file["content"]

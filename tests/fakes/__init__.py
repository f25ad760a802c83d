"""Fake remote services for the tests: real HTTP servers on 127.0.0.1 (a free port each), run
on a thread, that log every request they get (`server.log`), so tests can assert on what our
clients actually sent: which headers reached which host, how many requests, how many bytes.

- `loopback`: the server and its request log.
- `files`: a storage host (Civitai's signed URLs, the Hub's LFS CDN): ETags, Range, If-Range,
  Content-Disposition, and on demand a slow body, a stall or a connection dropped mid-body.
- `civitai`: Civitai's API in its real JSON shapes, with its refusals (401, 403 early access,
  404, 410, 429) and its download endpoint's 307 to the storage host.
- `hub`: what huggingface_hub asks of the Hub (model info, tree, paths-info, resolve).
"""

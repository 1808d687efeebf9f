"""
Resumable uploads kept in the object store, so that a client may resume on
any node of the pool: the storage side of tus (tusd's DataStore). The HTTP
side, gridnode/web/tus.py, maps tus headers and status codes onto
`gridnode.uploads.store.UploadStore`. A finished upload becomes a job whose
id is the upload's id.

Why it is built this way:

- Every chunk (a PATCH body, or a creation POST's) goes into a chunk file of
  its own in the spool (`files.Chunk`): never into memory. A chunk that
  fails its checksum, or loses a race with another request, is dropped by
  removing one file; a chunk cut off mid-way keeps what arrived (tus resume
  depends on that).
- The store is the truth (`info`): ``uploads/<id>/info`` (JSON: length,
  offset, metadata, expiry, the list of parts) and
  ``uploads/<id>/part-NNNNN-<nonce>`` per committed chunk. A commit writes
  its part, then the info on the condition of the ETag it read: that write
  is the commit point. A part the info does not list is never read, and a
  fresh nonce per attempt means a losing writer never overwrites the
  winner's bytes.
- Locally ``<id>.partial`` holds the parts this node has, in order
  (`files.LocalCopy`); a node that meets an upload for the first time
  fetches the missing parts into it (catch-up) before appending. The final
  chunk is never stored: the partial file becomes the job's spool file and
  is submitted. A node that dies meanwhile leaves the upload one chunk
  short, which the client simply sends again.
- Commits of one upload are serialized on this node, and a look at its
  progress waits for them, so the offset includes a chunk just cut off.
"""

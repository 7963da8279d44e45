// The page's uploads: one tus-js-client Upload per file, a few files at a time, with this
// page's own retry loop instead of tus-js-client's fixed `retryDelays`, because the page
// must honour the server's Retry-After (503/429), not count attempts while the device is
// offline, give up only after many attempts *without progress*, and show a countdown.
// No DOM here: app.js renders the items.

import * as tus from 'tus-js-client'
import { classify, parseErrorBody, parseRetryAfter, retryDelayMs } from './errors.js'
import { refusal } from './policy.js'

// Files sent at once.  Each costs the server three part buffers; a phone's uplink is
// better spent on few files than on many half-done ones.
export const PARALLEL_FILES = 3
// Consecutive failed attempts with no byte accepted in between before a file is given up
// (the sender can press Retry).  With the 20 s cap that is a few minutes of trying.
const MAX_ATTEMPTS_WITHOUT_PROGRESS = 10
// No upload progress event for this long while a chunk is being sent: the connection is
// dead without saying so (a phone that changed networks).  Once a chunk is sent the
// server may take a while to answer the last one (it completes the object), hence longer.
const STALL_SENDING_MS = 120000
const STALL_ANSWER_MS = 600000
const RATE_WINDOW_MS = 5000
// Resume entries this page stored and never used again are dropped after this long (the
// server forgets unfinished uploads long before).
const RESUME_ENTRY_MAX_AGE_MS = 30 * 86400 * 1000
const FINGERPRINT_TAG = 'upl1'

// States an item goes through; app.js shows them (data-state) and tests read them.
// Items in SLOT_STATES hold one of the PARALLEL_FILES slots.
const SLOT_STATES = new Set(['starting', 'sending', 'waiting', 'offline'])
const OVER_STATES = new Set(['refused', 'cancelled'])

let lastItemId = 0

export class Item {
  constructor(file) {
    lastItemId += 1
    this.id = lastItemId
    this.file = file
    this.state = 'queued'
    this.sent = 0 // bytes sent, including what the server had before
    this.acked = 0 // bytes the server confirmed
    this.resumedFrom = null // the server's offset when an earlier upload was resumed
    this.confirmed = false // a chunk sent by this page was accepted
    this.sha256 = null
    this.code = null
    this.message = ''
    this.retryAt = null
    this.attempts = 0
    this.ackedAtLastFailure = 0
    this.lastActivityMs = 0
    this.samples = []
    this.upload = null
    this.timer = null
  }

  get done() {
    return this.state === 'done'
  }

  note(nowMs) {
    this.lastActivityMs = nowMs
    this.samples.push([nowMs, this.sent])
    while (this.samples.length > 2 && nowMs - this.samples[0][0] > RATE_WINDOW_MS) this.samples.shift()
  }

  /** Bytes per second over the last few seconds of sending; 0 when not sending. */
  rate(nowMs) {
    if (this.state !== 'sending' || this.samples.length < 2) return 0
    const [t0, b0] = this.samples[0]
    const dt = (nowMs - t0) / 1000
    return dt >= 0.5 ? Math.max(0, (this.sent - b0) / dt) : 0
  }
}

/** The resume key: the file as the browser sees it, and which link and endpoint. */
export function fingerprint(link, file) {
  return [FINGERPRINT_TAG, link.prefix || '', link.tus_endpoint, file.name, file.type, file.size, file.lastModified].join('|')
}

/**
 * Unfinished uploads a visit to this link left in this browser: [{name, size, startedMs}].
 * Old entries of this page are dropped on the way.
 */
export async function earlierUploads(link, nowMs = Date.now()) {
  const storage = tus.defaultOptions.urlStorage
  const mine = `tus::${[FINGERPRINT_TAG, link.prefix || '', link.tus_endpoint].join('|')}|`
  const found = []
  for (const entry of await storage.findAllUploads()) {
    const key = entry.urlStorageKey || ''
    if (!key.startsWith(`tus::${FINGERPRINT_TAG}|`)) continue
    const startedMs = Date.parse(entry.creationTime || '')
    if (!(nowMs - startedMs < RESUME_ENTRY_MAX_AGE_MS)) {
      await storage.removeUpload(key)
      continue
    }
    if (key.startsWith(mine)) {
      found.push({ name: (entry.metadata || {}).filename || '?', size: entry.size, startedMs })
    }
  }
  return found
}

export class Uploads {
  /**
   * link: the link info from api/link; credential: what goes after "Bearer ".
   * onChange(item | null): something to render; onLinkDead({code, message}).
   */
  constructor({ link, credential, onChange, onLinkDead, clock = () => Date.now() }) {
    this.link = link
    this.credential = credential
    this.onChange = onChange
    this.onLinkDead = onLinkDead
    this.clock = clock
    this.items = []
    this.online = true
    this.dead = null
    this.watchdog = null
  }

  /** Take files on: refused at once when the link's limits say no, else queued. */
  add(files) {
    const added = []
    for (const file of files) {
      const same = this.items.find(
        (i) =>
          i.file.name === file.name &&
          i.file.size === file.size &&
          i.file.lastModified === file.lastModified &&
          !['failed', 'refused', 'cancelled'].includes(i.state),
      )
      if (same) continue
      const item = new Item(file)
      const taken = this.items.filter((i) => !['failed', 'refused', 'cancelled'].includes(i.state)).length
      const no = this.dead || refusal(this.link, file, taken)
      if (no) {
        item.state = 'refused'
        item.code = no.code
        item.message = no.message
      }
      this.items.push(item)
      added.push(item)
    }
    this.pump()
    this.onChange(null)
    return added
  }

  pause(item) {
    if (!SLOT_STATES.has(item.state) && item.state !== 'queued') return
    this.halt(item)
    item.state = 'paused'
    item.message = ''
    this.pump()
    this.onChange(item)
  }

  resume(item) {
    if (!['paused', 'failed'].includes(item.state) || this.dead) return
    item.state = 'queued'
    item.attempts = 0
    item.message = ''
    item.code = null
    this.pump()
    this.onChange(item)
  }

  /** Stop a file and delete what the server has of it. */
  cancel(item) {
    if (item.done || OVER_STATES.has(item.state)) return
    const upload = item.upload
    this.halt(item)
    if (upload && upload.url) upload.abort(true).catch(() => {})
    item.state = 'cancelled'
    this.pump()
    this.onChange(item)
  }

  pauseAll() {
    for (const item of this.items) this.pause(item)
  }

  resumeAll() {
    for (const item of this.items) if (item.state === 'paused') this.resume(item)
  }

  /** navigator.onLine went false/true: hold the running files, then carry on. */
  setOnline(online) {
    this.online = online
    for (const item of this.items) {
      if (!online && ['starting', 'sending', 'waiting'].includes(item.state)) {
        this.halt(item)
        item.state = 'offline'
        this.onChange(item)
      } else if (online && item.state === 'offline') {
        this.begin(item)
      }
    }
    if (online) this.pump()
  }

  totals() {
    const now = this.clock()
    let size = 0
    let sent = 0
    let rate = 0
    let files = 0
    let done = 0
    let active = 0
    for (const item of this.items) {
      if (OVER_STATES.has(item.state)) continue
      files += 1
      size += item.file.size
      sent += item.done ? item.file.size : Math.min(item.sent, item.file.size)
      rate += item.rate(now)
      if (item.done) done += 1
      if (SLOT_STATES.has(item.state) || item.state === 'queued') active += 1
    }
    const etaS = rate > 0 ? (size - sent) / rate : null
    return { size, sent, rate, etaS, files, done, active }
  }

  // -- internals -------------------------------------------------------------------------

  pump() {
    if (this.dead || !this.online) return
    let running = this.items.filter((i) => SLOT_STATES.has(i.state)).length
    for (const item of this.items) {
      if (running >= PARALLEL_FILES) break
      if (item.state !== 'queued') continue
      running += 1
      this.begin(item)
    }
    this.ensureWatchdog()
  }

  /** Stop whatever runs for this item (request, retry timer); the server keeps its bytes. */
  halt(item) {
    clearTimeout(item.timer)
    item.timer = null
    item.retryAt = null
    if (item.upload) item.upload.abort(false).catch(() => {})
  }

  begin(item) {
    item.state = 'starting'
    item.message = ''
    item.samples = []
    item.lastActivityMs = this.clock()
    if (!item.upload) item.upload = this.makeUpload(item)
    const upload = item.upload
    // Only a fresh Upload looks for one to resume; a restarted one knows its URL.
    const previous = upload.url ? Promise.resolve([]) : upload.findPreviousUploads()
    previous
      .then((found) => {
        if (item.upload !== upload || item.state !== 'starting') return
        if (found.length) {
          found.sort((a, b) => String(b.creationTime).localeCompare(String(a.creationTime)))
          upload.resumeFromPreviousUpload(found[0])
        }
        upload.start()
      })
      .catch((err) => this.failed(item, { action: 'file', code: 'ERR_LOCAL', message: String(err) }))
    this.onChange(item)
  }

  makeUpload(item) {
    const file = item.file
    const link = this.link
    return new tus.Upload(file, {
      endpoint: link.tus_endpoint,
      chunkSize: link.chunk_size_bytes || 64 * 1024 * 1024,
      retryDelays: null,
      headers: { Authorization: `Bearer ${this.credential}` },
      metadata: { filename: file.name, filetype: file.type || 'application/octet-stream' },
      fingerprint: (f) => Promise.resolve(fingerprint(link, f)),
      storeFingerprintForResuming: true,
      removeFingerprintOnSuccess: true,
      onAfterResponse: (req, res) => this.answered(item, req, res),
      onProgress: (sent) => {
        if (item.upload !== null && SLOT_STATES.has(item.state)) {
          item.state = 'sending'
          item.sent = sent
          item.note(this.clock())
          this.onChange(item)
        }
      },
      onChunkComplete: (_chunk, accepted) => {
        item.acked = accepted
        item.confirmed = true
      },
      onSuccess: () => {
        item.state = 'done'
        item.sent = item.acked = file.size
        item.message = item.sha256 ? '' : 'Stored; the server reported no checksum.'
        item.upload = null
        this.pump()
        this.onChange(item)
      },
      onError: (err) => this.errored(item, err),
    })
  }

  answered(item, req, res) {
    item.lastActivityMs = this.clock()
    const sha = res.getHeader('Upload-SHA256')
    if (sha) item.sha256 = sha.toLowerCase()
    if (req.getMethod() === 'HEAD' && res.getStatus() >= 200 && res.getStatus() < 300) {
      const offset = Number.parseInt(res.getHeader('Upload-Offset'), 10)
      if (Number.isFinite(offset)) {
        // Until this page has had a chunk accepted, the server's offset is where an
        // earlier visit (or a broken request of this one) left the file.
        if (!item.confirmed && offset > 0) item.resumedFrom = offset
        item.sent = item.acked = offset
      }
    }
  }

  errored(item, err) {
    if (!SLOT_STATES.has(item.state)) return
    const req = err.originalRequest
    const res = err.originalResponse
    if (!req) {
      // Not an HTTP failure: the file could not be read (moved, changed, permission).
      this.failed(item, {
        action: 'file',
        code: 'ERR_LOCAL',
        message: 'This file could not be read (was it moved or changed while sending?).',
      })
      return
    }
    const status = res ? res.getStatus() : 0
    const body = res ? parseErrorBody(res.getBody()) : {}
    const verdict = classify({ status, code: body.code, serverMessage: body.message, method: req.getMethod() })
    if (verdict.action === 'retry') {
      const retryAfterS = res ? parseRetryAfter(res.getHeader('Retry-After'), this.clock()) : null
      this.retryLater(item, verdict, retryAfterS)
    } else {
      this.failed(item, verdict)
    }
  }

  retryLater(item, verdict, retryAfterS) {
    if (!this.online) {
      item.state = 'offline'
      this.onChange(item)
      return
    }
    if (item.acked > item.ackedAtLastFailure) item.attempts = 0
    item.ackedAtLastFailure = item.acked
    item.attempts += 1
    item.code = verdict.code
    if (item.attempts > MAX_ATTEMPTS_WITHOUT_PROGRESS) {
      this.failed(item, { ...verdict, action: 'file', message: `${verdict.message} Gave up after ${MAX_ATTEMPTS_WITHOUT_PROGRESS} tries.` })
      return
    }
    const delayMs = retryDelayMs(item.attempts - 1, retryAfterS)
    item.state = 'waiting'
    item.message = verdict.message
    item.retryAt = this.clock() + delayMs
    item.timer = setTimeout(() => {
      item.timer = null
      item.retryAt = null
      if (item.state === 'waiting') this.begin(item)
    }, delayMs)
    this.onChange(item)
  }

  failed(item, verdict) {
    this.halt(item)
    item.code = verdict.code
    item.message = verdict.message
    if (verdict.action === 'link') {
      this.dead = { code: verdict.code, message: verdict.message }
      for (const other of this.items) {
        if (other === item || !(SLOT_STATES.has(other.state) || other.state === 'queued' || other.state === 'paused')) continue
        this.halt(other)
        other.state = 'failed'
        other.code = verdict.code
        other.message = verdict.message
      }
      this.onLinkDead(this.dead)
    }
    item.state = 'failed'
    this.pump()
    this.onChange(item)
  }

  ensureWatchdog() {
    if (this.watchdog !== null) return
    this.watchdog = setInterval(() => this.checkStalls(), 5000)
  }

  checkStalls() {
    const now = this.clock()
    for (const item of this.items) {
      if (item.state !== 'sending') continue
      const chunkEnd = Math.min(item.acked + (this.link.chunk_size_bytes || Infinity), item.file.size)
      const limit = item.sent >= chunkEnd ? STALL_ANSWER_MS : STALL_SENDING_MS
      if (now - item.lastActivityMs > limit) {
        this.halt(item)
        item.state = 'starting'
        this.retryLater(item, { action: 'retry', code: 'ERR_STALLED', message: 'The connection stalled.' }, null)
      }
    }
  }
}

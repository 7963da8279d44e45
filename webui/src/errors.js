// What an answer from the server means for the person in front of the page, and what the
// page does about it.  Pure functions: tested with `node --test` (webui/test/).
//
// Every error the proxy sends is JSON {code, message} with a stable code; the page maps the
// code (else the status) to a sentence a sender understands, and to one of three actions:
//   "retry": transient (network, busy, restarting, rate limit): wait, then continue the file;
//   "file":  this file cannot be sent (too large, type not allowed...): stop it, keep the rest;
//   "link":  the link itself is dead (expired, revoked, not valid): stop everything.

const ASK = 'Ask the person who sent you the link for a new one.'

export const LINK_MESSAGES = {
  ERR_UNAUTHORIZED: `This upload link is not valid (perhaps it was not copied whole). ${ASK}`,
  ERR_BAD_SIGNATURE: `This upload link is damaged: check that you copied all of it. ${ASK}`,
  ERR_LINK_EXPIRED: `This upload link has expired. ${ASK}`,
  ERR_LINK_REVOKED: `This upload link has been withdrawn. ${ASK}`,
}

const FILE_MESSAGES = {
  ERR_TOO_LARGE: 'This file is larger than this link allows.',
  ERR_UNSUPPORTED_MEDIA_TYPE: 'Files of this type are not accepted here.',
  ERR_EXTENSION_NOT_ALLOWED: 'Files with this extension are not accepted here.',
  ERR_TOO_MANY_FILES: 'This link does not allow any more files.',
  ERR_KEY_EXISTS: 'A file with this name is already stored there.',
  ERR_FORBIDDEN: 'This link does not allow this upload.',
  ERR_KEY_NOT_ALLOWED: 'This link does not allow this upload.',
  ERR_STORAGE: 'The server could not store this file.',
  ERR_BAD_METADATA: 'The server refused this file name.',
}

const RETRY_MESSAGES = {
  ERR_BUSY: 'The server is busy.',
  ERR_MEMORY_PRESSURE: 'The server is busy.',
  ERR_TOO_MANY_UPLOADS: 'The server is busy with other uploads.',
  ERR_SHUTTING_DOWN: 'The server is restarting.',
  ERR_STORAGE_UNAVAILABLE: 'The server cannot reach its storage right now.',
  ERR_CLIENT_LIMIT: 'Too many uploads from this device at once.',
  ERR_TOO_MANY_UNFINISHED_UPLOADS: 'Too many unfinished uploads on this link.',
  ERR_EVICTED: 'The server is busy with other uploads.',
  ERR_CLIENT_TIMEOUT: 'The connection stalled.',
}

export const OFFLINE_MESSAGE = 'You are offline: uploads will continue when the connection is back.'
const NETWORK_MESSAGE = 'The connection to the server was lost.'

/** Seconds from a Retry-After header (delta-seconds or an HTTP date), or null. */
export function parseRetryAfter(value, nowMs = Date.now()) {
  if (value == null || value === '') return null
  const text = String(value).trim()
  if (/^\d+$/.test(text)) return Number(text)
  const at = Date.parse(text)
  if (Number.isNaN(at)) return null
  return Math.max(0, Math.ceil((at - nowMs) / 1000))
}

/** The {code, message} of an error body, or {} when it is not one. */
export function parseErrorBody(text) {
  if (!text) return {}
  try {
    const body = JSON.parse(text)
    if (body && typeof body === 'object' && typeof body.code === 'string') {
      return { code: body.code, message: typeof body.message === 'string' ? body.message : '' }
    }
  } catch (_) {
    // Not JSON (an nginx error page, say): the status decides.
  }
  return {}
}

/**
 * What to do about an answer.  status 0 means no answer (network error, aborted request);
 * method is the request's ("POST" creates an upload; a 404 there means no tus service).
 * Returns {action: "retry" | "file" | "link", code, message}.
 */
export function classify({ status, code, serverMessage, method }) {
  const c = code || ''
  if (!status) return { action: 'retry', code: 'ERR_NETWORK', message: NETWORK_MESSAGE }
  if (c in LINK_MESSAGES) return { action: 'link', code: c, message: LINK_MESSAGES[c] }
  if (status === 401) {
    return { action: 'link', code: c || 'ERR_UNAUTHORIZED', message: LINK_MESSAGES.ERR_UNAUTHORIZED }
  }
  if (c in RETRY_MESSAGES) return { action: 'retry', code: c, message: RETRY_MESSAGES[c] }
  if (c in FILE_MESSAGES) return { action: 'file', code: c, message: FILE_MESSAGES[c] }
  if (status === 413) return { action: 'file', code: c || 'ERR_TOO_LARGE', message: FILE_MESSAGES.ERR_TOO_LARGE }
  if (status === 415) {
    return { action: 'file', code: c || 'ERR_UNSUPPORTED_MEDIA_TYPE', message: FILE_MESSAGES.ERR_UNSUPPORTED_MEDIA_TYPE }
  }
  // 404/410 on HEAD or PATCH: the server forgot the upload (expired); starting again
  // creates a new one.  409 (offset mismatch) and 423 (locked): a HEAD sorts it out.
  const retryable =
    [408, 409, 423, 429].includes(status) ||
    ((status === 404 || status === 410) && method !== 'POST') ||
    (status >= 500 && c !== 'ERR_STORAGE' && status !== 501)
  if (retryable) {
    const message = status === 429 ? 'Too many requests.' : status >= 500 ? 'The server had a problem.' : 'The upload was interrupted.'
    return { action: 'retry', code: c || `ERR_HTTP_${status}`, message }
  }
  if (status === 404) {
    return { action: 'link', code: c || 'ERR_NOT_FOUND', message: 'Uploads are not available on this server right now.' }
  }
  const detail = serverMessage ? ` (${serverMessage})` : ''
  return { action: 'file', code: c || `ERR_HTTP_${status}`, message: `The server refused this file${detail}.` }
}

/** The page's first request: what to say when GET api/link fails. */
export function linkInfoError({ status, code, serverMessage }) {
  if (!status) return { retry: true, message: 'Cannot reach the server. Trying again…' }
  if (code in LINK_MESSAGES) return { retry: false, message: LINK_MESSAGES[code] }
  if (status === 401) return { retry: false, message: LINK_MESSAGES.ERR_UNAUTHORIZED }
  if (status === 404) {
    return { retry: false, message: 'Browser uploads are switched off on this server. Ask the person who runs it.' }
  }
  if (status === 429 || status >= 500) return { retry: true, message: 'The server is busy. Trying again…' }
  const detail = serverMessage ? `: ${serverMessage}` : ''
  return { retry: false, message: `The server refused this link${detail}. ${ASK}` }
}

/**
 * Delay before retry number `attempt` (0-based): exponential from 1 s, capped at 20 s,
 * "equal jitter" (half fixed, half random) so that many pages do not come back at once,
 * and never sooner than the server's Retry-After.
 */
export function retryDelayMs(attempt, retryAfterS, random = Math.random) {
  const ceiling = Math.min(20000, 1000 * 2 ** Math.min(attempt, 10))
  const backoff = ceiling / 2 + random() * (ceiling / 2)
  const floor = retryAfterS == null ? 0 : retryAfterS * 1000
  return Math.max(backoff, floor)
}

// node --test: how the page reads the server's answers (src/errors.js).
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { classify, linkInfoError, parseErrorBody, parseRetryAfter, retryDelayMs } from '../src/errors.js'

test('every error code of the contract maps to an action', () => {
  const cases = [
    [401, 'ERR_UNAUTHORIZED', 'link'],
    [403, 'ERR_LINK_EXPIRED', 'link'],
    [403, 'ERR_LINK_REVOKED', 'link'],
    [403, 'ERR_BAD_SIGNATURE', 'link'],
    [413, 'ERR_TOO_LARGE', 'file'],
    [415, 'ERR_UNSUPPORTED_MEDIA_TYPE', 'file'],
    [415, 'ERR_EXTENSION_NOT_ALLOWED', 'file'],
    [429, 'ERR_CLIENT_LIMIT', 'retry'],
    [429, 'ERR_TOO_MANY_UNFINISHED_UPLOADS', 'retry'],
    [503, 'ERR_EVICTED', 'retry'],
    [503, 'ERR_BUSY', 'retry'],
    [503, 'ERR_MEMORY_PRESSURE', 'retry'],
    [503, 'ERR_TOO_MANY_UPLOADS', 'retry'],
    [503, 'ERR_SHUTTING_DOWN', 'retry'],
    [503, 'ERR_STORAGE_UNAVAILABLE', 'retry'],
    [502, 'ERR_STORAGE', 'file'],
    [409, 'ERR_KEY_EXISTS', 'file'],
  ]
  for (const [status, code, action] of cases) {
    const v = classify({ status, code, method: 'PATCH' })
    assert.equal(v.action, action, code)
    assert.equal(v.code, code)
    assert.ok(v.message.length > 10, code)
  }
})

test('statuses without a known code', () => {
  assert.equal(classify({ status: 0 }).action, 'retry') // no answer: network
  assert.equal(classify({ status: 502 }).action, 'retry') // nginx: upstream down
  assert.equal(classify({ status: 504 }).action, 'retry')
  assert.equal(classify({ status: 423, method: 'HEAD' }).action, 'retry')
  assert.equal(classify({ status: 409, method: 'PATCH' }).action, 'retry') // offset mismatch
  assert.equal(classify({ status: 404, method: 'PATCH' }).action, 'retry') // upload expired
  assert.equal(classify({ status: 404, method: 'POST' }).action, 'link') // no tus endpoint
  assert.equal(classify({ status: 413 }).action, 'file') // nginx client_max_body_size
  const other = classify({ status: 400, code: 'ERR_X', serverMessage: 'bad thing' })
  assert.equal(other.action, 'file')
  assert.match(other.message, /bad thing/)
})

test('the link request', () => {
  assert.equal(linkInfoError({ status: 0 }).retry, true)
  assert.equal(linkInfoError({ status: 503, code: 'ERR_BUSY' }).retry, true)
  assert.match(linkInfoError({ status: 403, code: 'ERR_LINK_EXPIRED' }).message, /expired/)
  assert.match(linkInfoError({ status: 403, code: 'ERR_LINK_REVOKED' }).message, /withdrawn/)
  assert.match(linkInfoError({ status: 403, code: 'ERR_BAD_SIGNATURE' }).message, /damaged/)
  assert.match(linkInfoError({ status: 401 }).message, /not valid/)
  assert.match(linkInfoError({ status: 404 }).message, /switched off/)
})

test('Retry-After: seconds or a date', () => {
  assert.equal(parseRetryAfter('7'), 7)
  assert.equal(parseRetryAfter(null), null)
  assert.equal(parseRetryAfter('soon'), null)
  const now = Date.parse('2026-12-07T12:00:00Z')
  assert.equal(parseRetryAfter('Mon, 07 Dec 2026 12:00:30 GMT', now), 30)
  assert.equal(parseRetryAfter('Mon, 07 Dec 2026 11:00:00 GMT', now), 0)
})

test('retry delays: backoff with jitter, capped, never before Retry-After', () => {
  assert.equal(retryDelayMs(0, null, () => 0), 500)
  assert.equal(retryDelayMs(0, null, () => 1), 1000)
  assert.equal(retryDelayMs(3, null, () => 1), 8000)
  assert.equal(retryDelayMs(30, null, () => 1), 20000)
  assert.equal(retryDelayMs(0, 12, () => 1), 12000)
})

test('error bodies', () => {
  assert.deepEqual(parseErrorBody('{"code":"ERR_BUSY","message":"m"}'), { code: 'ERR_BUSY', message: 'm' })
  assert.deepEqual(parseErrorBody('<html>502</html>'), {})
  assert.deepEqual(parseErrorBody(''), {})
  assert.deepEqual(parseErrorBody('[1]'), {})
})

// node --test: the link's limits and the number formats (src/policy.js).
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { acceptAttribute, formatBytes, formatDuration, formatUntil, readFragment, refusal, typeAllowed } from '../src/policy.js'

const MiB = 1024 * 1024
const link = (over = {}) => ({ max_size_bytes: null, max_files: null, files_used: 0, allowed_types: [], allowed_extensions: [], ...over })
const file = (name, size, type = '') => ({ name, size, type })

test('size cap: refused before sending', () => {
  assert.equal(refusal(link({ max_size_bytes: MiB }), file('a.bin', MiB), 0), null)
  const no = refusal(link({ max_size_bytes: MiB }), file('a.bin', MiB + 1), 0)
  assert.equal(no.code, 'ERR_TOO_LARGE')
  assert.match(no.message, /1\.00 MiB/)
})

test('file count cap counts files already sent', () => {
  const l = link({ max_files: 3, files_used: 2 })
  assert.equal(refusal(l, file('a', 1), 0), null)
  assert.equal(refusal(l, file('b', 1), 1).code, 'ERR_TOO_MANY_FILES')
})

test('types and extensions follow the server rules', () => {
  const l = link({ allowed_types: ['image/*', 'application/pdf'], allowed_extensions: ['.jpg', '.pdf'] })
  assert.equal(typeAllowed(l, 'A.JPG', 'image/jpeg'), true)
  assert.equal(typeAllowed(l, 'a.pdf', 'application/pdf'), true)
  assert.equal(typeAllowed(l, 'a.png', 'image/png'), false) // extension
  assert.equal(typeAllowed(l, 'a.jpg', ''), false) // unknown type
  assert.equal(typeAllowed(link(), 'anything', ''), true)
  assert.equal(refusal(l, file('x.exe', 1, 'application/x-msdownload'), 0).code, 'ERR_UNSUPPORTED_MEDIA_TYPE')
  assert.equal(acceptAttribute(l), 'image/*,application/pdf,.jpg,.pdf')
})

test('formats', () => {
  assert.equal(formatBytes(0), '0 B')
  assert.equal(formatBytes(1536), '1.50 KiB')
  assert.equal(formatBytes(20 * 1024 * MiB), '20.0 GiB')
  assert.equal(formatDuration(42), '42 s')
  assert.equal(formatDuration(3 * 3600 + 5 * 60), '3 h 05 min')
  assert.equal(formatDuration(null), '–')
  const now = Date.parse('2026-12-01T00:00:00Z')
  assert.equal(formatUntil(now + 7 * 86400e3, now), 'in 7 days')
  assert.equal(formatUntil(now - 1, now), 'expired')
})

test('the credential comes from the fragment, as is', () => {
  assert.deepEqual(readFragment('#link=upl1.eyJw.c2ln'), { kind: 'link', value: 'upl1.eyJw.c2ln' })
  assert.deepEqual(readFragment('#token=a+b/c%3D'), { kind: 'token', value: 'a+b/c=' })
  assert.deepEqual(readFragment('#x=1&link=abc'), { kind: 'link', value: 'abc' })
  assert.equal(readFragment(''), null)
  assert.equal(readFragment('#link='), null)
  assert.equal(readFragment('#other=1'), null)
})

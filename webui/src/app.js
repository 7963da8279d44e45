// The upload page: reads the link from the URL fragment (never sent to the server in the
// URL, so it stays out of access logs), asks the server what the link allows, and sends
// the chosen files over tus (uploads.js).  Plain DOM, no framework; all text goes in with
// textContent, never as HTML.  Works under the strict CSP the server sends: no inline
// script or style, no eval, same-origin requests only.

import { linkInfoError, OFFLINE_MESSAGE, parseErrorBody, parseRetryAfter, retryDelayMs } from './errors.js'
import { acceptAttribute, formatBytes, formatDuration, formatRate, formatUntil, readFragment } from './policy.js'
import { earlierUploads, Uploads } from './uploads.js'

const $ = (id) => document.getElementById(id)
const TICK_MS = 500

function setPhase(phase) {
  document.body.dataset.phase = phase
}

function show(id, visible = true) {
  $(id).hidden = !visible
}

function el(tag, className, text) {
  const node = document.createElement(tag)
  if (className) node.className = className
  if (text != null) node.textContent = text
  return node
}

function gate(title, message) {
  $('gate-title').textContent = title
  if (message) $('gate-message').textContent = message
  $('subtitle').textContent = 'No upload possible'
  show('gate')
  show('drop', false)
}

function banner(message) {
  $('banner').textContent = message || ''
  show('banner', Boolean(message))
}

function announce(message) {
  $('announce').textContent = message
}

// -- the link ----------------------------------------------------------------------------

async function loadLink(credential) {
  let attempt = 0
  for (;;) {
    let status = 0
    let text = ''
    let retryAfter = null
    try {
      const res = await fetch('api/link', {
        headers: { Authorization: `Bearer ${credential}`, Accept: 'application/json' },
        cache: 'no-store',
        credentials: 'omit',
        redirect: 'error',
      })
      status = res.status
      text = await res.text()
      retryAfter = parseRetryAfter(res.headers.get('Retry-After'))
    } catch (_) {
      status = 0
    }
    if (status === 200) {
      try {
        const info = JSON.parse(text)
        if (info && typeof info.tus_endpoint === 'string') return info
      } catch (_) {
        // Falls through to the message below.
      }
      return { error: 'The server answered something this page does not understand.' }
    }
    const body = parseErrorBody(text)
    const verdict = linkInfoError({ status, code: body.code, serverMessage: body.message })
    if (!verdict.retry) return { error: verdict.message, code: body.code }
    $('subtitle').textContent = verdict.message
    if (!navigator.onLine) {
      $('subtitle').textContent = OFFLINE_MESSAGE
      await new Promise((resolve) => window.addEventListener('online', resolve, { once: true }))
    } else {
      await new Promise((resolve) => setTimeout(resolve, retryDelayMs(attempt, retryAfter)))
    }
    attempt += 1
  }
}

function showLink(link, kind) {
  const note = $('link-note')
  note.textContent = link.note || ''
  note.hidden = !link.note
  $('link-prefix').textContent = link.prefix ? link.prefix : 'the main folder'
  const expires = link.expires_at ? Date.parse(link.expires_at) : NaN
  if (Number.isNaN(expires)) {
    $('link-expires').textContent = kind === 'token' ? 'never (operator token)' : 'not stated'
  } else {
    const when = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'short' }).format(expires)
    $('link-expires').textContent = `${when} (${formatUntil(expires)})`
  }
  $('link-max-size').textContent = link.max_size_bytes == null ? 'no limit' : formatBytes(link.max_size_bytes)
  const used = link.files_used || 0
  $('link-files').textContent =
    link.max_files == null ? `${used} sent so far, no limit` : `${used} of ${link.max_files} used`
  const accept = acceptAttribute(link)
  $('link-types').textContent = accept.split(',').join(', ')
  show('link-types-row', Boolean(accept))
  if (accept) $('picker').setAttribute('accept', accept)
  $('subtitle').textContent = kind === 'token' ? 'Using an operator token.' : 'Choose the files to send.'
  show('link')
}

// -- the file list -------------------------------------------------------------------------

const rows = new Map()

function buildRow(item, uploads) {
  const li = el('li', 'file')
  li.dataset.id = String(item.id)
  const head = el('div', 'row')
  head.append(el('span', 'name', item.file.name), el('span', 'size', formatBytes(item.file.size)))
  const bar = el('progress')
  bar.max = Math.max(1, item.file.size)
  bar.value = 0
  bar.setAttribute('aria-label', item.file.name)
  const status = el('p', 'status')
  const hash = el('p', 'hash')
  hash.hidden = true
  const digest = el('code', 'digest')
  const copy = el('button', null, 'Copy')
  copy.type = 'button'
  copy.addEventListener('click', () => copyText(digest, copy))
  hash.append(el('span', 'muted', 'SHA-256 '), digest, copy)
  const actions = el('div', 'actions')
  const button = (label, action) => {
    const b = el('button', null, label)
    b.type = 'button'
    b.dataset.action = action
    b.setAttribute('aria-label', `${label} ${item.file.name}`)
    b.addEventListener('click', () => {
      if (action === 'remove') {
        uploads.cancel(item)
        rows.delete(item.id)
        li.remove()
        render(uploads)
      } else {
        uploads[action](item)
      }
    })
    actions.append(b)
    return b
  }
  const buttons = {
    pause: button('Pause', 'pause'),
    resume: button('Resume', 'resume'),
    retry: button('Retry', 'resume'),
    remove: button('Remove', 'remove'),
  }
  li.append(head, bar, status, hash, actions)
  $('files').append(li)
  const row = { li, bar, status, hash, digest, buttons }
  rows.set(item.id, row)
  return row
}

function copyText(node, button) {
  const text = node.textContent
  const done = () => {
    button.textContent = 'Copied'
    setTimeout(() => (button.textContent = 'Copy'), 2000)
  }
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, () => selectText(node))
  } else {
    selectText(node)
  }
}

function selectText(node) {
  const range = document.createRange()
  range.selectNodeContents(node)
  const selection = window.getSelection()
  selection.removeAllRanges()
  selection.addRange(range)
}

function percent(part, whole) {
  return whole > 0 ? `${Math.floor((100 * part) / whole)}%` : '100%'
}

function statusText(item, now) {
  const size = item.file.size
  switch (item.state) {
    case 'queued':
      return 'Waiting for its turn'
    case 'starting':
      return item.sent > 0 ? `Reconnecting at ${percent(item.sent, size)}…` : 'Starting…'
    case 'sending': {
      const rate = item.rate(now)
      const parts = [percent(item.sent, size)]
      if (rate > 0) parts.push(formatRate(rate), `${formatDuration((size - item.sent) / rate)} left`)
      if (item.resumedFrom) parts.push(`resumed at ${percent(item.resumedFrom, size)}`)
      return parts.join(' · ')
    }
    case 'paused':
      return `Paused at ${percent(item.sent, size)}`
    case 'waiting': {
      const s = Math.max(0, Math.ceil((item.retryAt - now) / 1000))
      return `${item.message} Trying again in ${s} s.`
    }
    case 'offline':
      return `Offline at ${percent(item.sent, size)}: continues when the connection is back.`
    case 'done':
      return item.message || 'Sent. Compare the SHA-256 below with your copy of the file.'
    default:
      return item.message
  }
}

const BUTTONS = {
  pause: ['queued', 'starting', 'sending', 'waiting', 'offline'],
  resume: ['paused'],
  retry: ['failed'],
  remove: ['queued', 'starting', 'sending', 'waiting', 'offline', 'paused', 'failed', 'refused'],
}

function renderItem(item, uploads, now) {
  const row = rows.get(item.id) || (item.state === 'cancelled' ? null : buildRow(item, uploads))
  if (!row) return
  const { li, bar, status, hash, digest, buttons } = row
  const sent = item.done ? item.file.size : Math.min(item.sent, item.file.size)
  li.dataset.state = item.state
  li.dataset.sent = String(sent)
  li.dataset.resumedFrom = String(item.resumedFrom || 0)
  if (item.code) li.dataset.code = item.code
  bar.value = sent
  status.textContent = statusText(item, now)
  if (item.sha256) {
    digest.textContent = item.sha256
    li.dataset.sha256 = item.sha256
    hash.hidden = false
  }
  for (const [name, states] of Object.entries(BUTTONS)) {
    const visible = states.includes(item.state) && !(name === 'retry' && uploads.dead)
    buttons[name].hidden = !visible
  }
  buttons.remove.textContent = ['failed', 'refused'].includes(item.state) ? 'Remove' : 'Cancel'
}

function render(uploads) {
  const now = Date.now()
  for (const item of uploads.items) renderItem(item, uploads, now)
  const t = uploads.totals()
  show('total', t.files > 0)
  const bar = $('total-progress')
  bar.max = Math.max(1, t.size)
  bar.value = t.sent
  const parts = [`${t.done} of ${t.files} files sent`, `${formatBytes(t.sent)} of ${formatBytes(t.size)}`]
  if (t.rate > 0) parts.push(formatRate(t.rate), `${formatDuration(t.etaS)} left`)
  $('total-text').textContent = parts.join(' · ')
  document.title = t.active > 0 ? `${percent(t.sent, t.size)} – Send files` : 'Send files'
  const states = uploads.items.map((i) => i.state)
  $('pause-all').hidden = !states.some((s) => BUTTONS.pause.includes(s))
  $('resume-all').hidden = !states.includes('paused')
}

// -- wiring ------------------------------------------------------------------------------------

function filesFromDrop(event) {
  const files = []
  let folders = 0
  const items = event.dataTransfer.items
  if (items && items.length) {
    for (const entry of items) {
      if (entry.kind !== 'file') continue
      const fsEntry = entry.webkitGetAsEntry ? entry.webkitGetAsEntry() : null
      if (fsEntry && fsEntry.isDirectory) {
        folders += 1
        continue
      }
      const file = entry.getAsFile()
      if (file) files.push(file)
    }
  } else {
    files.push(...event.dataTransfer.files)
  }
  if (folders) announce('Folders cannot be sent as a whole: open the folder and choose the files in it.')
  return files
}

function wire(uploads) {
  const picker = $('picker')
  const take = (files) => {
    if (files.length) uploads.add(files)
    render(uploads)
  }
  $('choose').addEventListener('click', () => picker.click())
  picker.addEventListener('change', () => {
    take([...picker.files])
    // Choosing the same file again later must fire `change` again.
    picker.value = ''
  })
  const drop = $('drop')
  document.addEventListener('dragover', (event) => {
    event.preventDefault()
    drop.classList.add('over')
  })
  document.addEventListener('dragleave', (event) => {
    if (!event.relatedTarget) drop.classList.remove('over')
  })
  document.addEventListener('drop', (event) => {
    event.preventDefault()
    drop.classList.remove('over')
    if (!uploads.dead) take(filesFromDrop(event))
  })
  $('pause-all').addEventListener('click', () => uploads.pauseAll())
  $('resume-all').addEventListener('click', () => uploads.resumeAll())
  const connection = () => {
    uploads.setOnline(navigator.onLine)
    banner(navigator.onLine ? (uploads.dead ? uploads.dead.message : '') : OFFLINE_MESSAGE)
    render(uploads)
  }
  window.addEventListener('online', connection)
  window.addEventListener('offline', connection)
  if (!navigator.onLine) connection()
  window.addEventListener('beforeunload', (event) => {
    if (uploads.totals().active > 0) {
      // Leaving only pauses: the same link and files continue later.  Browsers show
      // their own wording; returnValue is what asks them to.
      event.preventDefault()
      event.returnValue = ''
    }
  })
  // Rates, ETAs and retry countdowns move without events.
  setInterval(() => {
    if (uploads.totals().active > 0) render(uploads)
  }, TICK_MS)
}

async function main() {
  const found = readFragment(window.location.hash)
  window.addEventListener('hashchange', () => window.location.reload())
  if (!found) {
    setPhase('nolink')
    gate('You need an upload link')
    return
  }
  setPhase('loading')
  const link = await loadLink(found.value)
  if (link.error) {
    setPhase('refused')
    gate('This link cannot be used', link.error)
    show('gate-operator', false)
    return
  }
  showLink(link, found.kind)
  let scheduled = false
  const uploads = new Uploads({
    link,
    credential: found.value,
    onChange: (item) => {
      if (item && item.state === 'done') announce(`${item.file.name} sent.`)
      else if (item && ['failed', 'refused'].includes(item.state)) announce(`${item.file.name}: ${item.message}`)
      if (scheduled) return
      scheduled = true
      window.requestAnimationFrame(() => {
        scheduled = false
        render(uploads)
      })
    },
    onLinkDead: (dead) => {
      setPhase('dead')
      banner(dead.message)
      show('drop', false)
      $('subtitle').textContent = 'This link can no longer be used.'
    },
  })
  wire(uploads)
  show('drop')
  setPhase('ready')
  const earlier = await earlierUploads(link).catch(() => [])
  if (earlier.length) {
    const list = $('earlier-list')
    for (const e of earlier) list.append(el('li', null, `${e.name} (${formatBytes(e.size)})`))
    show('earlier')
  }
  // For tests and the curious: the page's state, read-only.
  window.uploadPage = { uploads }
}

if (typeof document !== 'undefined') {
  main().catch((err) => {
    setPhase('error')
    gate('Something went wrong', String(err))
  })
}

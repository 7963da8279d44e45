// The link (read from the URL fragment), its limits, checked before a byte is sent, and
// the page's number formats.
// Pure functions: tested with `node --test` (webui/test/).  The server checks all of this
// again: the page only saves the sender a wasted upload and says why at once.

/**
 * {kind: "link" | "token", value} from "#link=…" or "#token=…", else null.  Split by
 * hand, not with URLSearchParams, which would turn a "+" of a token into a space.
 */
export function readFragment(hash) {
  for (const part of hash.replace(/^#/, '').split('&')) {
    const eq = part.indexOf('=')
    const name = part.slice(0, eq)
    if (eq > 0 && (name === 'link' || name === 'token')) {
      let value = part.slice(eq + 1)
      try {
        value = decodeURIComponent(value)
      } catch (_) {
        // Keep it raw: the server says whether it is valid.
      }
      if (value) return { kind: name, value }
    }
  }
  return null
}

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB']

export function formatBytes(n) {
  if (n == null || !Number.isFinite(n)) return '–'
  let value = n
  let unit = 0
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024
    unit += 1
  }
  const digits = unit === 0 || value >= 100 ? 0 : value >= 10 ? 1 : 2
  return `${value.toFixed(digits)} ${UNITS[unit]}`
}

export function formatRate(bytesPerS) {
  return bytesPerS > 0 ? `${formatBytes(bytesPerS)}/s` : '–'
}

/** "45 s", "12 min", "3 h 05 min"; '–' when unknown. */
export function formatDuration(seconds) {
  if (seconds == null || !Number.isFinite(seconds) || seconds < 0) return '–'
  const s = Math.round(seconds)
  if (s < 60) return `${s} s`
  if (s < 3600) return `${Math.round(s / 60)} min`
  const h = Math.floor(s / 3600)
  const m = Math.round((s % 3600) / 60)
  return `${h} h ${String(m).padStart(2, '0')} min`
}

/** "in 6 days", "in 3 hours", "in 20 minutes", "expired" (relative to nowMs). */
export function formatUntil(atMs, nowMs = Date.now()) {
  const s = (atMs - nowMs) / 1000
  if (!(s > 0)) return 'expired'
  if (s < 3600) return `in ${Math.max(1, Math.round(s / 60))} minutes`
  if (s < 2 * 86400) return `in ${Math.round(s / 3600)} hours`
  return `in ${Math.round(s / 86400)} days`
}

/** The server's content policy, same rules: `image/*` wildcards, extensions with their dot. */
export function typeAllowed(link, name, type) {
  const types = link.allowed_types || []
  if (types.length) {
    const media = (type || '').split(';')[0].trim().toLowerCase()
    const wildcard = `${media.split('/')[0]}/*`
    if (!types.includes(media) && !types.includes(wildcard)) return false
  }
  const exts = link.allowed_extensions || []
  if (exts.length) {
    const lower = name.toLowerCase()
    if (!exts.some((e) => lower.endsWith(e.toLowerCase()))) return false
  }
  return true
}

/** For <input accept>: the file picker then offers only what the link takes. */
export function acceptAttribute(link) {
  return [...(link.allowed_types || []), ...(link.allowed_extensions || [])].join(',')
}

/**
 * Why a file cannot go on this link, or null.  `accepted` counts the files this page has
 * already taken on (queued, sending or sent) beyond the server's `files_used`.
 */
export function refusal(link, file, accepted) {
  if (link.max_size_bytes != null && file.size > link.max_size_bytes) {
    return {
      code: 'ERR_TOO_LARGE',
      message: `Too large: ${formatBytes(file.size)}; this link takes files up to ${formatBytes(link.max_size_bytes)}.`,
    }
  }
  if (!typeAllowed(link, file.name, file.type)) {
    const kinds = acceptAttribute(link).split(',').join(', ')
    return { code: 'ERR_UNSUPPORTED_MEDIA_TYPE', message: `This kind of file is not accepted here (only ${kinds}).` }
  }
  if (link.max_files != null && (link.files_used || 0) + accepted >= link.max_files) {
    return { code: 'ERR_TOO_MANY_FILES', message: `This link takes ${link.max_files} files and has no room for more.` }
  }
  return null
}

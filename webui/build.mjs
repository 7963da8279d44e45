// Builds the upload page into proxy/webui/static/ (committed, so running the daemon needs
// no Node): index.html, app.js (one minified ES2019 bundle), app.css, and LICENSES.txt with
// the licence text of every npm package that ends up in app.js, found from esbuild's
// metafile.  Same sources and lockfile give the same bytes.
//
//   node build.mjs             write the files
//   node build.mjs --check     exit 1 when the committed files differ from a fresh build
//   node build.mjs --out DIR   write somewhere else

import { readFileSync, readdirSync, existsSync, mkdirSync, writeFileSync, renameSync } from 'node:fs'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import * as esbuild from 'esbuild'

const here = dirname(fileURLToPath(import.meta.url))
const args = process.argv.slice(2)
const check = args.includes('--check')
const outIndex = args.indexOf('--out')
const outDir = resolve(outIndex >= 0 ? args[outIndex + 1] : join(here, '..', 'proxy', 'webui', 'static'))

const BANNER = '/*! upload-proxy upload page. Bundled packages and their licences: LICENSES.txt */'
const LICENCE_FILES = /^(licen[cs]e|copying)(\.(md|txt|markdown))?$/i

async function bundleJs() {
  const result = await esbuild.build({
    entryPoints: [join(here, 'src', 'app.js')],
    bundle: true,
    minify: true,
    format: 'iife',
    platform: 'browser',
    target: 'es2019',
    charset: 'utf8',
    legalComments: 'none',
    banner: { js: BANNER },
    metafile: true,
    write: false,
    absWorkingDir: here,
    logLevel: 'warning',
  })
  return { js: result.outputFiles[0].text, inputs: Object.keys(result.metafile.inputs) }
}

async function bundleCss() {
  const result = await esbuild.build({
    entryPoints: [join(here, 'src', 'app.css')],
    bundle: true,
    minify: true,
    target: ['chrome80', 'firefox78', 'safari13'],
    charset: 'utf8',
    write: false,
    absWorkingDir: here,
    logLevel: 'warning',
  })
  return result.outputFiles[0].text
}

/** The package directories (node_modules/<name> or node_modules/@scope/<name>) bundled. */
function bundledPackages(inputs) {
  const dirs = new Set()
  for (const input of inputs) {
    const m = input.match(/^(.*node_modules\/(?:@[^/]+\/)?[^/]+)\//)
    if (m) dirs.add(m[1])
  }
  return [...dirs].sort()
}

function licences(packageDirs) {
  const sections = []
  for (const dir of packageDirs) {
    const pkg = JSON.parse(readFileSync(join(here, dir, 'package.json'), 'utf8'))
    const files = readdirSync(join(here, dir)).filter((f) => LICENCE_FILES.test(f)).sort()
    if (!files.length) throw new Error(`${pkg.name}@${pkg.version} is bundled but ships no licence file`)
    const texts = files.map((f) => readFileSync(join(here, dir, f), 'utf8').trim())
    sections.push(`${pkg.name} ${pkg.version} (${pkg.license || 'see below'})\n\n${texts.join('\n\n')}`)
  }
  const rule = `\n\n${'-'.repeat(78)}\n\n`
  const head =
    'Third-party software bundled into app.js of the upload-proxy upload page,\n' +
    'with the licence text each package ships.'
  return `${head}${rule}${sections.join(rule)}\n`
}

async function build() {
  const { js, inputs } = await bundleJs()
  return {
    'index.html': readFileSync(join(here, 'src', 'index.html'), 'utf8'),
    'app.js': js,
    'app.css': await bundleCss(),
    'LICENSES.txt': licences(bundledPackages(inputs)),
  }
}

const files = await build()
if (check) {
  const stale = Object.entries(files)
    .filter(([name, text]) => !existsSync(join(outDir, name)) || readFileSync(join(outDir, name), 'utf8') !== text)
    .map(([name]) => name)
  const extra = existsSync(outDir) ? readdirSync(outDir).filter((f) => !(f in files)) : []
  if (stale.length || extra.length) {
    console.error(`${outDir} is not what the sources build: differ ${stale.join(', ') || '-'}; not built here ${extra.join(', ') || '-'}. Run make webui.`)
    process.exit(1)
  }
  console.log(`${outDir} matches the sources`)
} else {
  mkdirSync(outDir, { recursive: true })
  for (const [name, text] of Object.entries(files)) {
    const tmp = join(outDir, `.${name}.tmp`)
    writeFileSync(tmp, text)
    renameSync(tmp, join(outDir, name))
    console.log(`${name.padEnd(13)} ${String(Buffer.byteLength(text)).padStart(7)} bytes`)
  }
}
